"""Where a job runs: a pure function of the request, the model, the budgets and the backends' health and load.

No I/O and no clock: the scheduler gathers each backend's `BackendStatus` and the requester's `BudgetRoom`,
then asks. Every decision carries a reason a person can read, because users see it in chat and admins read it
in the audit log; a refusal says what would help instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.config import ModelSettings, RoutingSettings, StyleSettings
from engine.errors import BackendUnavailable
from engine.models import (
    BFL_ENDPOINTS,
    BackendKind,
    BackendStatus,
    BudgetRoom,
    FailureReason,
    Mode,
    ResolvedRequest,
    RouteDecision,
    Task,
    format_duration,
    format_usd,
)

# What each failure is called in a reason; only these failures can be rescued, on the side that failed.
_LOCAL_RESCUES: dict[FailureReason, str] = {
    FailureReason.OOM: "the GPU worker ran out of memory",
    FailureReason.CRASH: "the GPU worker crashed",
    FailureReason.TIMEOUT: "the GPU worker timed out",
    FailureReason.HUNG: "the GPU worker hung",
    FailureReason.HOST_LOST: "its GPU host went offline",
}
_API_RESCUES: dict[FailureReason, str] = {
    FailureReason.SERVER_ERROR: "the API failed with a server error",
    FailureReason.TIMEOUT: "the API timed out",
    FailureReason.RATE_LIMITED: "the API kept rate-limiting us",
    FailureReason.TASK_NOT_FOUND: "the API lost the task",
    FailureReason.OUT_OF_CREDITS: "the API account ran out of credits",
    FailureReason.AUTH: "the API refused our key",
}

_TRY_LATER = "try later"
_TRY_TOMORROW = "try tomorrow"
# Waiting is the fallback everyone has, so a refusal offers it after anything the user can do now.
_LAST_RESORTS = {_TRY_LATER: 1, _TRY_TOMORROW: 2}
_ASK_ADMIN = "ask an admin to set it up"


@dataclass(frozen=True, slots=True)
class _Blocker:
    """Why one backend cannot take the job, and what the user could do about it."""

    why: str
    fixes: tuple[str, ...]


_RELAX_WHY = "relax mode uses only the local GPU"


def route(
    request: ResolvedRequest,
    model_name: str,
    model: ModelSettings,
    routing: RoutingSettings,
    local: BackendStatus | None,
    api: BackendStatus | None,
    room: BudgetRoom,
    style: StyleSettings | None = None,
) -> RouteDecision:
    """Pick the backend for a new job, or raise `BackendUnavailable` saying what would help.

    `local` / `api` are None when that backend is not configured at all. `room` is what the requester may
    still spend across every limit that applies (None = no limit). `style` is the job's style, if any.
    """
    gpu_ms = _gpu_ms(request, model)
    cost = model.price_micros
    local_lane = _local_lane(model, routing, local, room, gpu_ms)
    api_lane = _api_lane(request, model, routing, api, room, cost, style)

    if request.mode is Mode.RELAX:
        if isinstance(local_lane, BackendStatus):
            return _local_decision(f"local (relax mode): {_wait(local_lane)}", local_lane, gpu_ms)
        # Only suggest leaving relax mode when the API really could take the job.
        leave_relax = ("switch to auto mode",) if isinstance(api_lane, BackendStatus) else ()
        raise BackendUnavailable(_refusal([local_lane, _Blocker(_RELAX_WHY, leave_relax)]))

    if request.mode is Mode.FAST:
        if isinstance(api_lane, BackendStatus):
            if _full(api_lane) and isinstance(local_lane, BackendStatus) and local_lane.eta_s < api_lane.eta_s:
                reason = f"local: fast mode, but {_queue(api_lane)}; {_wait(local_lane)}"
                return _local_decision(reason, local_lane, gpu_ms)
            return _api_decision(f"API: fast mode{_queued(api_lane)}; {_cost_note(cost, room)}", api_lane, cost)
        if isinstance(local_lane, BackendStatus):
            reason = f"local: fast mode, but {api_lane.why}; {_wait(local_lane)}"
            return _local_decision(reason, local_lane, gpu_ms)
        raise BackendUnavailable(_refusal([local_lane, api_lane]))

    # The limit is on the wait before the job starts; its own run comes on top, wherever it runs.
    limit = routing.max_local_wait_s
    if isinstance(local_lane, BackendStatus) and local_lane.wait_s <= limit:
        reason = f"local: queue wait ~{_seconds(local_lane.wait_s)} <= {_limit(limit)}"
        return _local_decision(reason, local_lane, gpu_ms)
    if isinstance(api_lane, BackendStatus):
        if isinstance(local_lane, BackendStatus):
            # With every API slot taken, the job waits in one queue or the other: the shorter one, the GPU on a tie.
            if _full(api_lane) and local_lane.eta_s <= api_lane.eta_s:
                reason = f"local (slow lane): {_queue(api_lane)}; {_wait(local_lane)}"
                return _local_decision(reason, local_lane, gpu_ms)
            why_not_local = f"local wait {_seconds(local_lane.wait_s)} > {_limit(limit)}"
            if size := _lane_size(local_lane):
                why_not_local = f"{why_not_local} ({size})"
        else:
            why_not_local = local_lane.why
        return _api_decision(f"API: {why_not_local}{_queued(api_lane)}; {_cost_note(cost, room)}", api_lane, cost)
    if isinstance(local_lane, BackendStatus):
        reason = f"local (slow lane): {api_lane.why}; {_wait(local_lane)}"
        return _local_decision(reason, local_lane, gpu_ms)
    raise BackendUnavailable(_refusal([local_lane, api_lane]))


def failover(
    request: ResolvedRequest,
    model_name: str,
    model: ModelSettings,
    routing: RoutingSettings,
    failed_on: BackendKind,
    failure: FailureReason,
    local_retries_left: int,
    local: BackendStatus | None,
    api: BackendStatus | None,
    room: BudgetRoom,
    style: StyleSettings | None = None,
) -> RouteDecision | None:
    """A new route for a job that failed on `failed_on`, or None when it should not (or cannot) be rescued.

    `room` should count this job's own open money and GPU-time reservations as room, since the rescue replaces
    them. The image itself was counted when the job was submitted and a rescue does not make another, so the
    image allowance is not checked again. The local wait limit does not apply: a rescue waits rather than fails.
    `local_retries_left` is how many more times this job may run locally; it bounds rescues in both directions,
    so a job cannot bounce between a failing GPU and a failing API.
    """
    gpu_ms = _gpu_ms(request, model)
    cost = model.price_micros
    room = replace(room, images=None)

    if failed_on is BackendKind.LOCAL and (what := _LOCAL_RESCUES.get(failure)):
        local_lane = _local_lane(model, routing, local, room, gpu_ms)
        if local_retries_left > 0 and isinstance(local_lane, BackendStatus):
            reason = f"local retry after {what}; {_wait(local_lane)}"
            return _local_decision(reason, local_lane, gpu_ms)
        # The user asked for free images: a paid rescue would break that promise.
        if request.mode is Mode.RELAX:
            return None
        api_lane = _api_lane(request, model, routing, api, room, cost, style)
        if not isinstance(api_lane, BackendStatus):
            return None
        why_not_local = local_lane.why if isinstance(local_lane, _Blocker) else "no local retries left"
        return _api_decision(f"API after {what} ({why_not_local}); {_cost_note(cost, room)}", api_lane, cost)

    if failed_on is BackendKind.API and (what := _API_RESCUES.get(failure)):
        # Fast mode asked for speed, not for the API at any price: a slower local image beats no image.
        local_lane = _local_lane(model, routing, local, room, gpu_ms)
        if local_retries_left <= 0 or not isinstance(local_lane, BackendStatus):
            return None
        return _local_decision(f"local after {what}; {_wait(local_lane)}", local_lane, gpu_ms)

    # Moderated and bad requests would fail the same way anywhere; other failures are reported, not retried.
    return None


def _local_lane(
    model: ModelSettings, routing: RoutingSettings, local: BackendStatus | None, room: BudgetRoom, gpu_ms: int
) -> BackendStatus | _Blocker:
    """The local status when the local GPU can take the job, else what blocks it."""
    if (images := _images_blocker(room)) is not None:
        return images
    if not model.local:
        # Another model helps only where this bot has a GPU lane to run it.
        other = ("choose a model that runs locally",) if local is not None and routing.local_enabled else ()
        return _Blocker(f"{model.display_name} runs only on the API", other)
    if model.non_commercial and routing.commercial:
        return _Blocker(
            f"{model.display_name} has a non-commercial licence, so this bot does not run it locally",
            ("choose a model with a commercial licence",),
        )
    if not routing.local_enabled:
        return _Blocker("local generation is turned off on this bot", (_ASK_ADMIN,))
    if local is None:
        return _Blocker("no local GPU worker is set up", (_ASK_ADMIN,))
    if not local.serves_model:
        return _Blocker(_with_detail(f"no GPU worker here runs {model.display_name}", local.detail), (_ASK_ADMIN,))
    if not local.healthy:
        return _Blocker(_with_detail("the local GPU is down", local.detail), (_TRY_LATER,))
    if local.paused:
        return _Blocker("the local GPU is paused", (_TRY_LATER,))
    if room.gpu_ms is not None and room.gpu_ms < gpu_ms:
        # Round the need up and the room down so the numbers shown never contradict the refusal.
        need, left = math.ceil(gpu_ms / 1000), room.gpu_ms // 1000
        return _Blocker(
            f"the local run needs {need} s of GPU time but only {left} s are left today",
            ("ask an admin for more GPU time", _TRY_TOMORROW),
        )
    return local


def _api_lane(
    request: ResolvedRequest,
    model: ModelSettings,
    routing: RoutingSettings,
    api: BackendStatus | None,
    room: BudgetRoom,
    cost: int,
    style: StyleSettings | None = None,
) -> BackendStatus | _Blocker:
    """The API status when the API can take the job, else what blocks it."""
    if (images := _images_blocker(room)) is not None:
        return images
    if style is not None and style.gpu_only:
        return _Blocker(
            f"the style {style.display_name} uses LoRA adapters, which run on the GPU lane only",
            ("choose a style without adapters for the API",),
        )
    if model.api_endpoint is None:
        other = ("choose a model that the API offers",) if api is not None and routing.api_enabled else ()
        return _Blocker(f"{model.display_name} runs only on the local GPU", other)
    limits = BFL_ENDPOINTS.get(model.api_endpoint)
    if request.input_image is not None and limits is not None and not (limits.input_image or limits.image_prompt):
        what = "varies no image" if request.task is Task.VARY else "takes no image to start from"
        return _Blocker(f"{model.display_name} on the API {what}", ("choose FLUX1.1 [pro], or Kontext to edit",))
    if not routing.api_enabled:
        return _Blocker("the API is turned off on this bot", (_ASK_ADMIN,))
    if api is None:
        return _Blocker("no BFL API key is set up", (_ASK_ADMIN,))
    if not api.healthy:
        return _Blocker(_with_detail("the API is down", api.detail), (_TRY_LATER,))
    if api.paused:
        return _Blocker("the API is paused", (_TRY_LATER,))
    if room.api_micros is not None and room.api_micros < cost:
        if room.api_budget:  # a budget shared with others: say whose, it is not the user's own
            return _Blocker(
                f"the API needs {format_usd(cost)} but {room.api_budget} has only {_usd(room.api_micros)} left",
                ("ask an admin to raise that budget",),
            )
        return _Blocker(
            f"the API needs {format_usd(cost)} but only {_usd(room.api_micros)} is left this month",
            ("ask an admin for more budget",),
        )
    return api


def _full(api: BackendStatus) -> bool:
    """Every API slot is taken: a job sent there now waits in flux-bot's queue for one (its wait_s says how long)."""
    return api.in_flight >= api.capacity


def _queue(api: BackendStatus) -> str:
    return f"the API is at its limit of {api.capacity} jobs at once (~{format_duration(api.wait_s)} queue)"


def _queued(api: BackendStatus) -> str:
    return f", queued: {_queue(api)}" if _full(api) else ""


def _images_blocker(room: BudgetRoom) -> _Blocker | None:
    # <= rather than == 0: an admin who lowers a limit below today's use leaves negative room.
    if room.images is not None and room.images <= 0:
        return _Blocker("you have no images left today", ("ask an admin for a higher limit", _TRY_TOMORROW))
    return None


def _refusal(blockers: list[_Blocker]) -> str:
    """'<why> and <why>: <fix>, <fix> or <fix>', each said once, with waiting offered last."""
    whys = list(dict.fromkeys(b.why for b in blockers))
    fixes = list(dict.fromkeys(fix for b in blockers for fix in b.fixes))
    fixes.sort(key=lambda fix: _LAST_RESORTS.get(fix, 0))
    text = _join(whys, "and")
    return f"{text}: {_join(fixes, 'or')}" if fixes else text


def _join(items: list[str], conjunction: str) -> str:
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _local_decision(reason: str, status: BackendStatus, gpu_ms: int) -> RouteDecision:
    if size := _lane_size(status):
        reason = f"{reason}; {size}"
    return RouteDecision(BackendKind.LOCAL, reason, estimated_gpu_ms=gpu_ms, eta_s=status.eta_s, wait_s=status.wait_s)


def _lane_size(status: BackendStatus) -> str:
    """How big and how busy the GPU lane is, where it has more than one GPU ("" for one: nothing to tell)."""
    if status.capacity <= 1:
        return ""
    return f"GPU lane: {min(status.in_flight, status.capacity)} of {status.capacity} GPUs busy"


def _api_decision(reason: str, status: BackendStatus, cost: int) -> RouteDecision:
    return RouteDecision(BackendKind.API, reason, estimated_cost_micros=cost, eta_s=status.eta_s, wait_s=status.wait_s)


def _gpu_ms(request: ResolvedRequest, model: ModelSettings) -> int:
    """The run part of a local job (the status's wait_s is the queue before it): what the GPU budget pays."""
    return round(request.steps * model.local_seconds_per_step * 1000)


def _cost_note(cost: int, room: BudgetRoom) -> str:
    if room.api_micros is None:
        return f"costs {format_usd(cost)}"
    return f"costs {format_usd(cost)}, {_usd(room.api_micros - cost)} left this month"


def _usd(micros: int) -> str:
    # Room goes negative when an admin lowers a limit below this month's spend: show that as "$0.00 left".
    return format_usd(max(micros, 0))


def _wait(status: BackendStatus) -> str:
    return f"about {format_duration(status.wait_s)} wait"


def _with_detail(text: str, detail: str) -> str:
    return f"{text} ({detail})" if detail else text


def _seconds(seconds: float) -> str:
    # Exact seconds, rounded up, where a wait is compared with the limit: for a whole-second limit the printed
    # comparison then always agrees with the one the router made.
    return f"{math.ceil(seconds)} s"


def _limit(seconds: float) -> str:
    return f"{int(seconds)} s" if int(seconds) == seconds else f"{seconds} s"
