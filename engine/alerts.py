"""Alerts for the admins: the month's API spend crossing shares of the global cap, and a burst of failures.

The Engine calls `job_ended` for every terminal event; the checks run in one background task, so a burst of ended
jobs costs one check at a time, never one per job. What was announced is remembered in the `controls` table (and
each alert in the audit log), so a restart does not announce it again. Front-ends subscribe with `stream()` and post
each alert to their admin channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.config import Settings, dollars
from engine.ledger import periods_at
from engine.models import AuditEntry, JobCancelled, JobDone, JobEvent, JobFailed, JobState
from engine.store import Store

log = logging.getLogger(__name__)

FAILURE_WINDOW_S = 3600  # the failure rate is measured over the last hour, and announced at most once an hour
SPEND_CONTROL = "alert.spend"  # "YYYY-MM:P": the highest share of the cap announced in that month
FAILURE_CONTROL = "alert.failures"  # the clock time of the last failure-rate alert
ACTOR = "flux-bot"


@dataclass(frozen=True, slots=True)
class SpendAlert:
    month: str
    percent: int  # the highest threshold crossed (several crossed at once are announced as this one)
    spent_micros: int
    cap_micros: int


@dataclass(frozen=True, slots=True)
class FailureAlert:
    failed: int
    ended: int  # done + failed in the window: a cancellation is the user's choice, not a failure
    threshold: float
    window_s: int


Alert = SpendAlert | FailureAlert


class Alerts:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float]) -> None:
        self._store = store
        self._ops = settings.ops
        self._cap = dollars(settings.limits.global_api_usd_per_month)
        self._clock = clock
        self._zone = settings.bot.zone
        self._subscribers: set[asyncio.Queue[Alert]] = set()
        self._spend_due = False
        self._failures_due = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def job_ended(self, event: JobEvent) -> None:
        """Note a terminal event (called synchronously from Engine._publish) and make sure a check will run."""
        match event:
            case JobDone(cost_micros=money) | JobFailed(charged_micros=money) | JobCancelled(charged_micros=money):
                self._spend_due = self._spend_due or money > 0
        if isinstance(event, JobFailed):  # only a failure can raise the failure rate
            self._failures_due = True
        if (self._spend_due or self._failures_due) and not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="alert checks")

    def stream(self) -> AsyncIterator[Alert]:
        """Every alert from this call on, for a front-end that posts them (alerts nobody follows are only logged).

        Subscribed at the call, not at the first iteration, so nothing emitted in between is missed.
        """
        queue: asyncio.Queue[Alert] = asyncio.Queue()
        self._subscribers.add(queue)
        return self._follow(queue)

    async def _follow(self, queue: asyncio.Queue[Alert]) -> AsyncIterator[Alert]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def drain(self) -> None:
        """Wait for the checks in flight (and those they queued) to finish."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        """Let the check in flight finish (it may be writing to the store), then take no more."""
        self._closed = True
        await self.drain()

    async def _run(self) -> None:
        while self._spend_due or self._failures_due:
            spend, failures = self._spend_due, self._failures_due
            self._spend_due = self._failures_due = False
            try:
                if spend:
                    await self.check_spend()
                if failures:
                    await self.check_failures()
            except Exception:
                log.exception("alert check failed; the next ended job checks again")

    async def check_spend(self) -> SpendAlert | None:
        """Announce the highest newly crossed share of the month's cap; nothing without a cap."""
        if not self._cap or not self._ops.spend_alert_percents:
            return None
        month = periods_at(self._clock(), self._zone).month
        spent = await self._store.posted_spend(month)
        crossed = [p for p in sorted(set(self._ops.spend_alert_percents)) if spent * 100 >= p * self._cap]
        if not crossed or crossed[-1] <= _announced(await self._store.get_control(SPEND_CONTROL), month):
            return None
        alert = SpendAlert(month, crossed[-1], spent, self._cap)
        detail = {"month": month, "percent": alert.percent, "spent_micros": spent, "cap_micros": self._cap}
        await self._store.set_control(
            SPEND_CONTROL, f"{month}:{alert.percent}", AuditEntry(ACTOR, "alert.spend", detail=detail)
        )
        self._emit(alert)
        return alert

    async def check_failures(self) -> FailureAlert | None:
        now = self._clock()
        last = await self._store.get_control(FAILURE_CONTROL)
        if last is not None and now - float(last) < FAILURE_WINDOW_S:
            return None
        counts = await self._store.ended_counts(now - FAILURE_WINDOW_S)
        failed = counts.get(JobState.FAILED, 0)
        ended = failed + counts.get(JobState.DONE, 0)
        if ended < self._ops.failure_alert_min_jobs or failed / ended < self._ops.failure_alert_rate:
            return None
        alert = FailureAlert(failed, ended, self._ops.failure_alert_rate, FAILURE_WINDOW_S)
        detail = {"failed": failed, "ended": ended, "threshold": alert.threshold}
        await self._store.set_control(FAILURE_CONTROL, repr(now), AuditEntry(ACTOR, "alert.failures", detail=detail))
        self._emit(alert)
        return alert

    def _emit(self, alert: Alert) -> None:
        log.warning("alert: %s", alert)
        for queue in self._subscribers:
            queue.put_nowait(alert)


def _announced(control: str | None, month: str) -> int:
    """The share already announced this month (0 when the control names an earlier month, or none)."""
    if control is None:
        return 0
    announced_month, _, percent = control.partition(":")
    return int(percent) if announced_month == month else 0
