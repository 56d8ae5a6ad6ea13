"""The persistent queue: fair dispatch to backends, failover, cancellation and restart recovery.

The queue *is* the jobs table: a job is `queued` until the dispatcher hands it to a backend, and every transition
is one SQLite write, so stopping the process at any point loses nothing. On start, `recover()` takes up what the
last process left running: an API task whose polling URL was stored is polled again (never resubmitted); a local
job is queued again once, then failed and refunded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

from engine import router
from engine.backends.base import Backend
from engine.config import Settings
from engine.errors import InvalidRequest, JobNotFound, QuotaExceeded
from engine.models import (
    BackendJob,
    BackendKind,
    BackendStatus,
    BudgetRoom,
    Failed,
    FailureReason,
    Finished,
    Job,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobProgress,
    JobQueued,
    JobRerouted,
    JobStarted,
    JobState,
    Progress,
    RemoteTask,
    ResolvedRequest,
    Resource,
    RouteDecision,
    Started,
    Submitted,
)
from engine.quota import Quota
from engine.results import annotated
from engine.store import AuditEntry, OpenReservation, QueuedJob, Store

log = logging.getLogger("flux_bot.scheduler")

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class Scheduler:
    def __init__(
        self,
        store: Store,
        quota: Quota,
        settings: Settings,
        backends: Mapping[BackendKind, Backend],
        publish: Callable[[JobEvent], None],
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._quota = quota
        self._settings = settings
        self._backends = dict(backends)
        self._publish = publish
        self._clock = clock
        self.paused: set[BackendKind] = set()
        self._running: dict[str, tuple[BackendKind, str, asyncio.Task[None]]] = {}  # job id -> (kind, user, task)
        self._last_dispatch: dict[str, float] = {}
        self._cancel_requested: set[str] = set()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        # API jobs that may have reached BFL but have no stored task yet: set once it is stored or the job ends.
        self._unconfirmed: dict[str, asyncio.Event] = {}
        self._transitions = asyncio.Lock()

    # ---- life cycle ----

    async def start(self) -> None:
        self._settings.bot.images_dir.mkdir(parents=True, exist_ok=True)
        await self.recover()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="flux-bot dispatcher")
        self.wake()

    async def stop(self) -> None:
        """Stop dispatching and abandon running attempts *without* ending them: the next start recovers them.

        An API submit in flight first gets to store its task (see `_until_submits_land`), so it is polled, not lost.
        """
        self._stopping = True
        async with self._transitions:  # never between marking a job running and starting its task
            if self._dispatcher:
                self._dispatcher.cancel()
        await self._until_submits_land()
        tasks = [task for _, _, task in self._running.values()]
        if self._dispatcher:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    def wake(self) -> None:
        self._wakeup.set()

    # ---- what the service asks ----

    def backend(self, kind: BackendKind) -> Backend | None:
        return self._backends.get(kind)

    def backend_count(self) -> int:
        return len(self._backends)

    def running_count(self, kind: BackendKind | None = None) -> int:
        return sum(1 for k, _, _ in self._running.values() if kind is None or k is kind)

    async def status(self, kind: BackendKind, request: ResolvedRequest | None) -> BackendStatus | None:
        """The backend's own health and load, with the admin's pause switch and the queue ahead applied."""
        backend = self._backends.get(kind)
        if backend is None:
            return None
        queued_ahead = await self._store.count_jobs(JobState.QUEUED, kind)
        status = backend.status(queued_ahead, request)
        if kind in self.paused:
            return BackendStatus(
                kind=status.kind,
                healthy=status.healthy,
                paused=True,
                eta_s=status.eta_s,
                in_flight=status.in_flight,
                capacity=status.capacity,
                detail="paused by an admin",
            )
        return status

    async def cancel(self, job: Job, actor: str) -> JobCancelled:
        """Cancel a queued job at once; a running one is stopped and ends through its own task."""
        async with self._transitions:
            # Read again under the lock: the caller's copy may say queued while the dispatcher has just started it.
            job = await self._store.get_job(job.id)
            if job.state is JobState.QUEUED:
                closes = self._quota.closes_for_cancel(await self._store.open_reservations(job.id), 0)
                # A job queued again after a billed API attempt (a timeout, then a failover) has already paid.
                charged = await self._charged(job.id)
                ended = await self._store.finish_job(
                    job.id,
                    JobState.CANCELLED,
                    closes,
                    now=self._clock(),
                    cost_micros=charged,
                    audit=AuditEntry(actor, "job.cancel", job.requester.user_key, job.id),
                )
                if ended:
                    event = JobCancelled(job.id, charged)
                    self._publish(event)
                    return event
                job = await self._store.get_job(job.id)
            running = self._running.get(job.id)
        if job.state is not JobState.RUNNING or running is None:
            raise InvalidRequest(f"job {job.id} has already ended ({job.state.value})", field="job")
        self._cancel_requested.add(job.id)
        # An API submit in flight may already be billed: let it store its task first, so the charge is posted.
        await self._until_submits_land([job.id])
        task = running[2]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        job = await self._store.get_job(job.id)
        await self._store.audit(AuditEntry(actor, "job.cancel", job.requester.user_key, job.id))
        return JobCancelled(job.id, job.cost_micros)

    async def _until_submits_land(self, job_ids: list[str] | None = None) -> None:
        """Wait (up to one request timeout) until these running API jobs (default: all) have stored their task or ended.

        BFL bills a task from the moment it accepts it, but only a stored task lets the next start poll it and post
        the charge: a job cut off between its submit and that write would be billed with no trace in the ledger.
        """
        events = (
            self._unconfirmed
            if job_ids is None
            else {i: self._unconfirmed[i] for i in job_ids if i in self._unconfirmed}
        )
        waits = [event.wait() for event in events.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self._settings.bfl.request_timeout_s)

    def _confirm(self, job_id: str) -> None:
        event = self._unconfirmed.pop(job_id, None)
        if event is not None:
            event.set()

    # ---- recovery ----

    async def recover(self) -> None:
        for job in await self._store.jobs(states=[JobState.RUNNING]):
            if job.backend is BackendKind.API and job.task is not None and BackendKind.API in self._backends:
                log.info("job %s: polling API task %s again after a restart", job.id, job.task.task_id)
                self._spawn(job, resumed=True)
            elif job.backend is BackendKind.LOCAL and job.local_attempts <= self._settings.scheduler.local_retries:
                log.info("job %s: queued again after a restart", job.id)
                await self._store.requeue(job.id, "queued again after a restart")
            else:
                if job.backend is BackendKind.LOCAL:
                    why = "flux-bot stopped during this job twice"
                elif job.task is None:
                    why = "flux-bot stopped before the API confirmed this job"
                else:
                    why = f"the BFL API is no longer configured, so its task {job.task.task_id} could not be followed"
                log.warning("job %s: failed after a restart: %s", job.id, why)
                await self._fail(job, _lost(FailureReason.INTERRUPTED, why, job.task))

    # ---- dispatch ----

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._dispatch_once()
            except Exception:
                log.exception("dispatch failed; retrying in 1 s")
                await asyncio.sleep(1)
                self.wake()

    async def _dispatch_once(self) -> None:
        for kind, backend in self._backends.items():
            if kind in self.paused:
                continue
            free = backend.capacity() - self.running_count(kind)
            if free <= 0:
                continue
            # Only ids and users for the pick: mark_running reads the picked jobs' full rows.
            queued = await self._store.queued(kind, limit=1000)
            for job in self._fair_pick(queued, free):
                # Marking a job running and starting its task are one step for cancel() and stop().
                async with self._transitions:
                    try:
                        running = await self._store.mark_running(job.id, self._clock())
                    except JobNotFound:
                        continue  # cancelled meanwhile
                    self._spawn(running, resumed=False)

    def _fair_pick(self, queued: list[QueuedJob], free: int) -> list[QueuedJob]:
        """Round-robin over users: fewest running first, then the one served longest ago; oldest job each."""
        by_user: dict[str, list[QueuedJob]] = {}
        for job in queued:
            by_user.setdefault(job.user_key, []).append(job)
        running_by_user: dict[str, int] = {}
        for _, user, _ in self._running.values():
            running_by_user[user] = running_by_user.get(user, 0) + 1
        cap = self._settings.scheduler.max_running_per_user
        picked: list[QueuedJob] = []
        while len(picked) < free:
            eligible = [u for u, jobs in by_user.items() if jobs and running_by_user.get(u, 0) < cap]
            if not eligible:
                break
            user = min(eligible, key=lambda u: (running_by_user.get(u, 0), self._last_dispatch.get(u, 0.0)))
            picked.append(by_user[user].pop(0))
            running_by_user[user] = running_by_user.get(user, 0) + 1
            self._last_dispatch[user] = self._clock() + len(picked) * 1e-6
        return picked

    def _spawn(self, job: Job, *, resumed: bool) -> None:
        if job.backend is BackendKind.API and job.task is None:
            self._unconfirmed[job.id] = asyncio.Event()
        task = asyncio.create_task(self._execute(job, resumed=resumed), name=f"job {job.id}")
        self._running[job.id] = (job.backend, job.requester.user_key, task)

    # ---- one attempt ----

    async def _execute(self, job: Job, *, resumed: bool) -> None:
        backend = self._backends[job.backend]
        task: RemoteTask | None = job.task
        terminal = False
        try:
            if not resumed:
                self._publish(JobStarted(job.id, job.backend))
            async with aclosing(
                backend.run(BackendJob(job.id, job.request, resume=job.task if resumed else None))
            ) as run:
                async for event in run:
                    if isinstance(event, Submitted):
                        task = event.task
                        await self._store.store_task(job.id, event.task)
                        self._confirm(job.id)
                    elif isinstance(event, Started):
                        if resumed:
                            self._publish(JobStarted(job.id, job.backend))
                    elif isinstance(event, Progress):
                        self._publish(JobProgress(job.id, event.step, event.total, event.preview_png))
                    elif isinstance(event, Finished):
                        terminal = True
                        await self._succeed(job, event)
                        break
                    elif isinstance(event, Failed):
                        terminal = True
                        await self._on_failure(job, event)
                        break
            if not terminal:
                log.error("job %s: backend %s ended without a result", job.id, job.backend.value)
                await self._on_failure(job, _lost(FailureReason.INTERNAL, "the backend ended without a result", task))
        except asyncio.CancelledError:
            if self._stopping and job.id not in self._cancel_requested:
                raise  # leave it `running` in the database: the next start recovers it
            billed = task.cost_micros if task is not None else 0
            await self._end_cancelled(job, billed)
        except Exception as exc:
            log.exception("job %s: internal error in the scheduler", job.id)
            if not terminal:
                detail = f"internal error: {type(exc).__name__}"
                await self._on_failure(job, _lost(FailureReason.INTERNAL, detail, task))
        finally:
            self._confirm(job.id)
            self._running.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            if not self._stopping:
                self.wake()

    async def _succeed(self, job: Job, finished: Finished) -> None:
        # The parameters go into the one stored copy, which every front-end posts or links as it is.
        model = self._settings.models.get(job.request.model)
        display = model.display_name if model else job.request.model
        image, mime = await asyncio.to_thread(annotated, finished.image, finished.mime, job, display)
        path = self._settings.bot.images_dir / f"{job.id}.{_EXTENSIONS.get(mime, 'png')}"
        await asyncio.to_thread(_write_atomically, path, image)
        closes = self._quota.closes_for_success(await self._store.open_reservations(job.id), finished)
        now = self._clock()
        charged = await self._charged(job.id) + finished.cost_micros
        ended = await self._store.finish_job(
            job.id, JobState.DONE, closes, now=now, cost_micros=charged, result_path=str(path)
        )
        if ended:
            seconds = now - job.created_at
            self._publish(JobDone(job.id, image, mime, finished.seed, job.backend, charged, seconds))

    async def _on_failure(self, job: Job, failed: Failed) -> None:
        log.warning("job %s: %s failed: %s (%s)", job.id, job.backend.value, failed.reason.value, failed.detail)
        if not self._stopping and await self._fail_over(job, failed):
            return
        await self._fail(job, failed)

    async def _fail_over(self, job: Job, failed: Failed) -> bool:
        model = self._settings.models.get(job.request.model)
        if model is None:
            return False
        open_ = await self._store.open_reservations(job.id)
        room = _with_open_room(await self._quota.room(job.requester), open_)
        local_left = 1 + self._settings.scheduler.local_retries - job.local_attempts
        decision = router.failover(
            job.request,
            job.request.model,
            model,
            self._settings.routing,
            job.backend,
            failed.reason,
            local_left,
            await self.status(BackendKind.LOCAL, job.request),
            await self.status(BackendKind.API, job.request),
            room,
        )
        if decision is None:
            return False
        periods = self._quota.periods()
        limits = await self._quota.limits_for(job.requester)
        try:
            await self._store.reroute(
                job.id,
                decision.backend,
                decision.reason,
                self._quota.closes_for_attempt(open_, failed, keep_image=True),
                self._quota.reservations(decision, periods, with_image=False),
                self._quota.checks(job.requester, limits, periods),
                estimated_cost_micros=decision.estimated_cost_micros,
                estimated_gpu_ms=decision.estimated_gpu_ms,
                now=self._clock(),
            )
        except QuotaExceeded as exc:
            log.info("job %s: no failover to %s: %s", job.id, decision.backend.value, exc)
            return False
        self._publish(JobRerouted(job.id, decision, failed.reason))
        self.wake()
        return True

    async def _fail(self, job: Job, failed: Failed) -> None:
        closes = self._quota.closes_for_attempt(await self._store.open_reservations(job.id), failed, keep_image=False)
        charged = await self._charged(job.id) + failed.charged_micros
        ended = await self._store.finish_job(
            job.id,
            JobState.FAILED,
            closes,
            now=self._clock(),
            cost_micros=charged,
            failure_reason=failed.reason,
            error=failed.detail,
        )
        if ended:
            self._publish(JobFailed(job.id, failed.reason, failed.detail, charged))

    async def _end_cancelled(self, job: Job, billed: int) -> None:
        closes = self._quota.closes_for_cancel(await self._store.open_reservations(job.id), billed)
        charged = await self._charged(job.id) + billed
        if await self._store.finish_job(job.id, JobState.CANCELLED, closes, now=self._clock(), cost_micros=charged):
            self._publish(JobCancelled(job.id, charged))

    async def _charged(self, job_id: str) -> int:
        """Money already posted for earlier attempts of this job (a billed API timeout before a failover)."""
        return sum(
            line["amount"]
            for line in await self._store.job_ledger(job_id)
            if line["entry"] == "settle" and line["resource"] == Resource.USD_MICROS.value
        )

    async def queued_event(self, job: Job) -> JobQueued:
        position = await self._store.queue_position(job)
        backend = self._backends.get(job.backend)
        eta = backend.status(position, job.request).eta_s if backend else 0.0
        route = RouteDecision(job.backend, job.reason, job.estimated_cost_micros, job.estimated_gpu_ms, eta)
        return JobQueued(job.id, position, eta, route)


def _lost(reason: FailureReason, detail: str, task: RemoteTask | None) -> Failed:
    """Our own failure of an attempt. A BFL task it had submitted was accepted, and BFL bills it whether or not we
    follow it to the end, so its cost is posted (also before any rescue elsewhere): the ledger matches BFL's bill."""
    if task is None:
        return Failed(reason, detail)
    return Failed(reason, f"{detail}; BFL bills its task {task.task_id}", charged_micros=task.cost_micros)


def _with_open_room(room: BudgetRoom, open_: list[OpenReservation]) -> BudgetRoom:
    """Count this job's own open reservations as room: a failover replaces them rather than adding to them."""
    extra: dict[Resource, int] = {}
    for r in open_:
        if r.resource is not Resource.IMAGES:
            extra[r.resource] = extra.get(r.resource, 0) + r.amount

    def add(value: int | None, resource: Resource) -> int | None:
        return None if value is None else value + extra.get(resource, 0)

    return replace(room, api_micros=add(room.api_micros, Resource.USD_MICROS), gpu_ms=add(room.gpu_ms, Resource.GPU_MS))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
