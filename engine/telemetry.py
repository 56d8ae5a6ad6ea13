"""What operators see: Prometheus metrics, one structured log line per job transition, and the health report.

The engine feeds every JobEvent to `Telemetry.observe` synchronously as it publishes it. Durations come from the
engine's clock and per-job timestamps held here until the job's terminal event; a job this process never saw queued
(taken up after a restart) still counts when it ends, without the durations nobody here measured.

Each Telemetry owns its registry (never prometheus_client's global one), so several engines can live in one process.
Gauges that need the database are read in `refresh()`, awaited before a scrape: prometheus_client's collect() is
synchronous and must not block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.backends.base import Backend
from engine.backends.gpu_probe import GpuReading
from engine.models import (
    MICROS_PER_DOLLAR,
    TERMINAL_EVENTS,
    BackendKind,
    BackendStatus,
    Job,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobHeld,
    JobProgress,
    JobQueued,
    JobRejected,
    JobRerouted,
    JobStarted,
    JobState,
)
from engine.scheduler import Scheduler
from engine.store import Store

if TYPE_CHECKING:
    from engine.backends.local.supervisor import WorkerInfo

log = logging.getLogger(__name__)
job_log = logging.getLogger("flux_bot.jobs")  # the transition lines only, so they can be routed on their own

# Jobs take from half a second (an idle API) to several minutes (a long local queue); beyond 10 minutes is +Inf.
LATENCY_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DATABASE_TIMEOUT_S = 2.0
UNKNOWN = "unknown"
DETAIL_CHARS = 200


@runtime_checkable
class WorkerPool(Protocol):
    """What a supervisor of worker processes reports to operators (`LocalBackend`, and the GPU pool over it)."""

    @property
    def recycles(self) -> int: ...

    def workers(self) -> list[WorkerInfo]: ...

    def capacity(self) -> int: ...

    def gpu_readings(self) -> list[GpuReading]: ...


@dataclass(frozen=True, slots=True)
class Health:
    """The database answered a trivial query (or why not), what each backend says, and the local worker processes."""

    database_error: str | None
    backends: tuple[BackendStatus, ...]
    workers: tuple[WorkerInfo, ...] = ()
    worker_slots: int = 0

    @property
    def problems(self) -> list[str]:
        problems: list[str] = []
        if self.database_error is not None:
            problems.append(f"database: {self.database_error}")
        if not self.backends:
            problems.append("no backend is configured")
        elif not any(status.available for status in self.backends):
            problems.extend(f"{status.kind.value}: {_unusable(status)}" for status in self.backends)
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems


def _unusable(status: BackendStatus) -> str:
    why = "paused" if status.healthy else "unhealthy"
    return f"{why} ({status.detail})" if status.detail else why


@dataclass(slots=True)
class _Tracked:
    """What the log line and the labels need of a job whose events carry only its id."""

    user: str = UNKNOWN
    model: str = UNKNOWN
    backend: BackendKind | None = None
    route_reason: str = ""
    submitted_at: float | None = None  # None: queued before this process started
    queued_at: float | None = None  # of the current attempt (a reroute queues the job again)
    started_at: float | None = None  # of the current attempt, if this process saw it queued
    queue_s: float | None = None  # the current attempt's wait

    @property
    def route(self) -> str:
        return self.backend.value if self.backend else UNKNOWN


@dataclass(slots=True)
class _Line:
    """One logfmt line: `key=value` pairs, values quoted where they hold spaces, quotes or `=`."""

    fields: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: object) -> _Line:
        if value is not None:
            self.fields.append((key, value if isinstance(value, str) else str(value)))
        return self

    def seconds(self, key: str, value: float | None) -> _Line:
        return self.add(key, None if value is None else f"{value:.2f}")

    def usd(self, key: str, micros: int) -> _Line:
        return self.add(key, f"{Decimal(micros) / MICROS_PER_DOLLAR:.6f}")

    def __str__(self) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in self.fields)


_ESCAPES = {"\\": "\\\\", '"': '\\"'}


def _logfmt_value(value: str) -> str:
    if value and value.isprintable() and not any(c in value for c in ' "=\\'):
        return value
    # Control characters are escaped too: a failure detail from a remote API must not be able to forge a line.
    escaped = "".join(_ESCAPES.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in value)
    return f'"{escaped}"'


class Telemetry:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        backends: Mapping[BackendKind, Backend],
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._backends = dict(backends)
        local = self._backends.get(BackendKind.LOCAL)
        self._pool: WorkerPool | None = local if isinstance(local, WorkerPool) else None
        self._clock = clock
        self._jobs: dict[str, _Tracked] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self._submitted = Counter(
            "flux_bot_jobs_submitted",
            "Jobs queued, by the route chosen and the model",
            ["backend", "model"],
            registry=r,
        )
        self._ended = Counter(
            "flux_bot_jobs_ended", "Jobs that ended, by state and backend", ["state", "backend"], registry=r
        )
        self._failures = Counter("flux_bot_job_failures", "Failed jobs by reason", ["reason", "backend"], registry=r)
        self._reroutes = Counter(
            "flux_bot_job_reroutes",
            "Failovers to a new attempt, by the failure that caused them",
            ["from_backend", "to_backend", "reason"],
            registry=r,
        )
        self._spend = Counter(
            "flux_bot_api_spend_dollars",
            "Money the API billed for ended jobs, by the job's state",
            ["state"],
            registry=r,
        )
        self._queue_wait = Histogram(
            "flux_bot_job_queue_wait_seconds",
            "From queued (or rerouted) to started, per attempt",
            ["backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._generation = Histogram(
            "flux_bot_job_generation_seconds",
            "From started to done, for jobs that ended done",
            ["backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._end_to_end = Histogram(
            "flux_bot_job_end_to_end_seconds",
            "From queued to the terminal state, by state and the last backend",
            ["state", "backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._queued = Gauge("flux_bot_jobs_queued", "Jobs waiting in the queue, by backend", ["backend"], registry=r)
        self._database_up = Gauge("flux_bot_database_up", "1 if the database answered the last scrape", registry=r)
        for state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            self._spend.labels(state.value)  # zero until the first charge, so that rate() sees the first one
            for kind in BackendKind:
                self._ended.labels(state.value, kind.value)
        r.register(_LiveCollector(scheduler, self._pool))

    # ---- jobs ----

    def track(self, job: Job) -> None:
        """Remember who asked and for what, before the job's first event (events carry only the job id)."""
        tracked = self._jobs.setdefault(job.id, _Tracked())
        tracked.user, tracked.model, tracked.backend = job.requester.user_key, job.request.model, job.backend
        tracked.route_reason = job.reason

    def observe(self, event: JobEvent) -> None:
        """Count the event and log the transition; never raises, since it runs inside the engine's publishing."""
        if isinstance(event, JobProgress):
            return
        try:
            self._observe(event, self._clock())
        except Exception:
            log.exception("telemetry failed on %s for job %s", type(event).__name__, event.job_id)

    def _observe(self, event: JobEvent, now: float) -> None:
        if isinstance(event, JobQueued):
            job = self._jobs.setdefault(event.job_id, _Tracked())
            job.backend, job.route_reason = event.route.backend, event.route.reason
            job.submitted_at = job.queued_at = now
            self._submitted.labels(job.route, job.model).inc()
            line = self._line("job.queued", event.job_id, job).add("position", event.position)
            line.seconds("eta_s", event.eta_s).usd("estimated_cost_usd", event.route.estimated_cost_micros)
            job_log.info("%s", line)
        elif isinstance(event, JobRerouted):
            job = self._jobs.setdefault(event.job_id, _Tracked())
            before = job.route
            job.backend, job.route_reason = event.route.backend, event.route.reason
            job.started_at, job.queue_s = None, None
            job.queued_at = now if job.submitted_at is not None else None
            self._reroutes.labels(before, job.route, event.after.value).inc()
            job_log.info(
                "%s", self._line("job.rerouted", event.job_id, job).add("from", before).add("after", event.after)
            )
        elif isinstance(event, JobStarted):
            job = self._jobs.setdefault(event.job_id, _Tracked())
            job.backend = event.backend
            if job.queued_at is not None:
                job.started_at, job.queue_s = now, now - job.queued_at
                self._queue_wait.labels(job.route).observe(job.queue_s)
            job_log.info("%s", self._line("job.started", event.job_id, job).seconds("queue_s", job.queue_s))
        elif isinstance(event, JobRejected):
            # An admin's decision about a job counted when it ended (held): a log line, not a second end.
            job_log.info("%s", _Line().add("event", "job.rejected").add("job", event.job_id))
        elif isinstance(event, TERMINAL_EVENTS):
            self._ended_event(event, now)

    def _ended_event(self, event: JobDone | JobFailed | JobCancelled | JobHeld, now: float) -> None:
        job = self._jobs.pop(event.job_id, None) or _Tracked()
        if isinstance(event, JobDone):
            job.backend, state, charged = event.backend, JobState.DONE, event.cost_micros
        elif isinstance(event, JobHeld):
            state, charged = JobState.DONE, event.charged_micros  # made and charged; only its showing waits
        elif isinstance(event, JobFailed):
            state, charged = JobState.FAILED, event.charged_micros
        else:
            state, charged = JobState.CANCELLED, event.charged_micros
        generation_s = now - job.started_at if job.started_at is not None else None
        total_s = now - job.submitted_at if job.submitted_at is not None else None
        self._ended.labels(state.value, job.route).inc()
        if charged:
            self._spend.labels(state.value).inc(charged / MICROS_PER_DOLLAR)
        if state is JobState.DONE and generation_s is not None:
            self._generation.labels(job.route).observe(generation_s)
        if total_s is not None:
            self._end_to_end.labels(state.value, job.route).observe(total_s)
        line = self._line(f"job.{state.value}", event.job_id, job)
        if isinstance(event, JobFailed):
            self._failures.labels(event.reason.value, job.route).inc()
            line.add("failure", event.reason).add("detail", event.detail[:DETAIL_CHARS])
        line.seconds("queue_s", job.queue_s).seconds("gen_s", generation_s).seconds("total_s", total_s)
        line.usd("cost_usd", charged)
        job_log.log(logging.WARNING if state is JobState.FAILED else logging.INFO, "%s", line)

    @staticmethod
    def _line(name: str, job_id: str, job: _Tracked) -> _Line:
        # The prompt never goes in: it may hold what its author would not want in a log, and it adds nothing here.
        line = _Line().add("event", name).add("job", job_id).add("user", job.user).add("route", job.route)
        return line.add("model", job.model).add("reason", job.route_reason or None)

    # ---- scrape-time readings ----

    async def refresh(self, timeout_s: float = DATABASE_TIMEOUT_S) -> None:
        """Read the gauges that need the database; on failure say so, rather than show stale queue depths."""

        async def depths() -> dict[BackendKind, int]:
            return {kind: await self._store.count_jobs(JobState.QUEUED, kind) for kind in BackendKind}

        try:
            queued = await asyncio.wait_for(depths(), timeout_s)
        except Exception as exc:
            log.warning("metrics: the database did not answer: %s", _describe(exc, timeout_s))
            self._database_up.set(0)
            self._queued.clear()
            return
        self._database_up.set(1)
        for kind, depth in queued.items():
            self._queued.labels(kind.value).set(depth)

    async def scrape(self) -> bytes:
        """The Prometheus text exposition of this engine's metrics, with the database gauges read just now."""
        await self.refresh()
        return generate_latest(self.registry)

    async def health(self, timeout_s: float = DATABASE_TIMEOUT_S) -> Health:
        """The database within `timeout_s`, and each backend's own view (read without the database, so a database
        outage does not hide what the backends say)."""
        database_error: str | None = None
        try:
            await asyncio.wait_for(self._store.get_control("heartbeat"), timeout_s)
        except Exception as exc:
            database_error = _describe(exc, timeout_s)
        statuses = []
        for kind, backend in self._backends.items():
            status = backend.status(0)
            statuses.append(replace(status, paused=True) if kind in self._scheduler.paused else status)
        if self._pool is None:
            return Health(database_error, tuple(statuses))
        return Health(database_error, tuple(statuses), tuple(self._pool.workers()), self._pool.capacity())


def _describe(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _LiveCollector:
    """Gauges read from memory at each scrape: running jobs, worker processes and GPUs."""

    def __init__(self, scheduler: Scheduler, pool: WorkerPool | None) -> None:
        self._scheduler = scheduler
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("flux_bot_jobs_running", "Jobs being generated, by backend", labels=["backend"])
        for kind in BackendKind:
            running.add_metric([kind.value], self._scheduler.running_count(kind))
        yield running
        pool = self._pool
        if pool is None:
            return
        yield CounterMetricFamily(
            "flux_bot_worker_recycles", "Local worker processes replaced, for any reason", value=pool.recycles
        )
        yield GaugeMetricFamily("flux_bot_local_workers", "Local worker processes running", value=len(pool.workers()))
        yield GaugeMetricFamily(
            "flux_bot_local_worker_slots", "Local worker processes configured", value=pool.capacity()
        )
        readings = pool.gpu_readings()
        temperature = GaugeMetricFamily("flux_bot_gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
        used = GaugeMetricFamily("flux_bot_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("flux_bot_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        for reading in readings:
            gpu = [str(reading.index)]
            temperature.add_metric(gpu, reading.temperature_c)
            used.add_metric(gpu, reading.memory_used_bytes)
            total.add_metric(gpu, reading.memory_total_bytes)
        yield from (temperature, used, total)
