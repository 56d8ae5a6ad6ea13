"""The persistent queue: fair dispatch to backends, failover, cancellation and restart recovery.

The queue *is* the jobs table: a job is `queued` until the dispatcher hands it to a backend, and every transition
is one SQLite write, so stopping the process at any point loses nothing. On start, `recover()` takes up what the
last process left running by asking each job's backend (`Backend.resume`): a job handed to something remote is
continued from its stored resume token (never submitted again), one that nothing remote held is queued again while
its retries last, and the rest fail with what they were billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

from engine import router
from engine.backends.base import Backend, Requeue, Resumption, Unresumable
from engine.config import Settings
from engine.errors import InvalidRequest, JobNotFound, QuotaExceeded
from engine.forecast import Running, Slot, play_forward, remaining_s
from engine.inputs import InputImages
from engine.ledger import OpenReservation
from engine.models import (
    PNG,
    AuditEntry,
    BackendEvent,
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
    JobHeld,
    JobProgress,
    JobQueued,
    JobRerouted,
    JobStarted,
    JobState,
    JobWaiting,
    Progress,
    ResolvedRequest,
    Resource,
    ResumeToken,
    Review,
    Started,
    Submitted,
    image_format,
)
from engine.quota import Quota
from engine.results import annotated
from engine.review import ReviewStep
from engine.store import QueuedJob, Store

log = logging.getLogger(__name__)

# How deep into a lane's queue the ETA plays the dispatcher forward; jobs past it count at the lane's full speed.
_FORECAST_DEPTH = 1000
# A new job's place in a play-forward: it joins the queue last (no job id is empty).
_NEW_JOB = ""
# Queued jobs hear their new place at most this often per lane (the chat edits are throttled again on top).
WAIT_UPDATES_EVERY_S = 2.0
DATABASE_POLL_S = 2.0  # how soon a job queued by another process (the admin CLI) is picked up


class Scheduler:
    def __init__(
        self,
        store: Store,
        quota: Quota,
        settings: Settings,
        backends: Mapping[BackendKind, Backend],
        publish: Callable[[JobEvent], None],
        clock: Callable[[], float],
        inputs: InputImages,
        review: ReviewStep,
    ) -> None:
        self._store = store
        self._inputs = inputs
        self._review = review
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
        # API jobs that may have reached BFL but have no stored resume token yet: set once it is or the job ends.
        self._unconfirmed: dict[str, asyncio.Event] = {}
        self._transitions = asyncio.Lock()
        self._runs: dict[str, tuple[float, float]] = {}  # running job id -> (started at, expected seconds)
        self.wait_updates_every_s = WAIT_UPDATES_EVERY_S
        self._waits_sent_at: dict[BackendKind, float] = {}  # loop time of each lane's last round of JobWaiting
        self._waits_due: set[BackendKind] = set()  # lanes whose queue moved since their last round
        # Per lane, what each queued job was last told: job id -> (position, predicted end, told at), in loop time.
        self._waits_shown: dict[BackendKind, dict[str, tuple[int, float, float]]] = {}

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
        for backend in self._backends.values():
            backend.detach()
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

    async def status(
        self, kind: BackendKind, request: ResolvedRequest | None, user_key: str | None = None
    ) -> BackendStatus | None:
        """The backend's own health and load with the admin's pause switch applied, and where a new job of this
        shape from `user_key` (None: a user with nothing queued or running) would stand: `ahead` and `wait_s` from
        the dispatcher played forward over the lane's queue and running jobs (engine/forecast.py)."""
        backend = self._backends.get(kind)
        if backend is None:
            return None
        run_s = backend.estimate_seconds(request) if request is not None else backend.status(0).run_s
        place = await self._place_of_new(kind, backend, run_s, user_key or _NEW_JOB)
        status = replace(backend.status(place.position, request), wait_s=place.wait_s, ahead=place.position)
        if kind in self.paused:
            return replace(status, paused=True, detail="paused by an admin")
        return status

    async def _place_of_new(self, kind: BackendKind, backend: Backend, run_s: float, user_key: str) -> Slot:
        """Where a new job of `user_key` would stand in the lane (it joins the queue last)."""
        queued = await self._store.queued(kind, limit=_FORECAST_DEPTH)
        past_depth = 0  # queued jobs past the play-forward's depth: taken to come first, at the lane's full speed
        if len(queued) == _FORECAST_DEPTH:
            past_depth = await self._store.count_jobs(JobState.QUEUED, kind) - len(queued)
        lane = [*((job.id, job.user_key) for job in queued), (_NEW_JOB, user_key)]
        slot = self._play_forward(kind, backend, lane, run_s)[_NEW_JOB]
        return Slot(slot.position + past_depth, slot.wait_s + past_depth * run_s / max(backend.capacity(), 1))

    def _play_forward(
        self, kind: BackendKind, backend: Backend, lane: list[tuple[str, str]], run_s: float
    ) -> dict[str, Slot]:
        now = self._clock()
        timeouts = {
            BackendKind.LOCAL: self._settings.local.job_timeout_s,
            BackendKind.API: self._settings.bfl.total_timeout_s,
        }
        running = []
        for job_id, (running_kind, user, _) in self._running.items():
            started, seconds = self._runs.get(job_id, (now, 0.0))
            left = remaining_s(now - started, seconds, timeouts[running_kind])
            running.append(Running(user, left, in_lane=running_kind is kind))
        return play_forward(
            lane,
            running,
            capacity=backend.capacity(),
            run_s=run_s,
            max_running_per_user=self._settings.scheduler.max_running_per_user,
            last_served=self._last_dispatch,
        )

    async def cancel(self, job: Job, actor: str) -> JobCancelled:
        """Cancel a queued job at once; a running one is stopped and ends through its own task."""
        async with self._transitions:
            # Read again under the lock: the caller's copy may say queued while the dispatcher has just started it.
            job = await self._store.get_job(job.id)
            if job.state is JobState.QUEUED:
                closes = self._quota.closes_for_cancel(await self._store.open_reservations(job.id), 0)
                # A job queued again after a billed API attempt (a timeout, then a failover) has already paid.
                charged = await self._store.posted(job.id, Resource.USD_MICROS)
                ended = await self._store.finish_job(
                    job.id,
                    JobState.CANCELLED,
                    closes,
                    now=self._clock(),
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
        """Take up every job the last process left running, as its backend says (`Backend.resume`)."""
        for job in await self._store.jobs(states=[JobState.RUNNING]):
            backend = self._backends.get(job.backend)
            resumption: Resumption
            if backend is None:
                why = f"the {job.backend.value} backend is no longer configured, so this job could not be followed"
                resumption = Unresumable(why)
            else:
                resumption = backend.resume(BackendJob(job.id, job.request, resume=job.resume, attempt=job.attempts))
            if isinstance(resumption, Requeue):
                # Starting over spends one of the job's local retries, like any other lost GPU attempt.
                if job.local_attempts <= self._settings.scheduler.local_retries:
                    log.info("job %s: %s", job.id, resumption.reason)
                    await self._store.requeue(job.id, resumption.reason)
                    continue
                resumption = Unresumable(f"flux-bot stopped during this job {job.local_attempts} times")
            if isinstance(resumption, Unresumable):
                log.warning("job %s: failed after a restart: %s", job.id, resumption.reason)
                await self._fail(job, _lost(FailureReason.INTERRUPTED, resumption.reason, job.resume))
                continue
            log.info("job %s: resumed on %s after a restart", job.id, job.backend.value)
            self._spawn(job, resumed=resumption)

    # ---- dispatch ----

    async def _dispatch_loop(self) -> None:
        while True:
            # Woken by this process's submits and endings, and now and then for jobs that another process queued
            # in the database (`flux-bot admin review allow`, `admin styles check`).
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the stop's cancel when a wake-up lands at
            # the same moment, and the stop would then wait forever for this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DATABASE_POLL_S):
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
                if kind in self._waits_due:
                    await self._publish_waits(kind, backend)
                continue
            # Only ids and users for the pick: mark_running reads the picked jobs' full rows.
            queued = await self._store.queued(kind, limit=1000)
            picked = self._fair_pick(queued, free)
            for job in picked:
                # Marking a job running and starting its task are one step for cancel() and stop().
                async with self._transitions:
                    try:
                        running = await self._store.mark_running(job.id, self._clock())
                    except JobNotFound:
                        continue  # cancelled meanwhile
                    self._spawn(running)
            if picked or kind in self._waits_due:
                await self._publish_waits(kind, backend)

    def use_settings(self, settings: Settings) -> None:
        """Settings reloaded while running ([styles.*]): the jobs dispatched from now on read these."""
        self._settings = settings

    def told(self, queued: JobQueued) -> None:
        """What a submit's note said, so that the next round tells the job only what has changed since."""
        now = asyncio.get_running_loop().time()
        lane = self._waits_shown.setdefault(queued.route.backend, {})
        lane[queued.job_id] = (queued.position, now + queued.eta_s, now)

    async def _publish_waits(self, kind: BackendKind, backend: Backend) -> None:
        """Tell the lane's queued jobs their new place and ETA (JobWaiting) when either changed.

        At most one round per `wait_updates_every_s` per lane; a queue that moves sooner gets a round when that
        interval is up, so the last move is never left untold. A job hears again only after a fifth of its wait,
        so a deep queue does not send every job an update on every dispatch.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        since = now - self._waits_sent_at.get(kind, -math.inf)
        if since < self.wait_updates_every_s:
            self._waits_later(kind, self.wait_updates_every_s - since)
            return
        self._waits_due.discard(kind)
        self._waits_sent_at[kind] = now
        queued = await self._store.queued(kind, limit=_FORECAST_DEPTH)
        if not queued:
            self._waits_shown.pop(kind, None)
            return
        # One run time for the whole lane, the oldest job's: jobs of a lane are mostly of a few shapes.
        run_s = backend.estimate_seconds((await self._store.get_job(queued[0].id)).request)
        slots = self._play_forward(kind, backend, [(job.id, job.user_key) for job in queued], run_s)
        shown = self._waits_shown.get(kind, {})
        fresh: dict[str, tuple[int, float, float]] = {}
        held = False
        for job_id, slot in slots.items():
            ends_at = now + slot.wait_s + run_s
            before = shown.get(job_id)
            if before is not None:
                position, promised, told_at = before
                moved = position != slot.position or abs(ends_at - promised) >= max(2.0, 0.1 * (ends_at - now))
                if not moved or now - told_at < slot.wait_s / 5:
                    held = held or moved
                    fresh[job_id] = before
                    continue
            fresh[job_id] = (slot.position, ends_at, now)
            self._publish(JobWaiting(job_id, slot.position, slot.wait_s, slot.wait_s + run_s))
        self._waits_shown[kind] = fresh
        if held:
            self._waits_later(kind, self.wait_updates_every_s)

    def _waits_later(self, kind: BackendKind, delay_s: float) -> None:
        if kind not in self._waits_due:
            self._waits_due.add(kind)
            asyncio.get_running_loop().call_later(delay_s, self.wake)

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

    def _spawn(self, job: Job, *, resumed: AsyncGenerator[BackendEvent, None] | None = None) -> None:
        """Start the job's attempt: a new run on its backend, or the `resumed` events of one a restart cut off."""
        if job.backend is BackendKind.API and job.resume is None:
            self._unconfirmed[job.id] = asyncio.Event()
        task = asyncio.create_task(self._execute(job, resumed), name=f"job {job.id}")
        self._running[job.id] = (job.backend, job.requester.user_key, task)
        expected = self._backends[job.backend].estimate_seconds(job.request)
        self._runs[job.id] = (job.started_at or self._clock(), expected)

    # ---- one attempt ----

    async def _execute(self, job: Job, resumed: AsyncGenerator[BackendEvent, None] | None) -> None:
        token: ResumeToken | None = job.resume
        terminal = False
        try:
            events = resumed
            if events is None:
                self._publish(JobStarted(job.id, job.backend))
                backend_job = await self._backend_job(job)
                if backend_job is None:
                    return
                events = self._backends[job.backend].run(backend_job)
            # After the terminal event the events are read once more, to their end: a backend that must confirm a
            # result to a remote (a GPU host's stream) does so only once the scheduler has recorded it.
            async with aclosing(events) as run:
                async for event in run:
                    if terminal:
                        log.error("job %s: backend %s sent %r after the job ended", job.id, job.backend.value, event)
                        break
                    if isinstance(event, Submitted):
                        token = event.resume
                        await self._store.store_resume_token(job.id, event.resume)
                        self._confirm(job.id)
                    elif isinstance(event, Started):
                        if resumed is not None:
                            self._publish(JobStarted(job.id, job.backend))
                    elif isinstance(event, Progress):
                        self._publish(JobProgress(job.id, event.step, event.total, event.preview_png))
                    elif isinstance(event, Finished):
                        terminal = True
                        await self._succeed(job, event)
                    elif isinstance(event, Failed):
                        terminal = True
                        await self._on_failure(job, event)
            if not terminal:
                log.error("job %s: backend %s ended without a result", job.id, job.backend.value)
                await self._on_failure(job, _lost(FailureReason.INTERNAL, "the backend ended without a result", token))
        except asyncio.CancelledError:
            if self._stopping and job.id not in self._cancel_requested:
                raise  # leave it `running` in the database: the next start recovers it
            billed = token.billed_micros if token is not None else 0
            await self._end_cancelled(job, billed)
        except Exception as exc:
            log.exception("job %s: internal error in the scheduler", job.id)
            if not terminal:
                detail = f"internal error: {type(exc).__name__}"
                await self._on_failure(job, _lost(FailureReason.INTERNAL, detail, token))
        finally:
            self._confirm(job.id)
            self._running.pop(job.id, None)
            self._runs.pop(job.id, None)
            self._cancel_requested.discard(job.id)
            if not self._stopping:
                self.wake()

    async def _backend_job(self, job: Job) -> BackendJob | None:
        """What the backend is handed, with the job's input image read; None when that image is gone (the job
        then fails, uncharged)."""
        image = None
        if job.request.input_image is not None:
            try:
                image = await asyncio.to_thread(self._inputs.read, job.request.input_image)
            except FileNotFoundError:
                detail = "its input image is no longer stored (past this server's retention)"
                await self._fail(job, Failed(FailureReason.BAD_REQUEST, detail))
                return None
        return BackendJob(job.id, job.request, attempt=job.attempts, input_image=image)

    async def _succeed(self, job: Job, finished: Finished) -> None:
        # The parameters go into the one stored copy, which every front-end posts or links as it is.
        model = self._settings.models.get(job.request.model)
        display = model.display_name if model else job.request.model
        style = self._settings.styles.get(job.request.style) if job.request.style else None
        image, mime = await asyncio.to_thread(annotated, finished.image, finished.mime, job, display, style)
        path = self._settings.bot.images_dir / f"{job.id}.{(image_format(mime) or PNG).extension}"
        await asyncio.to_thread(_write_atomically, path, image)
        # Decided before the job ends, and recorded in the same transaction: a held image is never shown, even
        # after a crash between the two.
        if self._review.classifies:
            decision = await asyncio.to_thread(self._review.decide, job.request.prompt, image, job.requester)
        else:
            decision = self._review.decide(job.request.prompt, image, job.requester)
        closes = self._quota.closes_for_success(await self._store.open_reservations(job.id), finished)
        now = self._clock()
        charged = await self._store.posted(job.id, Resource.USD_MICROS) + finished.cost_micros
        held = decision.hold
        ended = await self._store.finish_job(
            job.id,
            JobState.DONE,
            closes,
            now=now,
            result_path=str(path),
            review=Review.HELD if held else Review.NONE,
            review_reason=decision.reason if held else None,
            review_detail=decision.detail if held else None,
            audit=AuditEntry("review", "review.hold", job.requester.user_key, job.id, {"detail": decision.detail})
            if held
            else None,
        )
        if ended and held:
            log.info("job %s: held for review: %s", job.id, decision.detail)
            self._publish(JobHeld(job.id, decision.reason, charged))
        elif ended:
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
            self._settings.styles.get(job.request.style) if job.request.style else None,
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
        charged = await self._store.posted(job.id, Resource.USD_MICROS) + failed.charged_micros
        ended = await self._store.finish_job(
            job.id,
            JobState.FAILED,
            closes,
            now=self._clock(),
            failure_reason=failed.reason,
            error=failed.detail,
        )
        if ended:
            self._publish(JobFailed(job.id, failed.reason, failed.detail, charged))

    async def _end_cancelled(self, job: Job, billed: int) -> None:
        closes = self._quota.closes_for_cancel(await self._store.open_reservations(job.id), billed)
        charged = await self._store.posted(job.id, Resource.USD_MICROS) + billed
        if await self._store.finish_job(job.id, JobState.CANCELLED, closes, now=self._clock()):
            self._publish(JobCancelled(job.id, charged))


def _lost(reason: FailureReason, detail: str, token: ResumeToken | None) -> Failed:
    """Our own failure of an attempt. What it had handed to a remote that bills (a BFL task) is billed whether or
    not we follow it to the end, so that is posted (also before any rescue elsewhere): the ledger matches the bill."""
    if token is None:
        return Failed(reason, detail)
    explained = f"{detail}; {token.billing}" if token.billing else detail
    return Failed(reason, explained, charged_micros=token.billed_micros)


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
