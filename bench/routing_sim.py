"""A day of a busy community, in simulated time: local GPU only, BFL API only, and flux-bot's router.

Discrete-event simulation on a virtual clock: an asyncio event loop whose clock jumps to the next timer instead of
waiting, so a day runs in seconds and every run with the same seed gives the same numbers. Everything but the image
making is flux-bot's own code: `Engine.submit` (validation, policy, `router.route`, the quota checks and reservations
in a real SQLite file), the scheduler (fair dispatch, `router.failover`, settle / void), on the virtual clock. Only
the two backends are simulated:

- local GPU: one worker; [dev] 1024x1024 at 28 steps takes a uniform draw from the profile's range (other models
  and sizes scale with steps x megapixels). `--gpu h100`: 2.8-3.2 s (the published best of ~3.0 s on an H100; no
  H100 of ours has been measured yet), `--gpu rtx4090`: 45-90 s (field reports). Its ETA is estimated the way
  LocalBackend does it: steps x `local_seconds_per_step` until measured, then a moving average per job shape.
- BFL API: the POST takes 0.3 s; a task then runs 18 s on average (lognormal, coefficient of variation 0.35),
  seen at the next poll of BflBackend's schedule (0.5 s, x1.5, up to 5 s) and downloaded in 0.3 s. 1 in 20 tasks
  never finishes: flux-bot gives up after `total_timeout_s` (120 s by default) and BFL bills it. 1 in 200 submits
  answers a 5xx (nothing billed). BFL answers 429 above 24 active tasks (flux-bot's own cap is `max_concurrency`,
  20); the estimate and the health rule (5 server failures in a row) are BflBackend's.

Demand: Poisson arrivals whose rate follows an hourly profile of the community's day (UTC), as a multiple of the
GPU's capacity (1 / mean [dev] time): quiet at night, 3x capacity at the evening peak (20:00-22:00), and in total
one day of GPU capacity. Every request is /imagine with [dev] (the model that both sides can make) in auto mode.
Users: one per `--images-per-user` (10) requests of the day, with lognormal activity (sigma 1), so a few heavy
users meet the default tier's limits (50 images and 1800 GPU-seconds a day, $2 a month, 3 jobs at once). The
simulated day is the first of a month, so nobody has spent anything yet this month.

Strategies (the same arrivals, and the same API fate per request, for each): `local` = `[routing] api_enabled =
false`, `api` = `local_enabled = false`, `router` = the defaults. Reported per strategy: requests, refused at
submit, user-visible failures (a job that ended failed), p50/p95 time from /imagine to the image (images made),
the API money posted in the ledger, how many jobs went to each side, and the ETA's error: for each image, the end
promised at submit (created_at + the queued note's ETA) against the real one, as p50 and p90 of the absolute error
and the median signed error (positive: later than promised).

    python -m bench.routing_sim                       # both profiles: table + docs/routing_sim.png (~6 min)
    python -m bench.routing_sim --gpu rtx4090         # one profile (the RTX 4090's takes ~1 min)
    python -m bench.routing_sim --gpu h100 --strategies router --set routing.max_local_wait_s=30 --plot w.png
    python -m bench.routing_sim --hours 6 --strategies router   # a shorter look
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import selectors
import sqlite3
import sys
import tempfile
import time
import tomllib
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple, cast

from engine import service
from engine.backends.base import Requeue, Resumption, Unresumable
from engine.backends.bfl import RemoteTask
from engine.config import BflSettings, ModelSettings, Secrets, Settings
from engine.errors import BackendUnavailable, QuotaExceeded
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    Finished,
    ImageRequest,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobRerouted,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    Started,
    Submitted,
)
from engine.service import Engine
from engine.store import Connection, Store

DAY_START = datetime(2026, 12, 1, tzinfo=UTC).timestamp()  # the first of a month: this month's budgets are untouched
# Demand per hour of the day (UTC) as a multiple of the local GPU's capacity; it adds up to 24, one day of capacity.
HOURLY_DEMAND = (
    *(0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2),  # night
    *(0.4, 0.5, 0.6, 0.7, 0.8),  # morning
    *(0.9, 0.9, 0.9, 1.0, 1.1, 1.3),  # afternoon
    *(1.8, 2.4, 3.0, 3.0, 2.4, 1.2),  # evening, peaking at 3x
)
STRATEGIES = {
    "local": {"routing": {"api_enabled": False}},
    "api": {"routing": {"local_enabled": False}},
    "router": {},
}
REFERENCE_STEPS, REFERENCE_MEGAPIXELS = 28, 1024 * 1024 / 1_000_000  # what a profile's [dev] time is for
T = TypeVar("T")
Ts = TypeVarTuple("Ts")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # the simulated backends' image: only its size is ever looked at


@dataclass(frozen=True)
class GpuProfile:
    name: str
    dev_seconds: tuple[float, float]  # [dev], 1024x1024, 28 steps: uniform between these
    source: str


PROFILES = {
    "h100": GpuProfile("h100", (2.8, 3.2), "published best ~3.0 s for [dev] 1024x1024 28 steps (not yet measured)"),
    "rtx4090": GpuProfile("rtx4090", (45.0, 90.0), "field reports of 45-90 s for [dev] 1024x1024 28 steps"),
}


@dataclass(frozen=True)
class ApiBehaviour:
    mean_s: float = 18.0
    cv: float = 0.35
    timeout_share: float = 1 / 20
    error_share: float = 1 / 200
    account_limit: int = 24
    submit_s: float = 0.3
    download_s: float = 0.3


@dataclass(frozen=True)
class Arrival:
    n: int
    at: float  # seconds after midnight
    user: int
    local_s: float  # how long the local GPU would take for this request
    api_s: float  # how long the API would take, when it finishes at all
    api_fate: str  # "ok" | "timeout" | "5xx"


# ---- demand ----


def arrivals(profile: GpuProfile, api: ApiBehaviour, hours: float, images_per_user: float, seed: int) -> list[Arrival]:
    """A non-homogeneous Poisson process (by thinning) with the day's hourly profile, and each request's fates."""
    rng = random.Random(seed)
    capacity = 2 / sum(profile.dev_seconds)  # images per second of one GPU at the mean [dev] time
    peak = max(HOURLY_DEMAND) * capacity
    expected = sum(HOURLY_DEMAND[h % 24] * capacity * 3600 * min(1.0, hours - h) for h in range(math.ceil(hours)))
    users = max(1, round(expected / images_per_user))
    weights = [rng.lognormvariate(0, 1) for _ in range(users)]
    cumulative = _cumsum(weights)
    sigma = math.sqrt(math.log(1 + api.cv**2))
    out: list[Arrival] = []
    at = 0.0
    while True:
        at += rng.expovariate(peak)
        if at >= hours * 3600:
            return out
        if rng.random() * peak > HOURLY_DEMAND[int(at // 3600) % 24] * capacity:
            continue
        draw = rng.random()
        fate = "timeout" if draw < api.timeout_share else "5xx" if draw < api.timeout_share + api.error_share else "ok"
        out.append(
            Arrival(
                n=len(out),
                at=at,
                user=bisect.bisect_left(cumulative, rng.random() * cumulative[-1]),
                local_s=rng.uniform(*profile.dev_seconds),
                api_s=rng.lognormvariate(math.log(api.mean_s) - sigma**2 / 2, sigma),
                api_fate=fate,
            )
        )


def _cumsum(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


# ---- simulated time ----


class _JumpingSelector(selectors.DefaultSelector):
    """Answers real I/O at once; where the loop would wait for its next timer, moves the clock there instead."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("the simulation waits for something that can never happen (no timer is pending)")
        self.loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time() is simulated seconds; nothing in it may wait for a thread or a real clock."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
        # asyncio.to_thread (the scheduler saves images with it) would let real time pass: run it inline instead.
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future


# ---- SQLite without aiosqlite's thread (a thread's real time would leak into the simulated clock) ----


class InlineConnection:
    """The part of aiosqlite.Connection that Store uses, running each Store call at once on the loop's thread.

    The database is an in-memory copy of a file that Store.open migrated: the same schema, indexes and triggers
    (and foreign keys on), without the disk, whose speed would change nothing in simulated time.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(":memory:", isolation_level=None)
        with sqlite3.connect(path) as migrated:
            migrated.backup(self._db)
        migrated.close()
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")

    @property
    def _conn(self) -> sqlite3.Connection:
        return self._db

    async def _execute(self, fn: Callable[[], Any]) -> Any:
        return fn()  # Store hands each method's whole body over this way (Connection.on_thread)

    async def close(self) -> None:
        self._db.close()


async def inline_store(path: Path, clock: Callable[[], float]) -> Store:
    """A Store over InlineConnection, on a file whose schema Store.open made (on a real loop, before the day)."""
    return Store(Connection(cast(Any, InlineConnection(path))), path, clock)


# ---- the simulated backends ----


def _scaled(seconds: float, request: ResolvedRequest) -> float:
    return seconds * request.steps / REFERENCE_STEPS * request.megapixels / REFERENCE_MEGAPIXELS


class SimLocal:
    """One GPU worker; its ETA is LocalBackend's: measured seconds per job shape (moving average), else a guess."""

    kind = BackendKind.LOCAL

    def __init__(self, models: Mapping[str, ModelSettings], fates: Mapping[int, Arrival]) -> None:
        self._models = models
        self._fates = fates
        self._seconds: dict[tuple[str, int, int], float] = {}
        self._last_seconds: float | None = None
        self.in_flight = 0
        self.jobs = 0
        self.busy_s = 0.0
        self.queued_seen = 0  # the queue depth the last status call was told of (for progress lines)

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return model.local

    def capacity(self) -> int:
        return 1

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        measured = self._seconds.get(_shape(request))
        if measured is not None:
            return measured
        return request.steps * self._models[request.model].local_seconds_per_step

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        self.queued_seen = queued_ahead
        per_job = self.estimate_seconds(request) if request else (self._last_seconds or 0.0)
        return BackendStatus(
            kind=self.kind,
            healthy=True,
            wait_s=per_job * queued_ahead / self.capacity(),
            run_s=per_job,
            ahead=queued_ahead,
            in_flight=self.in_flight,
            capacity=self.capacity(),
        )

    async def start(self) -> None:
        return None

    def detach(self) -> None:
        return None  # nothing it runs outlives this process

    async def close(self) -> None:
        return None

    def resume(self, job: BackendJob) -> Resumption:
        return Requeue("queued again after a restart")  # a simulated day never restarts; the protocol asks for it

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        seconds = _scaled(self._fates[job.request.seed].local_s, job.request)
        self.in_flight += 1
        try:
            yield Started(self.kind)
            await asyncio.sleep(seconds)
            self.jobs += 1
            self.busy_s += seconds
            shape = _shape(job.request)
            previous = self._seconds.get(shape)
            self._seconds[shape] = seconds if previous is None else previous + 0.3 * (seconds - previous)
            self._last_seconds = seconds
            yield Finished(PNG, "image/png", job.request.seed, gpu_ms=round(seconds * 1000))
        finally:
            self.in_flight -= 1


def _shape(request: ResolvedRequest) -> tuple[str, int, int]:
    return request.model, request.width * request.height, request.steps


class SimApi:
    """BFL as observed; status, estimate and health as BflBackend computes them."""

    kind = BackendKind.API
    health_window, health_cooldown_s = 5, 60.0
    health_reasons = (FailureReason.SERVER_ERROR, FailureReason.AUTH, FailureReason.OUT_OF_CREDITS)

    def __init__(
        self,
        settings: BflSettings,
        models: Mapping[str, ModelSettings],
        fates: Mapping[int, Arrival],
        behaviour: ApiBehaviour,
    ) -> None:
        self._settings = settings
        self._models = models
        self._fates = fates
        self._api = behaviour
        self._estimates: dict[str, float] = {}
        self._outcomes: deque[FailureReason | None] = deque(maxlen=self.health_window)
        self._last_failure_at = -math.inf
        self.in_flight = 0
        self.counts: Counter[str] = Counter()

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return bool(model.api_endpoint)

    def capacity(self) -> int:
        return self._settings.max_concurrency

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        endpoint = self._models[request.model].api_endpoint or ""
        return self._estimates.get(endpoint, self._settings.seconds_estimate)

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        capacity = self.capacity()
        estimate = self.estimate_seconds(request) if request else self._settings.seconds_estimate
        busy = self.in_flight + queued_ahead
        rounds = 0 if busy < capacity else (busy - capacity) // capacity + 1
        failing = (
            len(self._outcomes) == self.health_window
            and all(outcome is not None for outcome in self._outcomes)
            and asyncio.get_running_loop().time() - self._last_failure_at < self.health_cooldown_s
        )
        return BackendStatus(
            kind=self.kind,
            healthy=not failing,
            wait_s=estimate * rounds,
            run_s=estimate,
            ahead=queued_ahead,
            in_flight=self.in_flight,
            capacity=capacity,
        )

    async def start(self) -> None:
        return None

    def detach(self) -> None:
        return None  # nothing it runs outlives this process

    async def close(self) -> None:
        return None

    def resume(self, job: BackendJob) -> Resumption:
        return Unresumable("a simulated day never restarts")

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        loop = asyncio.get_running_loop()
        fate = self._fates[job.request.seed]
        model = self._models[job.request.model]
        price, endpoint = model.price_micros, model.api_endpoint or ""
        self.in_flight += 1
        try:
            submitted_at = loop.time()
            for retry in range(self._settings.max_retries + 1):
                await asyncio.sleep(self._api.submit_s)
                if self.in_flight <= self._api.account_limit:
                    break
                self.counts["429"] += 1
                if retry == self._settings.max_retries:
                    yield Failed(FailureReason.RATE_LIMITED, "BFL is busy (HTTP 429)", retryable=True)
                    return
                await asyncio.sleep(2.0**retry)  # BflBackend's back-off when BFL gives no Retry-After
            if fate.api_fate == "5xx":
                self.counts["5xx"] += 1
                self._failed(FailureReason.SERVER_ERROR, loop.time())
                yield Failed(FailureReason.SERVER_ERROR, "BFL server error (HTTP 500)", retryable=True)
                return
            task = RemoteTask(f"task-{job.job_id}", f"https://api.bfl.ai/v1/get_result?id={job.job_id}", price)
            yield Submitted(task.token())
            yield Started(self.kind)
            if fate.api_fate == "timeout":
                self.counts["timeout"] += 1
                await asyncio.sleep(self._settings.total_timeout_s)
                yield Failed(FailureReason.TIMEOUT, "the API did not finish; BFL bills it", price, retryable=True)
                return
            await asyncio.sleep(_seen_at_poll(_scaled(fate.api_s, job.request), self._settings))
            await asyncio.sleep(self._api.download_s)
            self.counts["ok"] += 1
            self._outcomes.append(None)
            old = self._estimates.get(endpoint, self._settings.seconds_estimate)
            self._estimates[endpoint] = old + 0.3 * (loop.time() - submitted_at - old)
            yield Finished(PNG, "image/png", job.request.seed, cost_micros=price)
        finally:
            self.in_flight -= 1

    def _failed(self, reason: FailureReason, now: float) -> None:
        if reason in self.health_reasons:
            self._outcomes.append(reason)
            self._last_failure_at = now


def _seen_at_poll(seconds: float, settings: BflSettings) -> float:
    """When BflBackend's polls (0.5 s, growing x1.5 up to 5 s apart) first see a task that is ready after `seconds`."""
    at, interval = 0.0, settings.poll_interval_s
    while at < seconds:
        at += interval
        interval = min(interval * 1.5, max(settings.poll_max_interval_s, settings.poll_interval_s))
    return at


# ---- one strategy over the day ----


@dataclass
class StrategyResult:
    gpu: str
    strategy: str
    requests: int
    refused: int
    refused_by: dict[str, int]
    failed: int
    failed_by: dict[str, int]
    done: int
    p50_s: float
    p95_s: float
    within_60s: float  # share of all requests (refused ones included) with an image within a minute
    api_spend_usd: float
    api_jobs: int
    local_jobs: int
    rerouted: int
    routes: dict[str, int]  # the router's decisions (first routes and reroutes) by kind of reason
    p95_by_backend_s: dict[str, float]
    api_counts: dict[str, int]
    local_busy_share: float
    sim_wall_s: float
    # The ETA a user was shown at submit against when the image came: |actual - predicted| end, over images made.
    eta_error_p50_s: float
    eta_error_p90_s: float
    eta_bias_s: float  # median of actual - predicted: > 0 means images came later than promised
    hourly_p95_s: list[float | None] = field(default_factory=list)
    hourly_spend_usd: list[float] = field(default_factory=list)


def _settings(state_dir: Path, strategy: str, overrides: list[str]) -> Settings:
    """The built-in defaults, the strategy's switch, then `--set section.key=value` (TOML values)."""
    raw: dict[str, Any] = {"bot": {"state_dir": str(state_dir)}}
    for section, values in STRATEGIES[strategy].items():
        raw.setdefault(section, {}).update(values)
    for override in overrides:
        dotted, _, value = override.partition("=")
        *sections, key = dotted.strip().split(".")
        target = raw
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = tomllib.loads(f"v = {value.strip()}")["v"]
    return Settings.model_validate(raw)


async def _prepare_schema(path: Path) -> None:
    store = await Store.open(path)  # migrations on a real loop, with aiosqlite, before the simulated day
    await store.close()


async def _day(
    gpu: GpuProfile, strategy: str, day: list[Arrival], behaviour: ApiBehaviour, settings: Settings
) -> StrategyResult:
    loop = asyncio.get_running_loop()
    fates = {arrival.n: arrival for arrival in day}
    local = SimLocal(settings.models, fates)
    api = SimApi(settings.bfl, settings.models, fates, behaviour)
    clock = lambda: DAY_START + loop.time()  # noqa: E731
    store = await inline_store(settings.bot.database_path, clock)
    engine = Engine(settings, Secrets(), store, {BackendKind.LOCAL: local, BackendKind.API: api}, clock=clock)
    await engine.start()
    arrived: dict[str, Arrival] = {}
    promised: dict[str, float] = {}  # job id -> the ETA shown at submit (seconds from submit to the image)
    finished: list[tuple[Arrival, JobEvent]] = []
    rerouted: set[str] = set()
    refused: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    pending = 0
    all_ended = asyncio.Event()

    async def watch() -> None:
        nonlocal pending
        async for event in engine.all_events():
            if isinstance(event, JobRerouted):
                rerouted.add(event.job_id)
                routes[_route_kind(event.route.reason)] += 1
            if isinstance(event, JobDone | JobFailed | JobCancelled):
                finished.append((arrived[event.job_id], event))
                pending -= 1
                if pending == 0 and len(finished) + sum(refused.values()) == len(day):
                    all_ended.set()

    async def submit(arrival: Arrival) -> None:
        nonlocal pending
        who = Requester(Platform.DISCORD, f"user{arrival.user}", guild_id="community", channel_id="art")
        request = ImageRequest(f"request {arrival.n}", "dev", seed=arrival.n, mode=Mode.AUTO)
        try:
            queued = await engine.submit(who, request)
        except QuotaExceeded as exc:
            refused[f"quota: {exc.limit}"] += 1
        except BackendUnavailable as exc:
            # The router's reason, without what would help and without its numbers: "the API is at its limit..."
            refused[re.sub(r"\d+(\.\d+)?", "N", exc.reason.split(": ")[0])] += 1
        else:
            arrived[queued.job_id] = arrival
            promised[queued.job_id] = queued.eta_s
            routes[_route_kind(queued.route.reason)] += 1
            pending += 1
        if pending == 0 and len(finished) + sum(refused.values()) == len(day):
            all_ended.set()

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    try:
        hour = 0
        for arrival in day:
            await asyncio.sleep(arrival.at - loop.time())
            if arrival.at >= (hour + 1) * 3600:
                hour = int(arrival.at // 3600)
                wall = time.perf_counter() - started
                line = f"  {gpu.name}/{strategy}: {hour:02d}:00, local queue {local.queued_seen}, {wall:.0f} s"
                print(line, file=sys.stderr, flush=True)
            await submit(arrival)
        await all_ended.wait()
        posted = await store.ledger_totals()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await engine.close()
    wall = time.perf_counter() - started
    return _summarise(
        gpu, strategy, day, finished, promised, refused, routes, rerouted, posted, local, api, loop.time(), wall
    )


def _summarise(
    gpu: GpuProfile,
    strategy: str,
    day: list[Arrival],
    finished: list[tuple[Arrival, JobEvent]],
    promised: Mapping[str, float],
    refused: Counter[str],
    routes: Counter[str],
    rerouted: set[str],
    posted: dict[str, int],
    local: SimLocal,
    api: SimApi,
    ended_at: float,
    wall: float,
) -> StrategyResult:
    seconds = sorted(event.seconds for _, event in finished if isinstance(event, JobDone))
    failed = Counter(event.reason.value for _, event in finished if isinstance(event, JobFailed))
    hours = math.ceil(max((a.at for a in day), default=0) / 3600)
    hourly_p95: list[float | None] = []
    hourly_spend = [0.0] * hours
    for hour in range(hours):
        made = [e.seconds for a, e in finished if isinstance(e, JobDone) and int(a.at // 3600) == hour]
        hourly_p95.append(round(_quantile(made, 0.95), 1) if made else None)
    # Both ends are measured from the job's created_at: predicted = created_at + ETA, actual = created_at + seconds.
    lateness = [e.seconds - promised[e.job_id] for _, e in finished if isinstance(e, JobDone)]
    misses = [abs(value) for value in lateness]
    for arrival, event in finished:
        charged = event.cost_micros if isinstance(event, JobDone) else getattr(event, "charged_micros", 0)
        hourly_spend[min(int(arrival.at // 3600), hours - 1)] += charged / 1_000_000
    return StrategyResult(
        gpu=gpu.name,
        strategy=strategy,
        requests=len(day),
        refused=sum(refused.values()),
        refused_by=dict(refused.most_common()),
        failed=sum(failed.values()),
        failed_by=dict(failed.most_common()),
        done=len(seconds),
        p50_s=round(_quantile(seconds, 0.50), 1) if seconds else math.nan,
        p95_s=round(_quantile(seconds, 0.95), 1) if seconds else math.nan,
        within_60s=round(sum(1 for value in seconds if value <= 60) / len(day), 3),
        api_spend_usd=round(posted.get("usd_micros", 0) / 1_000_000, 2),
        api_jobs=sum(api.counts.values()),
        local_jobs=local.jobs,
        rerouted=len(rerouted),
        routes=dict(routes.most_common()),
        p95_by_backend_s={
            kind.value: round(_quantile(made, 0.95), 1)
            for kind in BackendKind
            if (made := [e.seconds for _, e in finished if isinstance(e, JobDone) and e.backend is kind])
        },
        api_counts=dict(api.counts),
        local_busy_share=round(local.busy_s / max(ended_at, 1.0), 3),
        sim_wall_s=round(wall, 1),
        eta_error_p50_s=round(_quantile(misses, 0.50), 1) if misses else math.nan,
        eta_error_p90_s=round(_quantile(misses, 0.90), 1) if misses else math.nan,
        eta_bias_s=round(_quantile(lateness, 0.50), 1) if lateness else math.nan,
        hourly_p95_s=hourly_p95,
        hourly_spend_usd=[round(value, 2) for value in hourly_spend],
    )


def _route_kind(reason: str) -> str:
    """A route's reason without its numbers: 'local: queue wait ~12 s <= 60 s' -> 'local: queue wait', 'local
    after the API timed out; about 7 min wait' -> 'local after the API timed out'."""
    return re.split(r"[;~\d]", reason, maxsplit=1)[0].strip(" :")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def simulate(
    gpu_name: str,
    strategy: str,
    hours: float,
    images_per_user: float,
    seed: int,
    overrides: list[str],
) -> StrategyResult:
    """One strategy over one simulated day, in a fresh database (a process of its own when run in parallel)."""
    # A day's worth of per-job INFO and WARNING lines: the engine's modules and the job-transition channel.
    for name in ("engine", "flux_bot"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Job ids mix the wall clock with random bits; a repeatable run wants repeatable ids (they break ties in the
    # queue's order).
    ids = itertools.count(1)
    service.new_job_id = lambda: f"j{next(ids):07d}"  # type: ignore[attr-defined]
    gpu, behaviour = PROFILES[gpu_name], ApiBehaviour()
    day = arrivals(gpu, behaviour, hours, images_per_user, seed)
    # tmpfs where there is one: the disk's speed changes nothing in simulated time, only how long a day takes
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="flux-bot-sim-", dir=shm if shm.is_dir() else None) as scratch:
        settings = _settings(Path(scratch), strategy, overrides)
        asyncio.run(_prepare_schema(settings.bot.database_path))
        loop = VirtualTimeLoop()
        try:
            return loop.run_until_complete(_day(gpu, strategy, day, behaviour, settings))
        finally:
            loop.close()


# ---- the report ----


def table(results: list[StrategyResult]) -> str:
    lines = [
        "| GPU | strategy | requests | refused | failed jobs | images | p50 to image | p95 to image"
        " | image within 60 s | API spend | API / local attempts | rerouted | ETA error p50 / p90 | ETA bias |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.gpu} | {r.strategy} | {r.requests:,} | {r.refused:,} ({r.refused / r.requests:.1%})"
            f" | {r.failed:,} ({r.failed / r.requests:.1%}) | {r.done:,} | {r.p50_s:,.1f} s | {r.p95_s:,.1f} s"
            f" | {r.within_60s:.1%} | ${r.api_spend_usd:,.2f} | {r.api_jobs:,} / {r.local_jobs:,} | {r.rerouted:,}"
            f" | {r.eta_error_p50_s:,.1f} / {r.eta_error_p90_s:,.1f} s | {r.eta_bias_s:+,.1f} s |"
        )
    return "\n".join(lines)


def verdicts(results: list[StrategyResult]) -> list[str]:
    """The issue's goal per GPU: router p95 <= 1.2 x API-only's, spend <= 40% of API-only's, fewer failures."""
    out = []
    for gpu in dict.fromkeys(r.gpu for r in results):
        by = {r.strategy: r for r in results if r.gpu == gpu}
        if not {"router", "api", "local"} <= by.keys():
            continue
        router, api, local = by["router"], by["api"], by["local"]
        p95 = router.p95_s / api.p95_s
        spend = router.api_spend_usd / api.api_spend_usd if api.api_spend_usd else math.nan
        fewer = router.failed < min(api.failed, local.failed)
        out.append(
            f"{gpu}: router p95 = {p95:.2f} x API-only's (goal <= 1.20: {'met' if p95 <= 1.2 else 'missed'}); "
            f"spend = {spend:.0%} of API-only's (goal <= 40%: {'met' if spend <= 0.4 else 'missed'}); "
            f"failed jobs {router.failed} vs API-only {api.failed} and local-only {local.failed} "
            f"(goal fewer than either: {'met' if fewer else 'missed'}); "
            f"no image at all (refused or failed): router {router.refused + router.failed}, "
            f"API-only {api.refused + api.failed}, local-only {local.refused + local.failed}"
        )
    return out


def plot(results: list[StrategyResult], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gpus = list(dict.fromkeys(r.gpu for r in results))
    figure = Figure(figsize=(14, 4.2 * len(gpus)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(gpus), 3, squeeze=False)
    colours = {"local": "tab:green", "api": "tab:red", "router": "tab:blue"}
    for row, gpu in zip(axes, gpus, strict=True):
        mine = [r for r in results if r.gpu == gpu]
        demand, p95, spend = row
        hours = range(24)
        demand.bar(hours, [HOURLY_DEMAND[h] for h in hours], color="tab:gray", alpha=0.6)
        demand.axhline(1.0, color="black", linestyle="--", linewidth=1)
        demand.set_title(f"{gpu}: demand per hour (x the GPU's capacity)")
        demand.set_xlabel("hour of the day (UTC)")
        for r in mine:
            xs = [h for h, v in enumerate(r.hourly_p95_s) if v is not None]
            p95.plot(xs, [r.hourly_p95_s[h] for h in xs], marker=".", color=colours[r.strategy], label=r.strategy)
            spent = _cumsum(r.hourly_spend_usd)
            spend.plot(range(1, len(spent) + 1), spent, color=colours[r.strategy], label=r.strategy)
        p95.set_yscale("log")
        p95.set_title(f"{gpu}: p95 time to image, by hour of request (s)")
        p95.set_xlabel("hour of the day (UTC)")
        p95.legend()
        spend.set_title(f"{gpu}: API money spent so far ($)")
        spend.set_xlabel("hour of the day (UTC)")
        spend.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="h100,rtx4090", help=f"comma-separated profiles: {', '.join(PROFILES)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated: local, api, router")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours from midnight")
    parser.add_argument("--images-per-user", type=float, default=10.0, help="the day's requests per user, on average")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config.toml setting for every strategy, e.g. routing.max_local_wait_s=30 (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="strategies simulated at once")
    parser.add_argument("--plot", type=Path, default=Path("docs/routing_sim.png"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/routing_sim"))
    args = parser.parse_args(argv)
    runs = [(gpu, s) for gpu in args.gpu.split(",") for s in args.strategies.split(",")]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(runs)))) as pool:
        futures = [
            pool.submit(
                simulate,
                gpu,
                strategy,
                args.hours,
                args.images_per_user,
                args.seed,
                args.set,
            )
            for gpu, strategy in runs
        ]
        results = [future.result() for future in futures]
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(["python -m bench.routing_sim", *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(time.perf_counter() - started, 1),
        "profiles": {name: asdict(PROFILES[name]) for name in dict.fromkeys(args.gpu.split(","))},
        "api": asdict(ApiBehaviour()),
        "settings": args.set,
        "results": [asdict(r) for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_sim.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.plot)
    print(table(results))
    for line in verdicts(results):
        print(line)
    for r in results:
        print(f"{r.gpu}/{r.strategy}: refused {r.refused_by}; failed {r.failed_by}; API {r.api_counts};", end=" ")
        print(f"routes {r.routes}; p95 by backend {r.p95_by_backend_s};", end=" ")
        print(f"GPU busy {r.local_busy_share:.0%}; simulated in {r.sim_wall_s} s")
    print(f"\n{report['machine']}; {report['date']}; {report['wall_s']} s; plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
