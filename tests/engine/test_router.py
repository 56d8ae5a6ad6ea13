"""The routing rules, one test (or one parametrised group) per rule, with the reason text checked."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.config import ModelSettings, RoutingSettings, load_settings
from engine.errors import BackendUnavailable
from engine.models import (
    BackendKind,
    BackendStatus,
    BudgetRoom,
    FailureReason,
    Mode,
    ResolvedRequest,
    RouteDecision,
)
from engine.router import failover, route

MODELS = load_settings(None, {})[0].models  # schnell (local only), dev (both, non-commercial), pro, ultra (API)
# A model that runs on both sides at a round price, for the exact wording of refusals.
BOTH = ModelSettings(display_name="Both", local=True, api_endpoint="flux-both", price_credits=Decimal(4))

LOCAL = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=12.0)
LOCAL_SLOW = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=240.0)
LOCAL_PAUSED = BackendStatus(BackendKind.LOCAL, healthy=True, paused=True, wait_s=12.0)
API = BackendStatus(BackendKind.API, healthy=True, wait_s=18.0, in_flight=3, capacity=20)
API_FULL = BackendStatus(BackendKind.API, healthy=True, wait_s=18.0, in_flight=20, capacity=20)
API_FULL_LONG = BackendStatus(BackendKind.API, healthy=True, wait_s=300.0, in_flight=20, capacity=20)
API_DOWN = BackendStatus(BackendKind.API, healthy=False, wait_s=18.0, detail="HTTP 503")

ROOM = BudgetRoom(api_micros=420_000, gpu_ms=None, images=None)  # $0.42 left this month
UNLIMITED = BudgetRoom(api_micros=None, gpu_ms=None, images=None)
BROKE = BudgetRoom(api_micros=10_000, gpu_ms=None, images=None)  # $0.01 left

ROUTING = RoutingSettings(max_local_wait_s=60.0)  # round numbers for the texts; commercial = False


def request(model: str, mode: Mode = Mode.AUTO, steps: int = 28) -> ResolvedRequest:
    return ResolvedRequest(
        prompt="a lighthouse at dusk",
        model=model,
        width=1024,
        height=1024,
        aspect_ratio="1:1",
        steps=steps,
        guidance=None,
        seed=1,
        mode=mode,
    )


def decide(
    model_name: str,
    *,
    mode: Mode = Mode.AUTO,
    model: ModelSettings | None = None,
    routing: RoutingSettings = ROUTING,
    local: BackendStatus | None = LOCAL,
    api: BackendStatus | None = API,
    room: BudgetRoom = ROOM,
) -> RouteDecision:
    settings = model or MODELS[model_name]
    return route(request(model_name, mode, settings.default_steps), model_name, settings, routing, local, api, room)


def refusal(model_name: str, **kwargs: Any) -> str:
    with pytest.raises(BackendUnavailable) as caught:
        decide(model_name, **kwargs)
    return caught.value.reason


def rescue(
    model_name: str,
    failed_on: BackendKind,
    failure: FailureReason,
    *,
    mode: Mode = Mode.AUTO,
    retries_left: int = 1,
    routing: RoutingSettings = ROUTING,
    local: BackendStatus | None = LOCAL,
    api: BackendStatus | None = API,
    room: BudgetRoom = ROOM,
) -> RouteDecision | None:
    model = MODELS[model_name]
    req = request(model_name, mode, model.default_steps)
    return failover(req, model_name, model, routing, failed_on, failure, retries_left, local, api, room)


# ---- rule 1: capability ----


@pytest.mark.parametrize(("name", "display"), [("pro", "FLUX1.1 [pro]"), ("ultra", "FLUX1.1 [pro] ultra")])
def test_api_only_model_goes_to_the_api_even_with_an_idle_gpu(name: str, display: str) -> None:
    decision = decide(name)
    assert decision.backend is BackendKind.API
    assert decision.reason.startswith(f"API: {display} runs only on the API; ")
    assert decision.estimated_cost_micros == MODELS[name].price_micros
    assert decision.estimated_gpu_ms == 0
    assert decision.eta_s == API.eta_s


def test_local_only_model_stays_local_even_with_a_long_wait() -> None:
    decision = decide("schnell", local=LOCAL_SLOW)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason == "local (slow lane): FLUX.1 [schnell] runs only on the local GPU; about 4 min wait"
    assert decision.estimated_cost_micros == 0


def test_local_only_model_is_refused_when_the_gpu_is_down() -> None:
    down = BackendStatus(BackendKind.LOCAL, healthy=False, detail="CUDA error")
    reason = refusal("schnell", local=down)
    assert reason.startswith("the local GPU is down (CUDA error) and FLUX.1 [schnell] runs only on the local GPU: ")
    assert "choose a model that the API offers" in reason
    assert reason.endswith("or try later")


def test_local_disabled_in_config_sends_a_model_that_can_to_the_api() -> None:
    decision = decide("dev", routing=RoutingSettings(local_enabled=False))
    assert decision.backend is BackendKind.API
    assert decision.reason.startswith("API: local generation is turned off on this bot; ")


def test_api_disabled_in_config_keeps_the_job_local() -> None:
    decision = decide("dev", routing=RoutingSettings(api_enabled=False), local=LOCAL_SLOW)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason.startswith("local (slow lane): the API is turned off on this bot; ")


def test_no_local_worker_configured_uses_the_api() -> None:
    decision = decide("dev", local=None)
    assert decision.backend is BackendKind.API
    assert "no local GPU worker is set up" in decision.reason


def test_no_api_key_refuses_an_api_only_model_and_says_who_can_help() -> None:
    reason = refusal("pro", api=None)
    assert reason == (
        "FLUX1.1 [pro] runs only on the API and no BFL API key is set up: "
        "choose a model that runs locally or ask an admin to set it up"
    )


# ---- rule 2: licence ----


def test_commercial_bot_never_runs_a_non_commercial_model_locally() -> None:
    decision = decide("dev", routing=RoutingSettings(commercial=True))
    assert decision.backend is BackendKind.API
    assert "FLUX.1 [dev] has a non-commercial licence" in decision.reason


def test_commercial_bot_refuses_a_non_commercial_model_when_the_api_cannot_take_it() -> None:
    reason = refusal("dev", routing=RoutingSettings(commercial=True), api=API_DOWN)
    assert "non-commercial licence" in reason
    assert "the API is down (HTTP 503)" in reason
    assert "choose a model with a commercial licence" in reason


def test_non_commercial_model_runs_locally_when_the_bot_is_not_commercial() -> None:
    assert decide("dev").backend is BackendKind.LOCAL


# ---- rule 3: modes ----


def test_relax_stays_local_however_long_the_wait() -> None:
    decision = decide("dev", mode=Mode.RELAX, local=LOCAL_SLOW)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason == "local (relax mode): about 4 min wait"
    assert decision.eta_s == 240.0


def test_relax_refuses_rather_than_paying_and_suggests_another_mode_when_the_api_could() -> None:
    reason = refusal("dev", mode=Mode.RELAX, local=LOCAL_PAUSED)
    assert reason == (
        "the local GPU is paused and relax mode uses only the local GPU: switch to auto mode or try later"
    )


def test_relax_does_not_suggest_another_mode_when_the_api_could_not_help_either() -> None:
    reason = refusal("dev", mode=Mode.RELAX, local=LOCAL_PAUSED, room=BROKE)
    assert "relax mode uses only the local GPU" in reason
    assert "switch to" not in reason


def test_relax_refuses_an_api_only_model() -> None:
    reason = refusal("pro", mode=Mode.RELAX)
    assert reason.startswith("FLUX1.1 [pro] runs only on the API and relax mode uses only the local GPU: ")
    assert "choose a model that runs locally" in reason


def test_fast_prefers_the_api_over_an_idle_gpu() -> None:
    decision = decide("dev", mode=Mode.FAST)
    assert decision.backend is BackendKind.API
    assert decision.reason == "API: fast mode; costs $0.025, $0.395 left this month"
    assert decision.estimated_cost_micros == 25_000


@pytest.mark.parametrize(
    ("api", "room", "why"),
    [
        (API_FULL, ROOM, "the API is at its limit of 20 jobs at once (~18 s queue)"),
        (API_DOWN, ROOM, "the API is down (HTTP 503)"),
        (API, BROKE, "the API needs $0.025 but only $0.01 is left this month"),
        (None, ROOM, "no BFL API key is set up"),
    ],
)
def test_fast_falls_back_to_local_and_says_why(api: BackendStatus | None, room: BudgetRoom, why: str) -> None:
    decision = decide("dev", mode=Mode.FAST, api=api, room=room)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason == f"local: fast mode, but {why}; about 12 s wait"
    assert decision.estimated_gpu_ms == 28 * 250


def test_fast_refuses_when_neither_side_can_take_the_job() -> None:
    reason = refusal("dev", mode=Mode.FAST, local=LOCAL_PAUSED, api=API_DOWN)
    assert reason == "the local GPU is paused and the API is down (HTTP 503): try later"


def test_fast_waits_for_a_full_api_when_its_queue_is_shorter() -> None:
    decision = decide("dev", mode=Mode.FAST, local=LOCAL_SLOW, api=API_FULL)
    assert decision.backend is BackendKind.API
    assert decision.reason == (
        "API: fast mode, queued: the API is at its limit of 20 jobs at once (~18 s queue);"
        " costs $0.025, $0.395 left this month"
    )


# ---- rule 4: auto ----


def test_auto_runs_locally_when_the_wait_is_short() -> None:
    decision = decide("dev")
    assert decision == RouteDecision(
        BackendKind.LOCAL, "local: queue wait ~12 s <= 60 s", estimated_gpu_ms=7_000, eta_s=12.0, wait_s=12.0
    )


def test_auto_compares_the_wait_before_the_job_starts_not_its_eta_with_the_limit() -> None:
    """max_local_wait_s bounds the queue before the job; its own run comes on top wherever it runs."""
    slow_card = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=10.0, run_s=70.0)
    decision = decide("dev", local=slow_card)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason == "local: queue wait ~10 s <= 60 s"
    assert (decision.wait_s, decision.eta_s) == (10.0, 80.0)
    queued_long = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=61.0, run_s=1.0)
    assert decide("dev", local=queued_long).reason.startswith("API: local wait 61 s > 60 s; ")


def test_the_reasons_wait_is_the_wait_not_the_eta() -> None:
    slow = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=240.0, run_s=60.0)
    decision = decide("dev", mode=Mode.RELAX, local=slow)
    assert decision.reason == "local (relax mode): about 4 min wait"
    assert (decision.wait_s, decision.eta_s) == (240.0, 300.0)
    full = BackendStatus(BackendKind.API, healthy=True, wait_s=36.0, run_s=18.0, in_flight=20, capacity=20)
    decision = decide("dev", local=LOCAL_SLOW, api=full)
    assert "(~36 s queue)" in decision.reason
    assert (decision.wait_s, decision.eta_s) == (36.0, 54.0)


def test_auto_counts_a_wait_equal_to_the_limit_as_short() -> None:
    assert decide("dev", local=BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=60.0)).backend is BackendKind.LOCAL


def test_auto_sends_a_long_wait_to_the_api_with_the_budget_left() -> None:
    decision = decide("dev", local=BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=140.0))
    assert decision.backend is BackendKind.API
    assert decision.reason == "API: local wait 140 s > 60 s; costs $0.025, $0.395 left this month"
    assert decision.eta_s == API.eta_s


def test_auto_never_prints_a_comparison_that_contradicts_itself() -> None:
    decision = decide("dev", local=BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=60.2))
    assert decision.backend is BackendKind.API
    assert "local wait 61 s > 60 s" in decision.reason


def test_auto_with_no_budget_limit_names_only_the_cost() -> None:
    decision = decide("dev", local=LOCAL_SLOW, room=UNLIMITED)
    assert decision.reason == "API: local wait 240 s > 60 s; costs $0.025"


def test_auto_uses_the_api_when_the_gpu_is_unavailable() -> None:
    down = BackendStatus(BackendKind.LOCAL, healthy=False, detail="worker restarting")
    assert decide("dev", local=down).reason.startswith("API: the local GPU is down (worker restarting); ")
    assert decide("dev", local=LOCAL_PAUSED).reason.startswith("API: the local GPU is paused; ")


def test_auto_queues_for_a_full_api_when_its_queue_is_shorter_than_the_gpus() -> None:
    """Found by bench/routing_sim.py: sending every job past a full API to the GPU built a 20-minute local queue
    while the API's own queue would have taken seconds."""
    decision = decide("dev", local=LOCAL_SLOW, api=API_FULL)
    assert decision.backend is BackendKind.API
    assert decision.reason == (
        "API: local wait 240 s > 60 s, queued: the API is at its limit of 20 jobs at once (~18 s queue);"
        " costs $0.025, $0.395 left this month"
    )
    assert decision.eta_s == API_FULL.eta_s


@pytest.mark.parametrize(
    ("api", "room", "why"),
    [
        (API_FULL_LONG, ROOM, "the API is at its limit of 20 jobs at once (~5 min queue)"),
        (API_DOWN, ROOM, "the API is down (HTTP 503)"),
        (BackendStatus(BackendKind.API, healthy=True, paused=True), ROOM, "the API is paused"),
        (API, BROKE, "the API needs $0.025 but only $0.01 is left this month"),
        (API, BudgetRoom(api_micros=-5_000, gpu_ms=None, images=None), "only $0.00 is left this month"),
    ],
)
def test_auto_takes_the_slow_lane_with_an_honest_eta(api: BackendStatus, room: BudgetRoom, why: str) -> None:
    decision = decide("dev", local=LOCAL_SLOW, api=api, room=room)
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason.startswith("local (slow lane): ")
    assert why in decision.reason
    assert decision.reason.endswith("; about 4 min wait")
    assert decision.eta_s == 240.0


def test_auto_spends_the_last_cent_of_a_budget() -> None:
    decision = decide("dev", local=LOCAL_SLOW, room=BudgetRoom(api_micros=25_000, gpu_ms=None, images=None))
    assert decision.backend is BackendKind.API
    assert decision.reason.endswith("costs $0.025, $0.00 left this month")


def test_refusal_says_what_is_wrong_on_both_sides_and_what_would_help() -> None:
    reason = refusal("both", model=BOTH, local=LOCAL_PAUSED, room=BROKE)
    assert reason == (
        "the local GPU is paused and the API needs $0.04 but only $0.01 is left this month: "
        "ask an admin for more budget or try later"
    )


def test_no_images_left_is_said_once() -> None:
    for images in (0, -3):
        reason = refusal("dev", room=BudgetRoom(api_micros=None, gpu_ms=None, images=images))
        assert reason == "you have no images left today: ask an admin for a higher limit or try tomorrow"


def test_images_left_allow_both_sides() -> None:
    room = BudgetRoom(api_micros=None, gpu_ms=None, images=1)
    assert decide("dev", room=room).backend is BackendKind.LOCAL
    assert decide("dev", local=LOCAL_SLOW, room=room).backend is BackendKind.API


def test_gpu_time_budget_must_cover_the_run_not_the_queue() -> None:
    # dev: 28 steps x 0.25 s = 7 s of GPU time; the 12 s ETA includes the queue and is not charged.
    exact = BudgetRoom(api_micros=None, gpu_ms=7_000, images=None)
    assert decide("dev", room=exact).backend is BackendKind.LOCAL
    short = BudgetRoom(api_micros=None, gpu_ms=3_500, images=None)
    decision = decide("dev", room=short)
    assert decision.backend is BackendKind.API
    assert "the local run needs 7 s of GPU time but only 3 s are left today" in decision.reason


def test_gpu_time_budget_and_api_budget_both_short_is_refused() -> None:
    room = BudgetRoom(api_micros=0, gpu_ms=0, images=None)
    reason = refusal("dev", room=room)
    assert "the local run needs 7 s of GPU time but only 0 s are left today" in reason
    assert "the API needs $0.025 but only $0.00 is left this month" in reason
    assert reason.endswith(": ask an admin for more GPU time, ask an admin for more budget or try tomorrow")


def test_estimates_follow_the_model_and_steps() -> None:
    schnell = decide("schnell")
    assert schnell.estimated_gpu_ms == 4 * 100  # 4 steps x 0.1 s
    assert schnell.estimated_cost_micros == 0
    pro = decide("pro")
    assert pro.estimated_cost_micros == 40_000
    assert pro.estimated_gpu_ms == 0


@pytest.mark.parametrize(
    ("eta", "said"),
    [(0.0, "0 s"), (44.2, "45 s"), (89.5, "90 s"), (90.0, "2 min"), (240.0, "4 min"), (5_399.0, "90 min"),
     (7_200.0, "2 h")],
)  # fmt: skip
def test_waits_are_said_in_friendly_units(eta: float, said: str) -> None:
    decision = decide("dev", mode=Mode.RELAX, local=BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=eta))
    assert decision.reason == f"local (relax mode): about {said} wait"


def test_a_fractional_wait_limit_is_printed_as_configured() -> None:
    routing = RoutingSettings(max_local_wait_s=30.5)
    assert decide("dev", routing=routing, local=LOCAL_SLOW).reason.startswith("API: local wait 240 s > 30.5 s; ")


# ---- rule 5: failover ----

LOCAL_FAILURES = {
    FailureReason.OOM: "the GPU worker ran out of memory",
    FailureReason.CRASH: "the GPU worker crashed",
    FailureReason.TIMEOUT: "the GPU worker timed out",
    FailureReason.HUNG: "the GPU worker hung",
    FailureReason.HOST_LOST: "its GPU host went offline",
}
API_FAILURES = {
    FailureReason.SERVER_ERROR: "the API failed with a server error",
    FailureReason.TIMEOUT: "the API timed out",
    FailureReason.RATE_LIMITED: "the API kept rate-limiting us",
    FailureReason.TASK_NOT_FOUND: "the API lost the task",
    FailureReason.OUT_OF_CREDITS: "the API account ran out of credits",
    FailureReason.AUTH: "the API refused our key",
}


@pytest.mark.parametrize(("failure", "what"), LOCAL_FAILURES.items())
def test_local_failure_gets_one_local_retry(failure: FailureReason, what: str) -> None:
    decision = rescue("dev", BackendKind.LOCAL, failure, local=LOCAL_SLOW)
    assert decision is not None
    assert decision.backend is BackendKind.LOCAL
    # The wait limit does not apply to a retry: waiting beats failing.
    assert decision.reason == f"local retry after {what}; about 4 min wait"
    assert decision.estimated_gpu_ms == 7_000


def test_local_failure_without_retries_left_goes_to_the_api() -> None:
    decision = rescue("dev", BackendKind.LOCAL, FailureReason.OOM, retries_left=0)
    assert decision is not None
    assert decision.backend is BackendKind.API
    assert decision.reason == (
        "API after the GPU worker ran out of memory (no local retries left); costs $0.025, $0.395 left this month"
    )
    assert decision.estimated_cost_micros == 25_000


def test_local_failure_with_the_gpu_now_paused_goes_to_the_api() -> None:
    decision = rescue("dev", BackendKind.LOCAL, FailureReason.CRASH, local=LOCAL_PAUSED)
    assert decision is not None
    assert decision.backend is BackendKind.API
    assert decision.reason.startswith("API after the GPU worker crashed (the local GPU is paused); ")


def test_local_failure_in_fast_mode_may_also_go_to_the_api() -> None:
    decision = rescue("dev", BackendKind.LOCAL, FailureReason.HUNG, mode=Mode.FAST, retries_left=0)
    assert decision is not None
    assert decision.backend is BackendKind.API


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("dev", {"mode": Mode.RELAX}),  # the user asked for free images
        ("dev", {"room": BROKE}),
        ("dev", {"api": API_DOWN}),
        ("dev", {"api": None}),
        ("dev", {"routing": RoutingSettings(api_enabled=False)}),
        ("schnell", {}),  # no API endpoint
    ],
)
def test_local_failure_with_no_retry_and_no_api_is_not_rescued(model: str, kwargs: dict[str, Any]) -> None:
    assert rescue(model, BackendKind.LOCAL, FailureReason.OOM, retries_left=0, **kwargs) is None


def test_a_rescue_waits_for_a_full_api() -> None:
    decision = rescue("dev", BackendKind.LOCAL, FailureReason.OOM, retries_left=0, api=API_FULL)
    assert decision is not None and decision.backend is BackendKind.API


@pytest.mark.parametrize(("failure", "what"), API_FAILURES.items())
def test_api_failure_falls_back_to_local(failure: FailureReason, what: str) -> None:
    decision = rescue("dev", BackendKind.API, failure, local=LOCAL_SLOW)
    assert decision is not None
    assert decision.backend is BackendKind.LOCAL
    assert decision.reason == f"local after {what}; about 4 min wait"
    assert decision.estimated_cost_micros == 0
    assert decision.eta_s == 240.0


def test_api_failure_after_the_local_attempts_are_spent_is_not_sent_back_to_the_gpu() -> None:
    # local fails, local fails again, the API fails: going back to the GPU now would start a loop.
    assert rescue("dev", BackendKind.API, FailureReason.SERVER_ERROR, retries_left=0) is None
    assert rescue("dev", BackendKind.API, FailureReason.SERVER_ERROR, retries_left=1) is not None


def test_api_failure_in_fast_mode_is_still_rescued_locally() -> None:
    decision = rescue("dev", BackendKind.API, FailureReason.SERVER_ERROR, mode=Mode.FAST)
    assert decision is not None
    assert decision.backend is BackendKind.LOCAL


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("pro", {}),  # API only
        ("dev", {"routing": RoutingSettings(commercial=True)}),  # the licence still holds in a rescue
        ("dev", {"routing": RoutingSettings(local_enabled=False)}),
        ("dev", {"local": None}),
        ("dev", {"local": LOCAL_PAUSED}),
        ("dev", {"room": BudgetRoom(api_micros=None, gpu_ms=1_000, images=None)}),
    ],
)
def test_api_failure_is_not_rescued_where_the_model_cannot_run_locally(model: str, kwargs: dict[str, Any]) -> None:
    assert rescue(model, BackendKind.API, FailureReason.SERVER_ERROR, **kwargs) is None


@pytest.mark.parametrize("failed_on", list(BackendKind))
def test_a_rescue_does_not_count_the_image_again(failed_on: BackendKind) -> None:
    # The job's own image was counted at submit and stays reserved; its last image must not block its rescue.
    room = BudgetRoom(api_micros=None, gpu_ms=None, images=0)
    decision = rescue("dev", failed_on, FailureReason.TIMEOUT, room=room)
    assert decision is not None
    assert decision.backend is BackendKind.LOCAL
    if failed_on is BackendKind.LOCAL:
        decision = rescue("dev", failed_on, FailureReason.TIMEOUT, retries_left=0, room=room)
        assert decision is not None
        assert decision.backend is BackendKind.API


@pytest.mark.parametrize("failed_on", list(BackendKind))
@pytest.mark.parametrize("failure", list(FailureReason))
def test_only_listed_failures_are_rescued_and_only_on_the_side_that_failed(
    failed_on: BackendKind, failure: FailureReason
) -> None:
    decision = rescue("dev", failed_on, failure, retries_left=1)
    rescuable = LOCAL_FAILURES if failed_on is BackendKind.LOCAL else API_FAILURES
    if failure in rescuable:
        assert decision is not None
    else:
        # Moderated and bad requests would fail anywhere; the rest are reported, not retried.
        assert decision is None


# ---- properties ----


# Most backends are up most of the time: with even odds on every flag nearly all examples were refusals, which
# prove nothing about where jobs go.
usually = st.sampled_from([True] * 7 + [False])
rarely = st.sampled_from([False] * 7 + [True])


@st.composite
def models(draw: st.DrawFn) -> ModelSettings:
    # Every model runs somewhere: local only, API only, or both.
    local, api_endpoint = draw(st.sampled_from([(True, None), (False, "flux-m"), (True, "flux-m")]))
    return ModelSettings(
        display_name="M",
        local=local,
        api_endpoint=api_endpoint,
        non_commercial=draw(st.booleans()),
        price_credits=draw(st.decimals(min_value=0, max_value=20, places=2)),
        local_seconds_per_step=draw(st.floats(min_value=0.01, max_value=5)),
    )


routings = st.builds(
    RoutingSettings,
    max_local_wait_s=st.floats(min_value=0, max_value=1_000),
    commercial=rarely,
    local_enabled=usually,
    api_enabled=usually,
)
limits = st.one_of(st.none(), st.integers(min_value=-100_000, max_value=1_000_000))


def statuses(kind: BackendKind) -> st.SearchStrategy[BackendStatus | None]:
    status = st.builds(
        BackendStatus,
        kind=st.just(kind),
        healthy=usually,
        paused=rarely,
        wait_s=st.floats(min_value=0, max_value=100_000),
        run_s=st.floats(min_value=0, max_value=1_000),
        in_flight=st.integers(min_value=0, max_value=8),
        capacity=st.integers(min_value=1, max_value=24),
    )
    return st.one_of(status, st.none())  # None: the backend is not configured


@settings(max_examples=300)
@given(
    model=models(),
    routing=routings,
    mode=st.sampled_from(Mode),
    steps=st.integers(min_value=1, max_value=50),
    local=statuses(BackendKind.LOCAL),
    api=statuses(BackendKind.API),
    room=st.builds(BudgetRoom, api_micros=limits, gpu_ms=limits, images=limits),
    failure=st.sampled_from(FailureReason),
    failed_on=st.sampled_from(BackendKind),
    retries_left=st.integers(min_value=0, max_value=2),
)
def test_route_and_failover_never_break_mode_capability_or_licence(
    model: ModelSettings,
    routing: RoutingSettings,
    mode: Mode,
    steps: int,
    local: BackendStatus | None,
    api: BackendStatus | None,
    room: BudgetRoom,
    failure: FailureReason,
    failed_on: BackendKind,
    retries_left: int,
) -> None:
    req = request("m", mode, steps)
    licence_forbids_local = model.non_commercial and routing.commercial

    def check(decision: RouteDecision) -> None:
        assert decision.reason
        if decision.backend is BackendKind.LOCAL:
            assert model.local
            assert not licence_forbids_local
            assert decision.estimated_cost_micros == 0
        else:
            assert model.api_endpoint is not None
            assert mode is not Mode.RELAX
            assert decision.estimated_gpu_ms == 0

    try:
        decision = route(req, "m", model, routing, local, api, room)
    except BackendUnavailable as refused:
        assert refused.reason
        event("refused")
    else:
        check(decision)
        event(f"routed {decision.backend}")
    rescued = failover(req, "m", model, routing, failed_on, failure, retries_left, local, api, room)
    if rescued is not None:
        check(rescued)
        event(f"rescued {rescued.backend}")


# ---- the GPU lane's size ----


def test_a_lane_of_several_gpus_names_its_size_in_the_reason() -> None:
    lane = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=20.0, in_flight=3, capacity=4)
    assert decide("dev", model=BOTH, local=lane).reason == (
        "local: queue wait ~20 s <= 60 s; GPU lane: 3 of 4 GPUs busy"
    )
    full = BackendStatus(BackendKind.LOCAL, healthy=True, wait_s=140.0, in_flight=4, capacity=4)
    assert decide("dev", model=BOTH, local=full).reason.startswith(
        "API: local wait 140 s > 60 s (GPU lane: 4 of 4 GPUs busy)"
    )


def test_a_lost_gpu_host_is_rescued_like_a_crashed_worker() -> None:
    decision = rescue("dev", BackendKind.LOCAL, FailureReason.HOST_LOST)
    assert decision is not None and decision.backend is BackendKind.LOCAL
    assert decision.reason.startswith("local retry after its GPU host went offline")
