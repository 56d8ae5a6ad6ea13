"""Delivery shared by the chat front-ends: following a job with throttled progress edits, results nobody follows,
and alerts to the admin channel. The platforms supply only how a text is shown and how a result is posted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bot import render
from engine.models import (
    TERMINAL_EVENTS,
    Job,
    JobEvent,
    JobProgress,
    JobQueued,
    JobRerouted,
    JobStarted,
    JobWaiting,
    Platform,
    Requester,
)
from engine.service import Engine

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 15.0
# A result that ended this long ago and is still undelivered has no delivery of its own under way.
SWEEP_GRACE_S = 120.0


class ThrottledEditor:
    """Sends at most one progress edit per interval and always the latest one; older pending states are dropped."""

    def __init__(self, send: Callable[[str, bytes | None], Awaitable[None]], interval_s: float) -> None:
        self._send = send
        self._interval_s = interval_s
        self._latest: tuple[str, bytes | None] | None = None
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="progress edits")

    def update(self, text: str, preview: bytes | None) -> None:
        self._latest = (text, preview)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            latest, self._latest = self._latest, None
            if latest is not None:
                async with self._sending:
                    await self._send(*latest)
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """Stop after the edit in flight (so it cannot land on top of the final message); drop what is pending."""
        async with self._sending:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def follow(
    engine: Engine,
    queued: JobQueued,
    model: str,
    *,
    show: Callable[[str, bytes | None], Awaitable[None]],
    deliver: Callable[[JobEvent], Awaitable[None]],
    interval_s: float,
) -> None:
    """Show a job's progress until it ends, then hand its terminal event to `deliver`.

    `show` gets the whole text each time: the queued note (place, ETA, route) and, while it runs, the progress line,
    with the preview image when the backend sent one. The note is shown at once; later texts at most once per
    `interval_s`, the latest winning. `model` is the model's display name for the note.
    """
    job_id = queued.job_id
    header = render.queued_text(queued, model)
    await show(header, None)

    async def line(text: str, preview: bytes | None) -> None:
        await show(f"{header}\n{text}" if text else header, preview)

    editor = ThrottledEditor(line, interval_s)
    try:
        async for event in engine.events(job_id):
            if isinstance(event, JobProgress):
                editor.update(render.progress_bar(event.step, event.total), event.preview_png)
            elif isinstance(event, JobWaiting):
                moved = render.queued_text(queued, model, event)
                if moved != header:
                    header = moved
                    editor.update("", None)
            elif isinstance(event, JobStarted | JobRerouted):
                if isinstance(event, JobRerouted):
                    # Where it waits now, for the next JobWaiting's note.
                    queued = JobQueued(job_id, queued.position, queued.eta_s, event.route)
                editor.update(render.event_line(event), None)
            elif isinstance(event, TERMINAL_EVENTS):
                await editor.close()
                await deliver(event)
    finally:
        await editor.close()


class ChannelDelivery:
    """Results that no live conversation follows (jobs from before a restart) go to their channel, exactly once.

    A front-end calls `follow(job_id)` for jobs it delivers itself; `run()` watches every job's end and `backlog()`
    takes what ended while the bot was down. Both may see the same job: the lock and the job's `delivered` flag
    make the second one do nothing.
    """

    def __init__(self, engine: Engine, platform: Platform, deliver: Callable[[Job, JobEvent], Awaitable[None]]) -> None:
        self._engine = engine
        self._platform = platform
        self._deliver = deliver
        self._followed: set[str] = set()
        self._lock = asyncio.Lock()

    def follow(self, job_id: str) -> None:
        self._followed.add(job_id)

    async def run(self) -> None:
        async for event in self._engine.all_events():
            if not isinstance(event, TERMINAL_EVENTS):
                continue
            if event.job_id in self._followed:
                self._followed.discard(event.job_id)  # its follower delivers it; this was the last use of the id
                continue
            await self._deliver_once(event.job_id, event)

    async def backlog(self, *, ended_before: float | None = None) -> None:
        """Deliver what ended undelivered (while the bot was down); with `ended_before`, only what ended by then."""
        for job in await self._engine.undelivered():
            if ended_before is not None and (job.finished_at or 0.0) > ended_before:
                continue
            if job.requester.platform is self._platform and job.id not in self._followed:
                await self._deliver_once(job.id, None)

    async def sweep(self, every_s: float = SWEEP_EVERY_S, grace_s: float = SWEEP_GRACE_S) -> None:
        """Now and then, the backlog of what ended a while ago: an image approved with `flux-bot admin review`
        (another process, whose events this one never sees) is posted without waiting for a restart. Jobs that
        ended lately are left to their own delivery, which may still be posting them."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.backlog(ended_before=time.time() - grace_s)
            except Exception:
                log.exception("the %s delivery sweep failed; trying again later", self._platform.value)

    async def _deliver_once(self, job_id: str, event: JobEvent | None) -> None:
        """Failures are logged and the job stays undelivered for the next start."""
        try:
            async with self._lock:
                job = await self._engine.get_job(job_id)
                if job.requester.platform is self._platform and not job.delivered:
                    await self._deliver(job, event or await self._engine.terminal_event(job))
        except Exception:
            log.exception("job %s: could not deliver its result to %s", job_id, self._platform.value)


async def forward_alerts(engine: Engine, post: Callable[[str], Awaitable[None]], where: str) -> None:
    """Post every alert to an admin channel until cancelled.

    A failed post is logged and the next alert still goes: the alert is already in the log and the audit trail.
    """
    async for alert in engine.alerts():
        try:
            await post(render.alert_text(alert))
        except Exception:
            log.exception("could not post an alert to %s", where)


def reviewer(platform: Platform) -> Requester:
    """The bot itself as an admin: the one reader of a held image, to post it in the admins' review channel."""
    return Requester(platform, "flux-bot", is_admin=True, display_name="flux-bot")


def warn_no_review_channel(job_id: str, setting: str, chat_command: str) -> None:
    """A held image with nowhere to post it: it waits in the database for an admin's command."""
    log.warning(
        "job %s is held for review and no [review] %s is set: its image waits for an admin (%s in chat or"
        " `flux-bot admin review` list it)",
        job_id,
        setting,
        chat_command,
    )
