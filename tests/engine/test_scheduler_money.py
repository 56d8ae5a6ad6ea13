"""Money through failovers and cancels: a job's cost is its posted ledger lines, whatever ending it reaches.

Each scenario scripts the API and GPU attempts (ScriptedBackend) and, where it says so, cancels the job at a
chosen moment; the invariant is checked the same way for every ending.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from bot import render
from engine.backends.bfl import RemoteTask
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    FailureReason,
    ImageRequest,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobState,
    Mode,
    Progress,
    Resource,
    ResumeToken,
    Submitted,
    format_usd,
)
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import Plan, ScriptedBackend, fail

UNLIMITED = {"default": {"concurrent_jobs": 100, "images_per_day": 1000, "api_usd_per_month": 100}}
TASK_COST = 25_000  # what BFL answered for the task at submit


def _task(job: BackendJob) -> ResumeToken:
    return RemoteTask(f"task-{job.job_id}", f"http://bfl.invalid/v1/get_result?id={job.job_id}", TASK_COST).token()


def _outcome(name: str, kind: BackendKind, job: BackendJob) -> list[BackendEvent] | None:
    """One scripted attempt: what a backend yields for it (None: the default success)."""
    match name:
        case "done":
            return None
        case "timeout":  # BFL accepted the task and it did not finish in time: billed
            return [Submitted(_task(job)), *fail(FailureReason.TIMEOUT, charged=TASK_COST)]
        case "moderated":
            return fail(FailureReason.MODERATED, retryable=False)
        case "download":  # billed, and not worth another try elsewhere
            return [Submitted(_task(job)), *fail(FailureReason.DOWNLOAD_FAILED, charged=TASK_COST)]
        case "server_error":  # nothing accepted, nothing billed
            return fail(FailureReason.SERVER_ERROR)
        case "no_result":  # accepted, then the backend ended without a word: our failure, BFL still bills
            return [Submitted(_task(job))]
        case "crash" | "oom":
            return fail(FailureReason(name))
        case "hold":  # still running (on the API: accepted) when the cancel comes
            return [Submitted(_task(job))] if kind is BackendKind.API else [Progress(1, 2)]
    raise AssertionError(name)


@dataclass
class Scenario:
    model: str
    mode: Mode
    api: list[str] = field(default_factory=list)  # attempt outcomes on each backend, in order
    local: list[str] = field(default_factory=list)
    cancel: str | None = None  # "queued": cancel once rerouted and waiting; "running": while an attempt holds
    expect: type[JobEvent] = JobDone
    charged: int = 0


SCENARIOS = {
    "api done": Scenario("pro", Mode.FAST, api=["done"], charged=40_000),
    "api moderated": Scenario("pro", Mode.FAST, api=["moderated"], expect=JobFailed),
    "api download failed": Scenario("pro", Mode.FAST, api=["download"], expect=JobFailed, charged=TASK_COST),
    "api accepted, then no result": Scenario("pro", Mode.FAST, api=["no_result"], expect=JobFailed, charged=TASK_COST),
    "api timeout, local done": Scenario("dev", Mode.FAST, api=["timeout"], local=["done"], charged=TASK_COST),
    "api 5xx, local done": Scenario("dev", Mode.FAST, api=["server_error"], local=["done"]),
    "api timeout, local crashes twice, api 5xx": Scenario(
        "dev", Mode.FAST, api=["timeout", "server_error"], local=["crash", "crash"], expect=JobFailed, charged=TASK_COST
    ),
    "local oom twice, api done": Scenario("dev", Mode.AUTO, local=["oom", "oom"], api=["done"], charged=40_000),
    "local oom twice, api timeout": Scenario(
        "dev", Mode.AUTO, local=["oom", "oom"], api=["timeout"], expect=JobFailed, charged=TASK_COST
    ),
    "api timeout, cancelled while queued locally": Scenario(
        "dev", Mode.FAST, api=["timeout"], cancel="queued", expect=JobCancelled, charged=TASK_COST
    ),
    "api timeout, cancelled while running locally": Scenario(
        "dev", Mode.FAST, api=["timeout"], local=["hold"], cancel="running", expect=JobCancelled, charged=TASK_COST
    ),
    "cancelled while BFL works on it": Scenario(
        "pro", Mode.FAST, api=["hold"], cancel="running", expect=JobCancelled, charged=TASK_COST
    ),
    "cancelled while queued": Scenario("schnell", Mode.AUTO, cancel="queued", expect=JobCancelled),
}


async def _posted_usd(engine: Engine, job_id: str) -> int:
    lines = await engine._store.job_ledger(job_id)
    return sum(
        line["amount"] for line in lines if line["entry"] == "settle" and line["resource"] == Resource.USD_MICROS.value
    )


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
async def test_cost_equals_posted_ledger_in_every_ending(
    make_engine: EngineFactory, make_settings: SettingsFactory, scenario: Scenario
) -> None:
    hold = asyncio.Event()  # never set: a "hold" attempt waits on it until the cancel

    def plan_of(kind: BackendKind, outcomes: list[str]) -> Plan:
        def plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
            if job.request.prompt == "blocker":
                return [Progress(1, 2)]  # holds the only GPU slot, so a rerouted job waits queued
            return _outcome(outcomes[attempt - 1], kind, job)

        return plan

    api_gate = hold if "hold" in scenario.api else None
    local_gate = hold if "hold" in scenario.local or scenario.cancel == "queued" else None
    api = ScriptedBackend(kind=BackendKind.API, slots=4, plan=plan_of(BackendKind.API, scenario.api), gate=api_gate)
    local = ScriptedBackend(plan=plan_of(BackendKind.LOCAL, scenario.local), gate=local_gate)
    settings = make_settings(tiers=UNLIMITED, routing={"max_local_wait_s": 60})
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api}, settings)
    if scenario.cancel == "queued":
        await engine.submit(user("bob"), ImageRequest("blocker", "schnell"))
        await local.started_event.wait()
    queued = await engine.submit(user(), ImageRequest("a teapot", scenario.model, mode=scenario.mode))

    if scenario.cancel is not None:
        wanted = JobState.QUEUED if scenario.cancel == "queued" else JobState.RUNNING
        backend = BackendKind.API if scenario.api == ["hold"] else BackendKind.LOCAL

        async def reached() -> None:
            while True:
                job = await engine._store.get_job(queued.job_id)
                seen = (api if backend is BackendKind.API else local).seen.get(queued.job_id, 0)
                ready = job.state is wanted and job.backend is backend
                if ready and (wanted is JobState.QUEUED or (seen and (backend is BackendKind.LOCAL or job.resume))):
                    return
                await asyncio.sleep(0.005)

        await asyncio.wait_for(reached(), 10)
        if wanted is JobState.QUEUED and scenario.api:
            assert api.seen[queued.job_id] == 1  # rerouted to the GPU after the billed API attempt
        cancelled = await engine.cancel(user(), queued.job_id)
        assert cancelled.charged_micros == scenario.charged

    ended = await wait_terminal(engine, queued.job_id)
    assert isinstance(ended, scenario.expect), ended
    job = await engine._store.get_job(queued.job_id)
    charged = ended.cost_micros if isinstance(ended, JobDone) else ended.charged_micros  # type: ignore[union-attr]
    assert charged == job.cost_micros == await _posted_usd(engine, queued.job_id) == scenario.charged
    assert await engine._store.open_reservations(queued.job_id) == []
    if isinstance(ended, JobCancelled) and scenario.charged:
        assert f"You were charged {format_usd(scenario.charged)}" in render.cancelled_text(ended)


async def test_a_billed_attempt_stays_in_the_cancel_message(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    """API timeout (billed), failover to the GPU, cancelled there while waiting: the message says what was paid."""
    api = ScriptedBackend(kind=BackendKind.API, plan=lambda job, a: _outcome("timeout", BackendKind.API, job))
    local = ScriptedBackend(
        plan=lambda job, a: [Progress(1, 2)] if job.request.prompt == "blocker" else None, gate=asyncio.Event()
    )
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api}, make_settings(tiers=UNLIMITED))
    await engine.submit(user("bob"), ImageRequest("blocker", "schnell"))
    await local.started_event.wait()
    queued = await engine.submit(user(), ImageRequest("a teapot", "dev", mode=Mode.FAST))

    async def rerouted() -> None:
        while (await engine._store.get_job(queued.job_id)).backend is not BackendKind.LOCAL:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(rerouted(), 10)
    cancelled = await engine.cancel(user(), queued.job_id)
    assert render.cancelled_text(cancelled) == (
        f"Job {queued.job_id} cancelled. You were charged $0.025: the image API had accepted it, and BFL bills a"
        " task it accepted."
    )
    assert (await engine.terminal_event(await engine._store.get_job(queued.job_id))) == cancelled


async def test_an_accepted_task_our_side_lost_is_posted_as_billed(make_engine: EngineFactory) -> None:
    """The backend ends after BFL accepted the task (our failure): BFL bills it, so the ledger says so too."""
    api = ScriptedBackend(kind=BackendKind.API, plan=lambda job, a: [Submitted(_task(job))])
    engine = await make_engine({BackendKind.API: api})
    queued = await engine.submit(user(), ImageRequest("a teapot", "pro"))
    failed = await wait_terminal(engine, queued.job_id)
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.INTERNAL
    assert failed.charged_micros == TASK_COST == await _posted_usd(engine, queued.job_id)
    assert "BFL bills its task" in failed.detail


async def test_a_restart_without_the_api_posts_the_accepted_task(make_settings: SettingsFactory) -> None:
    """Restarted with the BFL key removed: the stored task cannot be followed, but BFL bills it."""
    from engine.config import Secrets
    from engine.store import Store

    settings = make_settings(tiers=UNLIMITED)
    api = ScriptedBackend(kind=BackendKind.API, plan=lambda job, a: [Submitted(_task(job))], gate=asyncio.Event())
    first = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), {BackendKind.API: api})
    await first.start()
    queued = await first.submit(user(), ImageRequest("a lamp", "pro"))

    async def stored() -> None:
        while (await first._store.get_job(queued.job_id)).resume is None:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(stored(), 10)
    await first.close()
    second = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), {})
    await second.start()
    try:
        failed = await wait_terminal(second, queued.job_id)
        assert isinstance(failed, JobFailed) and failed.charged_micros == TASK_COST
        assert await _posted_usd(second, queued.job_id) == TASK_COST
        assert "no longer configured" in failed.detail
    finally:
        await second.close()
