"""The Engine facade that bot/ uses: submit, cancel, events, quota views, admin operations and stats.

Everything a front-end can do goes through here, so every rule (policy, routing, quota, admin rights) is applied
in one place whatever the platform. bot/ imports nothing else of the engine but models, errors and config: what it
needs without a running engine (doctor, the admin CLI's backups, the worker subcommand, systemd's notify socket) is
offered at the end of this module, and the types its texts show are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine import router
from engine.alerts import Alert, Alerts, FailureAlert, SpendAlert
from engine.appeals import AppealDesk
from engine.backends.base import Backend
from engine.backends.factory import LocalLane, gpu_extra_installed, local_lane, local_off_line, serving_settings
from engine.backends.pool import GpuPool
from engine.backup import backup, backup_dir, backup_every, integrity_problem, list_backups, restore
from engine.config import ASPECT_RATIOS, Secrets, Settings
from engine.errors import (
    BackendUnavailable,
    EngineError,
    InvalidRequest,
    JobNotFound,
    NotAllowed,
    refuses_a_charge,
)
from engine.inputs import InputImages
from engine.models import (
    PNG,
    TERMINAL_EVENTS,
    Appeal,
    AuditEntry,
    AuditRecord,
    BackendKind,
    Capabilities,
    FailureReason,
    GpuLaneReport,
    ImageRequest,
    Job,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobHeld,
    JobQueued,
    JobRejected,
    JobState,
    Mode,
    Platform,
    Posting,
    ReportChart,
    Requester,
    Resource,
    Review,
    SpendRow,
    StyleCheck,
    StyleServing,
    Task,
    image_format,
    new_job_id,
)
from engine.policy import PromptPolicy
from engine.quota import Quota, QuotaView
from engine.report import build_report, render_png, summary_text
from engine.retention import Retention, image_store
from engine.review import Classifier, ReviewStep, classifier_for
from engine.scheduler import Scheduler
from engine.sd_notify import Notifier, watchdog_interval_s
from engine.store import Store, totals_differences_in
from engine.styles import adapter_problems, read_styles, render_outcome, style_report
from engine.telemetry import Health, Telemetry
from engine.validation import resolve

# The facade: the Engine, and what the front-ends use of the engine's inner modules, so bot/ depends on this alone.
__all__ = [
    "Alert",
    "Engine",
    "FailureAlert",
    "LocalLane",
    "Notifier",
    "QueueSummary",
    "QuotaView",
    "SpendAlert",
    "SpendRow",
    "backup",
    "backup_dir",
    "backup_every",
    "bfl_credits",
    "gpu_extra_installed",
    "gpu_lane_report",
    "image_store",
    "integrity_problem",
    "ledger_problems",
    "list_backups",
    "local_lane",
    "local_off_line",
    "parse_grant",
    "restore",
    "run_worker",
    "serving_settings",
    "watchdog_interval_s",
]

log = logging.getLogger(__name__)

USER_SETTINGS = {"model", "aspect", "mode", "style"}


@dataclass(frozen=True, slots=True)
class QueueSummary:
    queued: dict[BackendKind, int]
    running: dict[BackendKind, int]
    mine: list[Job]


class Engine:
    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        store: Store,
        backends: Mapping[BackendKind, Backend],
        *,
        clock: Callable[[], float] = time.time,
        demo: bool = False,
        classifier: Classifier | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self._config_path = config_path  # where `reload_styles` reads [styles.*] again (None: built-in defaults)
        self._secrets = secrets
        self._store = store
        self.demo = demo  # the local backend runs the tiny random-weights model: its images are noise
        self._backends = dict(backends)
        self._clock = clock
        self._quota = Quota(store, settings, clock)
        self._policy = PromptPolicy(settings.policy)
        self._inputs = InputImages(
            settings.bot.inputs_dir,
            max_bytes=round(settings.images.max_input_mb * 1_000_000),
            max_pixels=round(settings.images.max_input_megapixels * 1_000_000),
        )
        self._appeals = AppealDesk(store, self._inputs, clock, enabled=settings.review.appeals, submit=self._submit)
        # The review step's image classifier: the configured one, unless one is given (tests give a marker one).
        self._review = ReviewStep(settings.review, classifier or classifier_for(settings.review))
        self._scheduler = Scheduler(
            store, self._quota, settings, backends, self._publish, clock, self._inputs, self._review
        )
        self._telemetry = Telemetry(store, self._scheduler, backends, clock)
        self._alerts = Alerts(store, settings, clock)
        self._retention = Retention(store, settings.bot, clock, inputs=self._inputs)
        self._retention_task: asyncio.Task[None] | None = None
        # The models that take a guidance value, for the advice when one is given to a model that takes none.
        self._guided = tuple(
            name
            for name, model in settings.models.items()
            if model.default_guidance is not None and not model.needs_input_image
        )
        self.edit_models = tuple(name for name, model in settings.models.items() if model.needs_input_image)
        self._watchers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._latest: dict[str, JobEvent] = {}
        self._everything: set[asyncio.Queue[JobEvent]] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        settings: Settings,
        secrets: Secrets,
        *,
        backends: Mapping[BackendKind, Backend] | None = None,
        clock: Callable[[], float] = time.time,
        config_path: Path | None = None,
    ) -> Engine:
        """Open the database, build the configured backends (unless given) and start dispatching."""
        from engine.backends.factory import build_backends

        store = await Store.open(settings.bot.database_path, clock)
        # Whatever stops the start (an error, Ctrl-C while the demo model is built), the database's thread is
        # closed again: a process cannot exit while it still runs.
        try:
            demo = False
            if backends is None:
                backends, demo = await build_backends(settings, secrets)
            engine = cls(settings, secrets, store, backends, clock=clock, demo=demo, config_path=config_path)
        except BaseException:
            await store.close()
            raise
        try:
            await engine.start()
        except BaseException:
            await engine.close()
            raise
        return engine

    @classmethod
    async def open_admin(cls, settings: Settings, secrets: Secrets, *, config_path: Path | None = None) -> Engine:
        """For the admin CLI: the database, the BFL API (its balance) and the running bot's GPU lane as a route for
        the jobs the CLI queues, without dispatching any job (the bot runs them)."""
        from engine.backends.elsewhere import RunningBotsLane

        backends: dict[BackendKind, Backend] = {}
        if local_lane(settings, secrets) not in (LocalLane.NO_WEIGHTS, LocalLane.DISABLED):
            backends[BackendKind.LOCAL] = RunningBotsLane(settings.models)
        if secrets.bfl_api_key:
            from engine.backends.bfl import BflBackend

            backends[BackendKind.API] = BflBackend(settings.bfl, settings.models, secrets.bfl_api_key)
        store = await Store.open(settings.bot.database_path)
        engine = cls(settings, secrets, store, backends, config_path=config_path)
        try:
            await engine.start(dispatch=False)
        except BaseException:
            await engine.close()
            raise
        return engine

    async def start(self, *, dispatch: bool = True) -> None:
        """Start the backends and, unless only administering the database (the CLI), the dispatcher."""
        for backend in self._backends.values():
            await backend.start()
        for kind in BackendKind:
            if await self._store.get_control(f"paused.{kind.value}") == "1":
                self._scheduler.paused.add(kind)
        for job in await self._store.jobs(states=[JobState.QUEUED, JobState.RUNNING]):
            self._telemetry.track(job)  # jobs left by the last process: their log lines still name user and route
        if dispatch:
            await self._scheduler.start()
            if self._retention.keep_days > 0:
                await self._retention.sweep_logged()
                self._retention_task = asyncio.create_task(self._retention.run(), name="image retention")

    async def close(self) -> None:
        """Stop without ending running jobs (the next start recovers them). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
        await self._scheduler.stop()
        await self._alerts.close()
        for backend in self._backends.values():
            await backend.close()
        await self._store.close()

    # ---- jobs ----

    def capabilities(self) -> Capabilities:
        """What this bot offers right now (configured lanes, admins' pauses), for advice that fits it."""
        routing, paused = self.settings.routing, self._scheduler.paused
        return Capabilities(
            has_local=BackendKind.LOCAL in self._backends and routing.local_enabled,
            local_paused=BackendKind.LOCAL in paused,
            has_api=BackendKind.API in self._backends and routing.api_enabled,
            api_paused=BackendKind.API in paused,
        )

    def has_backends(self) -> bool:
        """Whether any image backend is configured at all (quota and admin commands work without one)."""
        return bool(self._backends)

    @property
    def database_path(self) -> Path:
        return self._store.path

    @refuses_a_charge
    async def submit(self, requester: Requester, request: ImageRequest) -> JobQueued:
        """Validate, apply the policy, route, reserve and persist; the job is queued when this returns."""
        return await self._submit(requester, request)

    async def _submit(self, requester: Requester, request: ImageRequest, appeal: Appeal | None = None) -> JobQueued:
        """`appeal`: an admin allowed this request on appeal, so the policy's verdict is theirs, not the lists'."""
        # The stored user (for the ban), the limits and their use so far, in one read: the pre-check and the router
        # use them; the reserving transaction checks every limit again.
        standing = await self._quota.standing(requester)
        if standing.record is not None and standing.record.banned:
            raise NotAllowed("imagine", "you are banned from generating images here; ask an admin")
        model = self.settings.models.get(request.model)
        if model is None:
            known = ", ".join(self.settings.models)
            raise InvalidRequest(f"unknown model {request.model!r}; choose one of: {known}", field="model")
        if appeal is None:
            decision_of_policy = self._policy.check(request.prompt)
            policy_audit = AuditEntry(
                requester.user_key,
                "policy.allow" if decision_of_policy.allowed else "policy.block",
                requester.user_key,
                detail={"rule": decision_of_policy.rule, "matched": decision_of_policy.matched},
            )
            if not decision_of_policy.allowed:
                await self._appeals.refuse(requester, request, decision_of_policy, policy_audit)
        else:
            policy_audit = AuditEntry(
                requester.user_key, "policy.allow", requester.user_key, detail={"rule": "appeal", "appeal": appeal.id}
            )
        # The image is checked (and stored) before anything is reserved: a bad one is refused with nothing kept.
        stored = None
        if request.input_image is not None:
            stored = await asyncio.to_thread(self._inputs.accept, request.input_image)
        if request.task is Task.VARY and request.strength is None:
            request = replace(request, strength=self.settings.images.vary_subtle_strength)
        resolved = resolve(
            replace(request, prompt=self._policy.for_model(request.prompt)),
            model,
            guided=self._guided,
            edit_models=self.edit_models,
            input_image=stored,
            styles=self.settings.styles,
        )
        # The image allowance does not depend on the route: say so plainly, with its reset time, before routing.
        standing.ensure_room(Resource.IMAGES, 1)
        # One snapshot of each lane for the route, its reason and the queued note, so they all quote the same wait.
        lanes = {
            kind: await self._scheduler.status(kind, resolved, requester.user_key)
            for kind in (BackendKind.LOCAL, BackendKind.API)
        }
        decision = router.route(
            resolved,
            request.model,
            model,
            self.settings.routing,
            lanes[BackendKind.LOCAL],
            lanes[BackendKind.API],
            standing.room(),
            self.settings.styles.get(resolved.style) if resolved.style else None,
        )
        job = Job(
            id=new_job_id(),
            requester=requester,
            request=resolved,
            state=JobState.QUEUED,
            backend=decision.backend,
            reason=decision.reason,
            created_at=self._clock(),
            estimated_cost_micros=decision.estimated_cost_micros,
            estimated_gpu_ms=decision.estimated_gpu_ms,
        )
        await self._store.submit_job(
            job,
            self._quota.reservations(decision, standing.periods, with_image=True),
            standing.checks,
            standing.limits.concurrent_jobs,
            audit=AuditEntry(
                policy_audit.actor, policy_audit.action, policy_audit.subject, job.id, policy_audit.detail
            ),
        )
        self._telemetry.track(job)
        lane = lanes[decision.backend]
        queued = JobQueued(job.id, lane.ahead if lane else 0, decision.eta_s, decision, wait_s=decision.wait_s)
        self._scheduler.told(queued)
        self._publish(queued)
        self._scheduler.wake()
        return queued

    # ---- appeals (engine/appeals.py) ----

    async def appeal(self, requester: Requester, appeal_id: str) -> Appeal:
        """The requester asks an admin to allow a refused prompt; the front-end shows it in the review channel."""
        return await self._appeals.file(requester, appeal_id)

    async def pending_appeals(self, actor: Requester, limit: int = 100) -> list[Appeal]:
        """Appeals waiting for an admin, oldest first."""
        self.require_admin(actor, "review")
        return await self._appeals.pending(limit)

    @refuses_a_charge
    async def allow_appeal(self, actor: Requester, appeal_id: str) -> tuple[Appeal, JobQueued]:
        """Run the refused request for its requester, charged as any job of theirs (their limits apply)."""
        self.require_admin(actor, "review")
        return await self._appeals.allow(actor, appeal_id)

    async def deny_appeal(self, actor: Requester, appeal_id: str, reason: str) -> Appeal:
        self.require_admin(actor, "review")
        return await self._appeals.deny(actor, appeal_id, reason)

    async def cancel(self, requester: Requester, job_id: str) -> JobCancelled:
        job = await self.job(requester, job_id)
        if job.state.terminal:
            raise InvalidRequest(f"job {job_id} has already ended ({job.state.value})", field="job")
        return await self._scheduler.cancel(job, requester.user_key)

    async def job(self, requester: Requester, job_id: str) -> Job:
        """A job of the requester's own (any job for an admin); someone else's looks like a missing one."""
        job = await self._store.get_job(job_id.strip())
        if job.requester.user_key != requester.user_key and not self.is_admin(requester):
            raise JobNotFound(job_id)
        return job

    async def result_image(self, job_id: str) -> bytes:
        """A done job's stored image, to edit or vary it; InvalidRequest when it is no longer stored."""
        job = await self._store.get_job(job_id)
        if job.review in (Review.HELD, Review.REJECTED):
            raise InvalidRequest(f"job {job_id}'s image is held for review, or was rejected", field="job")
        if job.state is not JobState.DONE or job.result_path is None:
            raise InvalidRequest(
                f"job {job_id} has no stored image (it did not finish, or its image was deleted or is past this"
                " server's retention): make a new one with /imagine",
                field="job",
            )
        try:
            return await asyncio.to_thread(Path(job.result_path).read_bytes)
        except FileNotFoundError:
            raise InvalidRequest(
                f"job {job_id}'s image is no longer stored here: make a new one with /imagine", field="job"
            ) from None

    async def get_job(self, job_id: str) -> Job:
        """Any job by id, for a front-end delivering it or acting on its result message (whose parameters are public
        there already); rights to change a job are checked by the methods that change it."""
        return await self._store.get_job(job_id)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events from now until its terminal one (at once, if it has already ended)."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(queue)
        try:
            job = await self._store.get_job(job_id)
            if job.state.terminal:
                yield await self.terminal_event(job)
                return
            latest = self._latest.get(job_id)
            if latest is not None:
                yield latest
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]

    async def all_events(self) -> AsyncIterator[JobEvent]:
        """Every job's events, for a front-end that delivers results itself (the console, a restart catch-up)."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._everything.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._everything.discard(queue)

    def _publish(self, event: JobEvent) -> None:
        self._telemetry.observe(event)
        if isinstance(event, TERMINAL_EVENTS):
            self._alerts.job_ended(event)
            self._latest.pop(event.job_id, None)
        else:
            self._latest[event.job_id] = event
        for queue in (*self._watchers.get(event.job_id, ()), *self._everything):
            queue.put_nowait(event)

    async def terminal_event(self, job: Job) -> JobEvent:
        """Rebuild the terminal event of an ended job from the database (and the saved image).

        A done job whose image is no longer stored (deleted, past the retention, or gone from the disk) ends as
        a failure to deliver it, charged what the job cost: the image was made, but nobody can be shown it now.
        """
        if job.state is JobState.DONE and job.review is Review.HELD:
            return JobHeld(job.id, job.review_reason or "it waits for an admin's review", job.cost_micros)
        if job.state is JobState.DONE and job.review is Review.REJECTED:
            return JobRejected(job.id, job.review_reason or "an admin rejected it", job.cost_micros)
        if job.state is JobState.DONE:
            image = await self._stored_image(job)
            if image is None or job.result_path is None:
                return JobFailed(job.id, FailureReason.IMAGE_REMOVED, "the image is no longer stored", job.cost_micros)
            mime = (image_format(Path(job.result_path).suffix[1:]) or PNG).mime
            seconds = (job.finished_at or job.created_at) - job.created_at
            return JobDone(job.id, image, mime, job.request.seed, job.backend, job.cost_micros, seconds)
        if job.state is JobState.CANCELLED:
            return JobCancelled(job.id, job.cost_micros)
        if job.state is JobState.FAILED and job.failure_reason is not None:
            return JobFailed(job.id, job.failure_reason, job.error or "", job.cost_micros)
        raise InvalidRequest(f"job {job.id} has not ended yet", field="job")

    async def _stored_image(self, job: Job) -> bytes | None:
        if job.result_path is None:
            return None
        try:
            return await asyncio.to_thread(Path(job.result_path).read_bytes)
        except FileNotFoundError:
            log.warning("job %s: its image %s is missing from the disk", job.id, job.result_path)
            return None

    def ensure_may_delete(self, requester: Requester, job: Job) -> None:
        """A result may be deleted by the person who asked for it or by an admin; NotAllowed for anyone else."""
        if job.requester.user_key != requester.user_key and not self.is_admin(requester):
            raise NotAllowed("delete", "only the person who asked for this image or an admin can delete it")

    async def delete_result(self, requester: Requester, job_id: str) -> bool:
        """Delete a result's stored image (the requester's own, or any for an admin); False if none was stored."""
        job = await self._store.get_job(job_id.strip())
        self.ensure_may_delete(requester, job)
        return await self._retention.remove(
            job.id, job.result_path, why=f"deleted by {requester.user_key}", actor=requester.user_key
        )

    async def undelivered(self) -> list[Job]:
        return await self._store.undelivered()

    async def mark_delivered(self, job_id: str) -> None:
        await self._store.mark_delivered(job_id)

    async def queue(self, requester: Requester) -> QueueSummary:
        queued = {kind: await self._store.count_jobs(JobState.QUEUED, kind) for kind in BackendKind}
        running = {kind: self._scheduler.running_count(kind) for kind in BackendKind}
        mine = await self._store.jobs(states=[JobState.QUEUED, JobState.RUNNING], user_key=requester.user_key)
        return QueueSummary(queued, running, mine)

    # ---- the user's own views ----

    async def quota_view(self, requester: Requester) -> QuotaView:
        return await self._quota.view(requester)

    async def user_settings(self, requester: Requester) -> dict[str, Any]:
        record = await self._store.get_user(requester.user_key)
        return dict(record.settings) if record else {}

    async def set_user_setting(self, requester: Requester, name: str, value: str) -> dict[str, Any]:
        if name not in USER_SETTINGS:
            raise InvalidRequest(f"unknown setting {name!r}; use one of: {', '.join(sorted(USER_SETTINGS))}")
        if name == "model" and value not in self.settings.models:
            raise InvalidRequest(f"unknown model {value!r}; choose one of: {', '.join(self.settings.models)}")
        if name == "mode":
            try:
                Mode(value)
            except ValueError as exc:
                raise InvalidRequest("mode must be auto, fast or relax", field="mode") from exc
        if name == "aspect" and value not in ASPECT_RATIOS:
            raise InvalidRequest(f"aspect must be one of {', '.join(ASPECT_RATIOS)}", field="aspect")
        if name == "style" and value != "none" and value not in self.settings.styles:
            known = ", ".join([*self.settings.styles, "none"])
            raise InvalidRequest(f"there is no style {value!r}; choose one of: {known}", field="style")
        settings = await self.user_settings(requester)
        settings[name] = value
        await self._store.update_user(requester.user_key, display_name=requester.display_name, settings=settings)
        return settings

    # ---- admin operations (checked here, whatever the front-end did) ----

    def is_admin(self, requester: Requester) -> bool:
        admins = self.settings.admins
        return (
            requester.is_admin
            or requester.user_id in admins.user_ids
            or bool(set(requester.roles).intersection(admins.role_ids))
        )

    def require_admin(self, requester: Requester, action: str) -> None:
        if not self.is_admin(requester):
            raise NotAllowed(action, "only admins can do this")

    async def _subject(self, user_key: str) -> Requester:
        """The requester an admin command is about, with the roles seen last (they decide the tier)."""
        subject = _parse_user_key(user_key)
        record = await self._store.get_user(user_key)
        if record is None:
            return subject
        return Requester(subject.platform, subject.user_id, subject.guild_id, roles=record.roles)

    async def _admin_view(self, user_key: str) -> QuotaView:
        view = await self._quota.view(await self._subject(user_key))
        return replace(view, seen=await self._quota.seen(user_key))

    async def _known(self, user_key: str, action: str) -> None:
        """Only for users who have used the bot: a grant or reset for an id nobody has is an admin's typo."""
        _parse_user_key(user_key)
        if not await self._quota.seen(user_key):
            raise InvalidRequest(
                f"{user_key} has never used this bot, so there is nothing to {action}; check the id"
                " (quota set and ban work ahead of someone's first request)",
                field="user",
            )

    async def admin_quota_show(self, actor: Requester, user_key: str) -> QuotaView:
        self.require_admin(actor, "quota show")
        return await self._admin_view(user_key)

    async def admin_quota_set(self, actor: Requester, user_key: str, field: str, value: str) -> QuotaView:
        """Also for a user who has not used the bot yet: a limit set ahead applies from their first request."""
        self.require_admin(actor, "quota set")
        _parse_user_key(user_key)  # a bad key writes nothing
        await self._quota.set_limit(user_key, field, value, actor.user_key)
        return await self._admin_view(user_key)

    async def admin_quota_grant(self, actor: Requester, user_key: str, resource: Resource, amount: int) -> QuotaView:
        self.require_admin(actor, "quota grant")
        await self._known(user_key, "grant to")
        await self._quota.grant(user_key, resource, amount, actor.user_key)
        return await self._admin_view(user_key)

    async def admin_quota_reset(self, actor: Requester, user_key: str) -> QuotaView:
        self.require_admin(actor, "quota reset")
        await self._known(user_key, "reset")
        await self._quota.reset(user_key, actor.user_key)
        return await self._admin_view(user_key)

    async def admin_spend(self, actor: Requester, month: str | None = None) -> tuple[str, list[SpendRow]]:
        self.require_admin(actor, "spend")
        month = month or self._quota.periods().month
        return month, await self._store.spend_report(month)

    async def admin_credits(self, actor: Requester) -> int:
        self.require_admin(actor, "credits")
        if not self._secrets.bfl_api_key:
            raise BackendUnavailable(
                "BFL_API_KEY is not set, so the BFL balance cannot be read: set it in the environment"
            )
        backend = self._backends.get(BackendKind.API)
        credits = getattr(backend, "credits", None)
        if credits is None:
            raise BackendUnavailable(
                "the BFL API is turned off ([routing] api_enabled = false), so this bot does not read its balance"
            )
        micros: int = await credits()
        return micros

    async def admin_pause(self, actor: Requester, kind: BackendKind, paused: bool) -> None:
        self.require_admin(actor, "pause" if paused else "resume")
        await self._store.set_control(
            f"paused.{kind.value}",
            "1" if paused else "0",
            AuditEntry(actor.user_key, "routing.pause" if paused else "routing.resume", kind.value),
        )
        if paused:
            self._scheduler.paused.add(kind)
        else:
            self._scheduler.paused.discard(kind)
            self._scheduler.wake()

    async def admin_ban(self, actor: Requester, user_key: str, banned: bool) -> bool:
        """Ban (also ahead of someone's first request) or unban; returns whether the user has used the bot."""
        self.require_admin(actor, "ban" if banned else "unban")
        _parse_user_key(user_key)
        seen = await self._quota.seen(user_key)
        record = await self._store.get_user(user_key)
        if not banned and not (record and record.banned):
            never = " and has never used this bot" if not seen else ""
            raise InvalidRequest(f"{user_key} is not banned{never}; nothing was changed", field="user")
        await self._store.update_user(
            user_key, banned=banned, audit=AuditEntry(actor.user_key, "user.ban" if banned else "user.unban", user_key)
        )
        return seen

    # ---- styles (engine/styles.py) ----

    def style_report(self, actor: Requester) -> list[StyleServing]:
        """Each configured style and the GPU slots that have its adapters loaded now."""
        self.require_admin(actor, "styles")
        lane = self._backends.get(BackendKind.LOCAL)
        return style_report(self.settings.styles, lane.style_slots() if isinstance(lane, GpuPool) else None)

    async def reload_styles(self, actor: Requester) -> str:
        """Read [styles.*] from the config file again and serve them without a restart: workers are replaced between
        jobs to load new adapters, so no job is lost."""
        self.require_admin(actor, "styles")
        reload = await read_styles(self._config_path, self.settings)
        self.settings = self.settings.model_copy(update={"styles": reload.styles})
        self._scheduler.use_settings(self.settings)
        lane = self._backends.get(BackendKind.LOCAL)
        if isinstance(lane, GpuPool):
            await lane.reload_styles(reload.styles)
        await self._store.audit(AuditEntry(actor.user_key, "styles.reload", None, detail=reload.detail()))
        return reload.summary()

    async def check_styles(self, actor: Requester, *, render_limit_s: float = 600.0) -> list[StyleCheck]:
        """Each style with adapters: its files and hashes, then one test render on the GPU lane (relax mode, as the
        admin asking: it counts against their GPU time like any image)."""
        self.require_admin(actor, "styles")
        checks = []
        for name, style in self.settings.styles.items():
            if not style.gpu_only:
                continue
            if problems := await adapter_problems(name, style):
                checks.append(StyleCheck(name, problems))
                continue
            model = style.model or (style.models[0] if style.models else self.settings.routing.default_model)
            prompt = f"a test render of the style {style.display_name}"
            try:
                queued = await self.submit(actor, ImageRequest(prompt, model, style=name, mode=Mode.RELAX))
            except EngineError as exc:
                checks.append(StyleCheck(name, (), rendered=f"not rendered: {exc}"))
                continue
            checks.append(
                StyleCheck(name, (), queued.job_id, await render_outcome(self._store, queued.job_id, render_limit_s))
            )
        return checks

    # ---- review ----

    async def held_jobs(self, actor: Requester, limit: int = 100) -> list[Job]:
        """The images waiting for an admin's review, oldest first."""
        self.require_admin(actor, "review")
        return await self._store.held_jobs(limit)

    async def held_image(self, actor: Requester, job_id: str) -> bytes:
        """A held job's image, for the admins' review channel only."""
        self.require_admin(actor, "review")
        job = await self._held(job_id)
        image = await self._stored_image(job)
        if image is None:
            raise InvalidRequest(f"job {job_id}'s image is no longer stored", field="job")
        return image

    async def approve(self, actor: Requester, job_id: str) -> Job:
        """Deliver a held image to where it was asked for (the front-ends post it as any result)."""
        self.require_admin(actor, "review")
        job = await self._held(job_id)
        audit = AuditEntry(actor.user_key, "review.approve", job.requester.user_key, job.id)
        if not await self._store.decide_review(job.id, Review.APPROVED, audit):
            raise InvalidRequest(f"job {job_id} was decided meanwhile", field="job")
        approved = await self._store.get_job(job.id)
        self._publish(await self.terminal_event(approved))
        return approved

    async def reject(self, actor: Requester, job_id: str, reason: str, *, ban: bool = False) -> Job:
        """Never show a held image: delete it, tell the requester, and with `ban` ban them too."""
        self.require_admin(actor, "review")
        job = await self._held(job_id)
        why = reason.strip() or "an admin rejected it"
        detail = {"reason": why, "ban": ban}
        audit = AuditEntry(actor.user_key, "review.reject", job.requester.user_key, job.id, detail)
        if not await self._store.decide_review(job.id, Review.REJECTED, audit):
            raise InvalidRequest(f"job {job_id} was decided meanwhile", field="job")
        await self._retention.remove(job.id, job.result_path, why=f"rejected in review: {why}", actor=actor.user_key)
        if ban:
            await self._store.update_user(
                job.requester.user_key,
                banned=True,
                audit=AuditEntry(actor.user_key, "user.ban", job.requester.user_key, job.id, {"why": "review"}),
            )
        self._publish(JobRejected(job.id, why, job.cost_micros))
        return await self._store.get_job(job.id)

    async def record_posting(self, posting: Posting) -> None:
        """A front-end posted a job's image somewhere: remembered, so a take-down can remove it there."""
        await self._store.record_posting(posting)

    async def take_down(self, actor: Requester, job_id: str, reason: str) -> tuple[Job, list[Posting], bool]:
        """Take a result down: delete the stored image, keep the job's record with the reason and an audit line;
        returns the job, the places it was posted (for the caller to delete there) and whether the stored file
        was there to delete."""
        self.require_admin(actor, "takedown")
        why = reason.strip()
        if not why:
            raise InvalidRequest("say why: takedown JOB REASON (the reason is kept with the job)", field="reason")
        job = await self._store.get_job(job_id.strip())
        postings = await self._store.postings(job.id)
        removed = await self._retention.remove(job.id, job.result_path, why=f"taken down: {why}", actor=actor.user_key)
        detail = {"reason": why, "places": len(postings), "stored_file": removed}
        await self._store.take_down(
            job.id, why, AuditEntry(actor.user_key, "takedown", job.requester.user_key, job.id, detail)
        )
        return await self._store.get_job(job.id), postings, removed

    async def _held(self, job_id: str) -> Job:
        job = await self._store.get_job(job_id.strip())
        if job.review is not Review.HELD:
            state = f"was {job.review.value}" if job.review is not Review.NONE else "was not held for review"
            raise InvalidRequest(f"job {job_id} {state}: nothing to decide", field="job")
        return job

    async def audit_log(
        self, actor: Requester, *, since: float | None = None, action: str | None = None, limit: int = 200
    ) -> list[AuditRecord]:
        """The audit trail, newest first: who did what, to whom, when."""
        self.require_admin(actor, "audit")
        return await self._store.audit_records(since=since, action=action, limit=limit)

    async def admin_jobs(self, actor: Requester, states: list[JobState] | None = None, limit: int = 50) -> list[Job]:
        self.require_admin(actor, "jobs")
        return await self._store.jobs(
            states=states or [JobState.QUEUED, JobState.RUNNING], limit=limit, newest_first=True
        )

    async def report(self, actor: Requester) -> ReportChart:
        """The last 30 days for an admin: a summary and its chart."""
        self.require_admin(actor, "report")
        report = await build_report(self._store, self.settings, self._quota.periods())
        # Drawing takes CPU for a noticeable fraction of a second: off the event loop, so chat traffic goes on.
        png = await asyncio.to_thread(render_png, report)
        return ReportChart(summary_text(report), png, report.last_day)

    def alerts(self) -> AsyncIterator[Alert]:
        """Every alert from this call on, for a front-end that posts them (alerts nobody follows are only logged)."""
        return self._alerts.stream()

    # ---- operations: health, metrics, the watchdog ----

    async def health(self) -> Health:
        """For /healthz: does the database answer a query within a short timeout, and can any backend take jobs."""
        return await self._telemetry.health()

    async def metrics(self) -> bytes:
        """The Prometheus exposition text for /metrics."""
        return await self._telemetry.scrape()

    async def heartbeat(self) -> None:
        """One cheap database round trip: returns when the database answers, raises when it does not."""
        await self._store.get_control("heartbeat")

    async def stats(self) -> dict[str, Any]:
        counts = {state.value: await self._store.count_jobs(state) for state in JobState}
        return {
            "jobs": counts,
            "running": {kind.value: self._scheduler.running_count(kind) for kind in BackendKind},
            "paused": sorted(kind.value for kind in self._scheduler.paused),
            "posted": await self._store.ledger_totals(),
            "backends": sorted(kind.value for kind in self._backends),
            "demo": self.demo,
        }


_USER_KEY_FORMS = "discord:USER_ID, slack:TEAM_ID:USER_ID or console:NAME"
# Any id a platform gives (Discord's are numbers, console names are logins); that a user is unknown is reported apart.
_USER_ID = re.compile(r"[A-Za-z0-9._@+-]+")
_SLACK_ID = re.compile(r"[A-Z0-9]+")


def _parse_user_key(user_key: str) -> Requester:
    """The user an admin names, checked before anything is written: a known platform and that platform's ids."""
    platform, _, rest = user_key.partition(":")
    try:
        kind = Platform(platform)
    except ValueError:
        raise InvalidRequest(f"{user_key!r} is not a user key: use {_USER_KEY_FORMS}", field="user") from None
    if kind is Platform.SLACK:
        team, _, user = rest.partition(":")
        if not (_SLACK_ID.fullmatch(team) and _SLACK_ID.fullmatch(user)):
            raise InvalidRequest(
                f"{user_key!r} is not a Slack user key: it needs the workspace and the user, as in slack:T123:U456"
                " (their ids, in capitals)",
                field="user",
            )
        return Requester(kind, user, guild_id=team)
    if not _USER_ID.fullmatch(rest):
        example = "discord:123456789012345678" if kind is Platform.DISCORD else "console:alice"
        raise InvalidRequest(f"{user_key!r} names no {kind.value} user: use a user id, as in {example}", field="user")
    return Requester(kind, rest)


# ---- without a running engine: doctor, the admin CLI, the worker subcommand ----


def parse_grant(resource: str, text: str) -> tuple[Resource, int]:
    """`images 5`, `gpu-seconds 600`, `usd 2.50` -> the resource and its stored amount, or InvalidRequest."""
    return Quota.parse_grant(resource, text)


def ledger_problems(database_path: Path) -> list[str]:
    """Each running total that differs from what the ledger's lines add up to, read-only (doctor's check)."""
    return [str(difference) for difference in totals_differences_in(database_path)]


async def bfl_credits(settings: Settings, secrets: Secrets, *, timeout_s: float) -> int:
    """The BFL balance in micro-dollars, asked once with a short timeout (doctor's check of the key).

    Raises BackendUnavailable (no key, a refused key, an unreachable API) or TimeoutError.
    """
    if not secrets.bfl_api_key:
        raise BackendUnavailable("BFL_API_KEY is not set")
    from engine.backends.bfl import BflBackend

    backend = BflBackend(settings.bfl, settings.models, secrets.bfl_api_key)
    await backend.start()
    try:
        return await asyncio.wait_for(backend.credits(), timeout_s)
    finally:
        await backend.close()


async def gpu_lane_report(settings: Settings, secrets: Secrets) -> GpuLaneReport:
    """The GPU hosts' lane on NATS as the server holds it (`[nats] url` must be set)."""
    from engine.backends.nats import lane_report

    return await lane_report(settings.nats, secrets.nats)


def run_worker(args: list[str]) -> int:
    """`flux-bot worker ARGS`: one local worker process, or with `--nats URL` a GPU host of the lane; its exit
    status."""
    if any(arg == "--nats" or arg.startswith("--nats=") for arg in args):
        from engine.backends.gpu_host import main as serve_gpu_host

        return serve_gpu_host(args)
    # Imported here: the worker loads torch and diffusers, which nothing else of the bot needs.
    from engine.backends.local.cli import main

    return main(args)
