"""The persistent queue: fairness, per-user caps, failover, cancellation and restart recovery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field

from engine.backends.base import Backend, Requeue, Resumption, Unresumable
from engine.backends.bfl import RemoteTask
from engine.backends.pool import GpuPool, Member
from engine.config import Secrets, Settings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    FailureReason,
    Finished,
    ImageRequest,
    JobCancelled,
    JobDone,
    JobFailed,
    JobRerouted,
    JobStarted,
    JobState,
    JobWaiting,
    Mode,
    Resource,
    Submitted,
)
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.engine.clocked import Clock
from tests.fakes.backends import ScriptedBackend, fail, tiny_png

UNLIMITED = {"default": {"concurrent_jobs": 100, "images_per_day": 1000}}


async def test_one_users_burst_does_not_block_others(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    local = ScriptedBackend(gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED))
    alice, bob = user("alice"), user("bob")
    burst = [await engine.submit(alice, ImageRequest(f"cat {i}", "schnell")) for i in range(6)]
    await local.started_event.wait()
    late = await engine.submit(bob, ImageRequest("a dog", "schnell"))
    assert local.gate is not None
    local.gate.set()
    for queued in [*burst, late]:
        assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
    # Alice's first job was already running; Bob's job is the very next one, ahead of her 5 others.
    assert local.started[:2] == [burst[0].job_id, late.job_id]


async def test_per_user_running_cap(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    local = ScriptedBackend(slots=4, gate=asyncio.Event())
    settings = make_settings(tiers=UNLIMITED, scheduler={"max_running_per_user": 1})
    engine = await make_engine({BackendKind.LOCAL: local}, settings)
    alice, bob = user("alice"), user("bob")
    jobs = [await engine.submit(alice, ImageRequest(f"cat {i}", "schnell")) for i in range(4)]
    jobs.append(await engine.submit(bob, ImageRequest("a dog", "schnell")))
    while local.in_flight < 2:
        await asyncio.sleep(0.01)
    assert local.in_flight == 2  # one of Alice's and Bob's, though 4 slots are free
    assert local.gate is not None
    local.gate.set()
    for queued in jobs:
        await wait_terminal(engine, queued.job_id)
    assert local.max_in_flight == 2


async def test_local_oom_is_retried_locally_once(make_engine: EngineFactory) -> None:
    def plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        return fail(FailureReason.OOM) if attempt == 1 else None

    local = ScriptedBackend(plan=plan)
    engine = await make_engine({BackendKind.LOCAL: local})
    queued = await engine.submit(user(), ImageRequest("a teapot", "schnell"))
    seen = [event async for event in engine.events(queued.job_id)]
    assert any(isinstance(e, JobRerouted) and "local retry" in e.route.reason for e in seen)
    assert isinstance(seen[-1], JobDone) and seen[-1].cost_micros == 0
    job = await engine._store.get_job(queued.job_id)
    assert job.attempts == 2 and job.local_attempts == 2
    ledger = await engine._store.job_ledger(queued.job_id)
    gpu = [line for line in ledger if line["resource"] == "gpu_ms"]
    assert [line["entry"] for line in gpu] == ["reserve", "void", "reserve", "settle"]  # the failed try is free


async def test_local_failures_fail_over_to_the_api(make_engine: EngineFactory) -> None:
    local = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.CRASH))
    api = ScriptedBackend(kind=BackendKind.API, slots=4)
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api})
    queued = await engine.submit(user(), ImageRequest("a teapot", "dev"))
    assert queued.route.backend is BackendKind.LOCAL
    done = await wait_terminal(engine, queued.job_id)
    assert isinstance(done, JobDone) and done.backend is BackendKind.API and done.cost_micros == 40_000
    assert local.seen[queued.job_id] == 2  # the first try and one local retry, then the API


async def test_billed_api_timeout_fails_over_locally_and_stays_charged(make_engine: EngineFactory) -> None:
    api = ScriptedBackend(
        kind=BackendKind.API, slots=4, plan=lambda job, attempt: fail(FailureReason.TIMEOUT, charged=25_000)
    )
    local = ScriptedBackend()
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api})
    queued = await engine.submit(user(), ImageRequest("a teapot", "dev", mode=Mode.FAST))
    assert queued.route.backend is BackendKind.API
    done = await wait_terminal(engine, queued.job_id)
    assert isinstance(done, JobDone) and done.backend is BackendKind.LOCAL
    assert done.cost_micros == 25_000  # what BFL billed for the timed-out task
    settled = [line for line in await engine._store.job_ledger(queued.job_id) if line["entry"] == "settle"]
    assert sorted((line["resource"], line["amount"]) for line in settled) == [
        ("gpu_ms", 1500),
        ("images", 1),
        ("usd_micros", 25_000),
    ]


async def test_moderation_is_not_retried_nor_charged(make_engine: EngineFactory) -> None:
    api = ScriptedBackend(kind=BackendKind.API, plan=lambda job, a: fail(FailureReason.MODERATED, retryable=False))
    local = ScriptedBackend()
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api})
    queued = await engine.submit(user(), ImageRequest("something", "dev", mode=Mode.FAST))
    failed = await wait_terminal(engine, queued.job_id)
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.MODERATED and failed.charged_micros == 0
    assert local.started == []
    view = await engine.quota_view(user())
    assert [line.used for line in view.lines] == [0, 0, 0]


async def test_cancel_queued_and_running(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    local = ScriptedBackend(gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED))
    alice = user()
    running = await engine.submit(alice, ImageRequest("first", "schnell"))
    waiting = await engine.submit(alice, ImageRequest("second", "schnell"))
    await local.started_event.wait()
    assert await engine.cancel(alice, waiting.job_id) == JobCancelled(waiting.job_id, 0)
    cancelled = await engine.cancel(alice, running.job_id)
    assert cancelled.charged_micros == 0
    for job_id in (running.job_id, waiting.job_id):
        assert (await engine._store.get_job(job_id)).state is JobState.CANCELLED
        assert await engine._store.open_reservations(job_id) == []
    assert local.started == [running.job_id]


async def test_restart_recovers_every_job_exactly_once(make_settings: SettingsFactory) -> None:
    """Stop the engine with jobs queued and running; a new engine on the same database finishes each once."""
    settings = make_settings(tiers=UNLIMITED, scheduler={"max_running_per_user": 3})
    submitted_tasks: dict[str, RemoteTask] = {}

    def api_first_life(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        task = RemoteTask(f"task-{job.job_id}", f"http://127.0.0.1:1/v1/get_result?id={job.job_id}", 40_000)
        submitted_tasks[job.job_id] = task
        return [Submitted(task.token())]  # accepted, then the process stops while it is waiting

    hold = asyncio.Event()
    local1 = ScriptedBackend(gate=hold)
    api1 = ScriptedBackend(kind=BackendKind.API, slots=2, plan=api_first_life, gate=hold)
    store = await Store.open(settings.bot.database_path)
    first = Engine(settings, Secrets(), store, {BackendKind.LOCAL: local1, BackendKind.API: api1})
    await first.start()
    alice, bob = user("alice"), user("bob")
    local_jobs = [await first.submit(who, ImageRequest("a lamp", "schnell")) for who in (alice, bob, alice)]
    api_jobs = [await first.submit(who, ImageRequest("a lamp", "pro")) for who in (alice, bob)]

    async def both_running() -> None:
        while len(submitted_tasks) < 2 or not local1.started:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(both_running(), 10)
    await asyncio.sleep(0.05)  # let the API jobs' task ids reach the database
    await first.close()

    resumed: list[RemoteTask | None] = []

    def api_second_life(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        resumed.append(RemoteTask.from_token(job.resume) if job.resume else None)
        return [Finished(tiny_png(), "image/png", job.request.seed, cost_micros=40_000)]

    local2 = ScriptedBackend()
    api2 = ScriptedBackend(kind=BackendKind.API, slots=2, plan=api_second_life)
    store2 = await Store.open(settings.bot.database_path)
    second = Engine(settings, Secrets(), store2, {BackendKind.LOCAL: local2, BackendKind.API: api2})
    terminal_events = []

    async def collect() -> None:
        async for event in second.all_events():
            if isinstance(event, (JobDone, JobFailed, JobCancelled)):
                terminal_events.append(event.job_id)

    collector = asyncio.create_task(collect())
    await second.start()
    try:
        all_ids = [q.job_id for q in [*local_jobs, *api_jobs]]
        for job_id in all_ids:
            assert isinstance(await wait_terminal(second, job_id), JobDone)
        await asyncio.sleep(0.05)
        assert sorted(terminal_events) == sorted(all_ids)  # exactly one terminal event per job
        assert sorted(t.task_id for t in resumed if t) == sorted(f"task-{q.job_id}" for q in api_jobs)
        assert None not in resumed  # the API tasks were polled again, never submitted twice
        for job_id in all_ids:
            assert await second._store.open_reservations(job_id) == []
        usd = await second._store.ledger_totals()
        assert usd[Resource.USD_MICROS.value] == 2 * 40_000
        assert usd[Resource.IMAGES.value] == 5
    finally:
        collector.cancel()
        await second.close()


@dataclass
class _Answering(ScriptedBackend):
    """An API backend whose `resume` gives, per job, the answer a test scripts (continue, queue again, give up)."""

    answers: dict[str, str] = field(default_factory=dict)  # job id -> "continue" | "requeue" | "unresumable"
    asked: list[BackendJob] = field(default_factory=list)

    def resume(self, job: BackendJob) -> Resumption:
        self.asked.append(job)
        match self.answers[job.job_id]:
            case "requeue":
                return Requeue("queued again: the remote never had it")
            case "unresumable":
                return Unresumable("the remote has lost it")
        return self.run(job)


async def test_recover_does_what_each_jobs_backend_says(make_settings: SettingsFactory) -> None:
    """recover() asks each running job's backend through `resume` and follows the answer, whatever the backend."""
    settings = make_settings(tiers=UNLIMITED, scheduler={"max_running_per_user": 10})
    hold = asyncio.Event()
    tasks: dict[str, RemoteTask] = {}

    def accepted(job: BackendJob, attempt: int) -> list[BackendEvent]:
        tasks[job.job_id] = RemoteTask(
            f"task-{job.job_id}", f"http://127.0.0.1:1/v1/get_result?id={job.job_id}", 30_000
        )
        return [Submitted(tasks[job.job_id].token())]

    local1 = ScriptedBackend(gate=hold)
    api1 = ScriptedBackend(kind=BackendKind.API, slots=3, plan=accepted, gate=hold)
    first = Engine(
        settings,
        Secrets(),
        await Store.open(settings.bot.database_path),
        {BackendKind.LOCAL: local1, BackendKind.API: api1},
    )
    await first.start()
    api_jobs = [(await first.submit(user(), ImageRequest("a lamp", "pro"))).job_id for _ in range(3)]
    local_job = (await first.submit(user(), ImageRequest("a lamp", "schnell"))).job_id

    async def all_running() -> None:
        while len(tasks) < 3 or not local1.started:
            await asyncio.sleep(0.01)
        while any([(await first._store.get_job(job_id)).resume is None for job_id in api_jobs]):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(all_running(), 10)
    await first.close()

    api2 = _Answering(kind=BackendKind.API, slots=3)
    api2.answers = dict(zip(api_jobs, ("continue", "requeue", "unresumable"), strict=True))
    local2 = ScriptedBackend()
    pool = GpuPool([Member("in-host", local2)], settings.models)
    second = Engine(
        settings,
        Secrets(),
        await Store.open(settings.bot.database_path),
        {BackendKind.LOCAL: pool, BackendKind.API: api2},
    )
    await second.start()
    try:
        continued, requeued, lost = [await wait_terminal(second, job_id) for job_id in api_jobs]
        assert isinstance(await wait_terminal(second, local_job), JobDone)
        assert local2.started == [local_job]  # the pool had no token for it: its member ran it from the start
        # Every API job was asked about with the token its first life stored.
        assert [(job.job_id, job.resume) for job in api2.asked] == [(i, tasks[i].token()) for i in api_jobs]
        assert isinstance(continued, JobDone) and continued.cost_micros == 40_000
        # Queued again, it ran anew: no token this time, and only this run's cost.
        assert isinstance(requeued, JobDone) and requeued.cost_micros == 40_000
        assert sorted(api2.started) == sorted(api_jobs[:2])
        # Given up: the remote had accepted it, so what the token says it bills is posted and explained.
        assert isinstance(lost, JobFailed) and lost.reason is FailureReason.INTERRUPTED
        assert lost.charged_micros == 30_000
        assert lost.detail == f"the remote has lost it; BFL bills its task task-{api_jobs[2]}"
        assert (await second._store.ledger_totals())[Resource.USD_MICROS.value] == 2 * 40_000 + 30_000
    finally:
        await second.close()


@dataclass
class _SubmitInFlight(ScriptedBackend):
    """An API backend stopped mid-submit: BFL has accepted the task (and bills it); its answer is on the way."""

    sent: asyncio.Event = field(default_factory=asyncio.Event)
    answer: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        self.sent.set()
        await self.answer.wait()
        task = RemoteTask(f"task-{job.job_id}", f"http://127.0.0.1:1/v1/get_result?id={job.job_id}", 40_000)
        yield Submitted(task.token())
        await asyncio.Event().wait()  # polling, until the engine stops


async def test_a_stop_during_an_api_submit_keeps_the_task_so_its_bill_is_posted(make_settings: SettingsFactory) -> None:
    """Found by bench/chaos.py: a stop that cut the submit off lost a task that BFL billed, with nothing posted."""
    settings = make_settings(tiers=UNLIMITED)
    api1 = _SubmitInFlight(kind=BackendKind.API)
    first = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), {BackendKind.API: api1})
    await first.start()
    queued = await first.submit(user(), ImageRequest("a lamp", "pro"))
    await api1.sent.wait()
    closing = asyncio.create_task(first.close())
    await asyncio.sleep(0)  # close() runs up to its first wait; only then does BFL's answer arrive
    api1.answer.set()
    await closing

    resumed: list[RemoteTask | None] = []

    def poll_again(job: BackendJob, attempt: int) -> list[BackendEvent]:
        resumed.append(RemoteTask.from_token(job.resume) if job.resume else None)
        return [Finished(tiny_png(), "image/png", job.request.seed, cost_micros=40_000)]

    api2 = ScriptedBackend(kind=BackendKind.API, plan=poll_again)
    second = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), {BackendKind.API: api2})
    await second.start()
    try:
        assert isinstance(await wait_terminal(second, queued.job_id), JobDone)
        assert [task.task_id if task else None for task in resumed] == [f"task-{queued.job_id}"]
        assert (await second._store.ledger_totals())[Resource.USD_MICROS.value] == 40_000
    finally:
        await second.close()


async def test_a_cancel_holding_a_stale_queued_copy_stops_the_running_job(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    """Found by the alerts work: a cancel that read the job as queued ended it in the database while its backend
    task ran on, holding the GPU slot for good (and, for an API job, dropping what BFL would bill)."""
    local = ScriptedBackend(gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED))
    queued = await engine.submit(user(), ImageRequest("a lamp", "schnell"))
    stale = await engine._store.get_job(queued.job_id)
    assert stale.state is JobState.QUEUED
    await local.started_event.wait()  # the dispatcher has marked it running and started it meanwhile

    assert await engine._scheduler.cancel(stale, "discord:alice") == JobCancelled(queued.job_id, 0)
    assert local.in_flight == 0  # the generation was stopped, not left running
    assert engine._scheduler.running_count() == 0
    assert (await engine._store.get_job(queued.job_id)).state is JobState.CANCELLED
    # The slot is free: the next job runs.
    local.gate.set()
    follow = await engine.submit(user(), ImageRequest("a second lamp", "schnell"))
    assert isinstance(await wait_terminal(engine, follow.job_id), JobDone)


async def test_a_cancel_during_an_api_submit_posts_what_bfl_bills(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    """Cancelling while the submit is in flight waits for BFL's answer, so the billed task is charged, not lost."""
    api = _SubmitInFlight(kind=BackendKind.API)
    engine = await make_engine({BackendKind.API: api}, make_settings(tiers=UNLIMITED))
    queued = await engine.submit(user(), ImageRequest("a lamp", "pro"))
    await api.sent.wait()
    cancelling = asyncio.create_task(engine.cancel(user(), queued.job_id))

    async def cancel_requested() -> None:
        while queued.job_id not in engine._scheduler._cancel_requested:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(cancel_requested(), 10)  # the cancel has reached the job; BFL's answer comes only now
    api.answer.set()
    cancelled = await cancelling
    assert cancelled == JobCancelled(queued.job_id, 40_000)
    assert (await engine._store.ledger_totals())[Resource.USD_MICROS.value] == 40_000


# ---- where a queued job stands: position and ETA ----


@contextlib.asynccontextmanager
async def _engine_at(
    clock: Clock, backends: Mapping[BackendKind, Backend], settings: Settings
) -> AsyncIterator[Engine]:
    """An engine on a clock the test moves: how long a running job has been at it is then exact."""
    engine = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), backends, clock=clock)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def _until_started(backend: ScriptedBackend, job_id: str) -> None:
    for _ in range(1000):
        if job_id in backend.started:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} never started")


async def test_an_eta_counts_what_the_running_job_has_left(make_settings: SettingsFactory) -> None:
    clock = Clock(1_000_000.0)
    local = ScriptedBackend(seconds_per_job=10.0, gate=asyncio.Event())
    async with _engine_at(clock, {BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED)) as engine:
        first = await engine.submit(user("alice"), ImageRequest("a cat", "schnell"))
        await _until_started(local, first.job_id)
        clock.now += 4.0  # 6 of its 10 s are left
        queued = await engine.submit(user("bob"), ImageRequest("a dog", "schnell"))
        assert (queued.position, queued.wait_s, queued.eta_s) == (0, 6.0, 16.0)
        assert queued.route.reason == "local: queue wait ~6 s <= 15 s"
        clock.now += 20.0  # past its estimate: slow for a reason, so taken to need as long again
        later = await engine.submit(user("carol"), ImageRequest("a cow", "schnell"))
        assert (later.position, later.wait_s, later.eta_s) == (1, 20.0, 30.0)


async def test_a_users_own_held_back_jobs_count_in_place_and_eta(make_settings: SettingsFactory) -> None:
    """max_running_per_user = 1 on a two-slot GPU: Alice's queued jobs wait for her running one, one at a time,
    while Bob's job takes the free slot at once, though it was submitted last."""
    clock = Clock(1_000_000.0)
    local = ScriptedBackend(slots=2, seconds_per_job=10.0, gate=asyncio.Event())
    settings = make_settings(tiers=UNLIMITED, scheduler={"max_running_per_user": 1})
    async with _engine_at(clock, {BackendKind.LOCAL: local}, settings) as engine:
        alice = user("alice")
        jobs = [await engine.submit(alice, ImageRequest(f"cat {i}", "schnell", mode=Mode.RELAX)) for i in range(3)]
        await _until_started(local, jobs[0].job_id)
        fourth = await engine.submit(alice, ImageRequest("cat 3", "schnell", mode=Mode.RELAX))
        assert (fourth.position, fourth.wait_s, fourth.eta_s) == (2, 30.0, 40.0)
        assert fourth.route.reason == "local (relax mode): about 30 s wait; GPU lane: 1 of 2 GPUs busy"
        bobs = await engine.submit(user("bob"), ImageRequest("a dog", "schnell"))
        assert (bobs.position, bobs.wait_s, bobs.eta_s) == (0, 0.0, 10.0)
        await _until_started(local, bobs.job_id)
        assert local.started == [jobs[0].job_id, bobs.job_id]


async def test_the_position_is_the_fair_order_not_the_row_order(make_settings: SettingsFactory) -> None:
    """Round-robin: users never served go before Bob's second job, though it was submitted earlier."""
    clock = Clock(1_000_000.0)
    local = ScriptedBackend(seconds_per_job=10.0, gate=asyncio.Event())
    async with _engine_at(clock, {BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED)) as engine:
        bob = user("bob")
        first = await engine.submit(bob, ImageRequest("dog 1", "schnell", mode=Mode.RELAX))
        await _until_started(local, first.job_id)
        carols = await engine.submit(user("carol"), ImageRequest("a cow", "schnell", mode=Mode.RELAX))
        alices = await engine.submit(user("alice"), ImageRequest("a cat", "schnell", mode=Mode.RELAX))
        second = await engine.submit(bob, ImageRequest("dog 2", "schnell", mode=Mode.RELAX))
        daves = await engine.submit(user("dave"), ImageRequest("a yak", "schnell", mode=Mode.RELAX))
        assert [q.position for q in (carols, alices, second, daves)] == [0, 1, 2, 2]
        assert (daves.wait_s, daves.eta_s) == (30.0, 40.0)
        assert local.gate is not None
        local.gate.set()
        for queued in (first, carols, alices, second, daves):
            await wait_terminal(engine, queued.job_id)
        assert local.started == [q.job_id for q in (first, carols, alices, daves, second)]


async def test_waiting_jobs_are_told_their_new_place_when_the_queue_moves(make_settings: SettingsFactory) -> None:
    clock = Clock(1_000_000.0)
    local = ScriptedBackend(seconds_per_job=10.0, gate=asyncio.Event())
    async with _engine_at(clock, {BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED)) as engine:
        bob = user("bob")
        first = await engine.submit(bob, ImageRequest("a dog", "schnell", mode=Mode.RELAX))
        await _until_started(local, first.job_id)
        carols = await engine.submit(user("carol"), ImageRequest("a cow", "schnell", mode=Mode.RELAX))
        alices = await engine.submit(user("alice"), ImageRequest("a cat", "schnell", mode=Mode.RELAX))
        assert (alices.position, alices.eta_s) == (1, 30.0)
        seen: list[JobWaiting] = []

        async def follow() -> None:
            async for event in engine.events(alices.job_id):
                if isinstance(event, JobWaiting):
                    seen.append(event)
                    return
                assert not isinstance(event, JobStarted)

        following = asyncio.create_task(follow())
        await engine.cancel(bob, first.job_id)  # the queue moves: Carol's job starts, Alice's is next
        await _until_started(local, carols.job_id)
        await asyncio.wait_for(following, 10)  # within the update interval: a round comes once it is up
        assert seen == [JobWaiting(alices.job_id, 0, 10.0, 20.0)]
