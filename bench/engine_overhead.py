"""The engine's own cost: admission, submit latency, CPU per job, ledger transactions and the Discord defer.

An instant in-process backend stands in for the GPU and the API (it finishes every job at once), so everything
measured is flux-bot's: validation, the prompt policy, routing, quota checks and reservations in SQLite, the
scheduler's dispatch, settling and saving the result. Logging runs at INFO with the production format (into
/dev/null), as `flux-bot run` logs.

1. Admission: C users at once (default 1, 50 and 500), each submitting an image, waiting for it to end, and
   submitting the next (default model [dev]: 4 of 5 in auto mode, which routes locally, 1 in 5 in fast mode, which
   routes to the API and reserves money). Reports jobs admitted per second, `Engine.submit()` latency p50/p99 and the
   process CPU time per job from submit to settled (all threads, SQLite's included; the backend does nothing).
   Each level gets a fresh database; every user has the default tier's limits and every guild and global API budget
   is set, so every kind of limit check runs. A user identity is retired after 40 images, below the tier's 50 a day.
2. Ledger: `Store.submit_job` (the reserving transaction: user upsert, active-job count, the limit checks, the job
   row, the reservations, the audit line) one after another, against plain `sqlite3` running the same statements
   in one transaction per job on a file with the same PRAGMAs. Reports transactions per second and the ratio.
3. Discord: the real discord.py client of the Discord front-end against the fake Discord API on loopback; 200
   /imagine interactions are injected at once and the time until the fake receives each defer callback (type 5) is
   taken. Reports p50/p99/max per round.

    python -m bench.engine_overhead                       # everything (~3 minutes on 2 cores)
    python -m bench.engine_overhead --jobs 500 --levels 1,500 --skip-discord      # a quick look
    python -m bench.engine_overhead --profile 500         # cProfile the 500-user level: the top costs
    python -m bench.engine_overhead --profile discord     # cProfile one Discord burst
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import discord
from aiohttp import web

from bot.discord_app import DiscordFrontEnd
from engine.config import ModelSettings, Secrets, Settings
from engine.ledger import LimitCheck, Reservation
from engine.models import (
    TERMINAL_EVENTS,
    AuditEntry,
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Finished,
    ImageRequest,
    Job,
    JobDone,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    RouteDecision,
    Started,
)
from engine.quota import Quota
from engine.service import Engine
from engine.store import INSERT_JOB, Store, job_row
from engine.validation import resolve
from tests.fakes.backends import tiny_png
from tests.fakes.discord_server import FakeDiscord, interaction_payload

MODEL = "dev"
IMAGES_PER_IDENTITY = 40  # below the default tier's 50 images a day, so no submit is refused
FAST_EVERY = 5  # one submit in five asks for fast mode: an API route with a money reservation
GUILDS = 20
BLOCKED_WORDS = tuple(f"blocked{n}" for n in range(50))  # a policy with some work in it


# ---- the instant backend ----


@dataclass
class InstantBackend:
    """The Backend protocol with no generation: Started, then Finished with a tiny PNG, at once."""

    kind: BackendKind
    slots: int
    price_micros: int = 0
    in_flight: int = 0
    image: bytes = field(default_factory=tiny_png)

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return model.local if self.kind is BackendKind.LOCAL else model.api_endpoint is not None

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        return BackendStatus(kind=self.kind, healthy=True, in_flight=self.in_flight, capacity=self.slots)

    def capacity(self) -> int:
        return self.slots

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        return 0.0

    async def start(self) -> None:
        return None

    def detach(self) -> None:
        return None  # nothing it runs outlives this process

    async def close(self) -> None:
        return None

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        self.in_flight += 1
        try:
            yield Started(self.kind)
            gpu_ms = 0 if self.kind is BackendKind.API else 3000
            yield Finished(self.image, "image/png", job.request.seed, cost_micros=self.price_micros, gpu_ms=gpu_ms)
        finally:
            self.in_flight -= 1


def bench_settings(state_dir: Path) -> Settings:
    """The built-in defaults (default tier: 50 images and 1800 GPU-s a day, $2 a month, 3 jobs at once), plus
    guild and global API budgets and a blocked-word list, so that every check a submit can make is made."""
    return Settings.model_validate(
        {
            "bot": {"state_dir": str(state_dir)},
            "policy": {"blocked_words": list(BLOCKED_WORDS)},
            "limits": {"guild_api_usd_per_month": "10000", "global_api_usd_per_month": "100000"},
        }
    )


def backends(settings: Settings, local_slots: int) -> dict[BackendKind, InstantBackend]:
    price = settings.models[MODEL].price_micros
    return {
        BackendKind.LOCAL: InstantBackend(BackendKind.LOCAL, local_slots),
        BackendKind.API: InstantBackend(BackendKind.API, settings.bfl.max_concurrency, price),
    }


def requester(user: str, n: int) -> Requester:
    return Requester(
        Platform.DISCORD,
        user,
        guild_id=f"guild{n % GUILDS}",
        channel_id="c1",
        roles=("r1", "r2"),
        display_name=f"user {user}",
    )


def image_request(n: int) -> ImageRequest:
    mode = Mode.FAST if n % FAST_EVERY == 0 else Mode.AUTO
    return ImageRequest(f"a lighthouse on a cliff at dusk, oil painting, number {n}", MODEL, mode=mode, seed=n)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (p99 of 1,000 values is the 990th smallest)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@contextmanager
def production_logging() -> Iterator[None]:
    """INFO with the `flux-bot run` format, written to /dev/null: the cost of logging counts, the text does not."""
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        old_level, old_handlers = root.level, root.handlers[:]
        root.handlers, root.level = [handler], logging.INFO
        try:
            yield
        finally:
            root.handlers, root.level = old_handlers, old_level


# ---- 1. admission at C concurrent users ----


@dataclass
class LevelResult:
    users: int
    jobs: int
    wall_s: float
    admitted_per_s: float
    submit_p50_ms: float
    submit_p99_ms: float
    submit_max_ms: float
    cpu_ms_per_job: float
    ended_done: int


class Terminals:
    """One subscriber to every job's events that wakes whoever waits for a job's end (no race with submit)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._ended: set[str] = set()  # jobs that ended before anyone waited for them
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self.done = 0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for event in self._engine.all_events():
            if isinstance(event, TERMINAL_EVENTS):
                self.done += isinstance(event, JobDone)
                waiter = self._waiters.pop(event.job_id, None)
                if waiter is None:
                    self._ended.add(event.job_id)
                elif not waiter.done():
                    waiter.set_result(None)

    async def wait(self, job_id: str) -> None:
        if job_id in self._ended:
            self._ended.discard(job_id)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = waiter
        await waiter

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def admission_level(users: int, jobs: int, warmup: int, local_slots: int, scratch: Path) -> LevelResult:
    settings = bench_settings(scratch / f"level-{users}")
    store = await Store.open(settings.bot.database_path)
    engine = Engine(settings, Secrets(), store, backends(settings, local_slots))
    await engine.start()
    terminals = Terminals(engine)
    counter = itertools.count()
    latencies: list[float] = []
    measuring = False
    budget = warmup

    async def user(slot: int) -> None:
        nonlocal budget
        served = 0
        while budget > 0:
            budget -= 1
            n = next(counter)
            who = requester(f"u{slot}-{served // IMAGES_PER_IDENTITY}", n)
            served += 1
            started = time.perf_counter()
            queued = await engine.submit(who, image_request(n))
            if measuring:
                latencies.append(time.perf_counter() - started)
            await terminals.wait(queued.job_id)

    try:
        await asyncio.gather(*(user(slot) for slot in range(min(users, warmup))))
        measuring, budget = True, jobs
        done_before = terminals.done
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user(slot + users) for slot in range(users)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ended_done = terminals.done - done_before
    finally:
        await terminals.close()
        await engine.close()
    return LevelResult(
        users=users,
        jobs=len(latencies),
        wall_s=round(wall, 2),
        admitted_per_s=round(len(latencies) / wall, 1),
        submit_p50_ms=ms(quantile(latencies, 0.50)),
        submit_p99_ms=ms(quantile(latencies, 0.99)),
        submit_max_ms=ms(max(latencies)),
        cpu_ms_per_job=round(cpu / len(latencies) * 1000, 3),
        ended_done=ended_done,
    )


# ---- 2. ledger transactions: Store.submit_job against plain sqlite3 ----


@dataclass(frozen=True)
class LedgerWork:
    job: Job
    reservations: list[Reservation]
    checks: list[LimitCheck]
    max_active: int | None
    audit: AuditEntry


async def ledger_work(settings: Settings, store: Store, count: int) -> list[LedgerWork]:
    """What `Engine.submit` hands `Store.submit_job`, prepared outside the timed loop."""
    quota = Quota(store, settings, time.time)
    model = settings.models[MODEL]
    periods = quota.periods()
    out: list[LedgerWork] = []
    for n in range(count):
        who = requester(f"l{n // IMAGES_PER_IDENTITY}", n)
        request = image_request(n)
        resolved = resolve(request, model)
        api = request.mode is Mode.FAST
        decision = RouteDecision(
            BackendKind.API if api else BackendKind.LOCAL,
            "bench",
            estimated_cost_micros=model.price_micros if api else 0,
            estimated_gpu_ms=0 if api else 7000,
        )
        job = Job(
            id=f"b{n:08d}",
            requester=who,
            request=resolved,
            state=JobState.QUEUED,
            backend=decision.backend,
            reason=decision.reason,
            created_at=time.time(),
            estimated_cost_micros=decision.estimated_cost_micros,
            estimated_gpu_ms=decision.estimated_gpu_ms,
        )
        limits = await quota.limits_for(who)
        detail = {"rule": None, "matched": None}
        out.append(
            LedgerWork(
                job,
                quota.reservations(decision, periods, with_image=True),
                quota.checks(who, limits, periods),
                # Every job stays queued here, so the active-job limit is lifted (the count query still runs).
                count,
                AuditEntry(who.user_key, "policy.allow", who.user_key, job.id, detail),
            )
        )
    return out


def raw_submit(db: sqlite3.Connection, work: LedgerWork) -> None:
    """Store.submit_job's statements with plain sqlite3, in one BEGIN IMMEDIATE transaction."""
    job, who = work.job, work.job.requester
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "INSERT INTO users (user_key, display_name, roles, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(user_key) DO UPDATE SET display_name = COALESCE(excluded.display_name, users.display_name),"
            " roles = CASE WHEN ? THEN excluded.roles ELSE users.roles END",
            (who.user_key, who.display_name, json.dumps(list(who.roles)), now, now, True),
        )
        active = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE user_key = ? AND state IN ('queued','running')", (who.user_key,)
        ).fetchone()[0]
        if work.max_active is not None and active >= work.max_active:
            raise RuntimeError("the baseline never refuses")
        wanted: dict[str, int] = {}
        for reservation in work.reservations:
            wanted[reservation.resource.value] = wanted.get(reservation.resource.value, 0) + reservation.amount
        for check in work.checks:
            amount = wanted.get(check.resource.value, 0)
            if amount == 0:
                continue
            period = check.resource.period.value
            where = {"user": "r.user_key = ?", "guild": "r.guild_key = ?", "global": "1 = 1"}[check.scope.kind]
            params: list[Any] = [check.resource.value, check.period_key]
            if check.scope.kind != "global":
                params.append(check.scope.key)
            used = db.execute(
                "SELECT COALESCE(SUM(CASE c.entry WHEN 'settle' THEN c.amount WHEN 'void' THEN 0 ELSE r.amount END),"
                " 0) FROM ledger r LEFT JOIN ledger c ON c.ref = r.id"
                f" WHERE r.entry = 'reserve' AND r.resource = ? AND r.{period} = ? AND {where}",
                params,
            ).fetchone()[0]
            if check.scope.kind == "user":
                used -= db.execute(
                    f"SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE entry = 'grant' AND resource = ?"
                    f" AND {period} = ? AND user_key = ?",
                    (check.resource.value, check.period_key, check.scope.key),
                ).fetchone()[0]
            if used + amount > check.limit:
                raise RuntimeError("the baseline never refuses")
        db.execute(INSERT_JOB, job_row(job))
        for reservation in work.reservations:
            db.execute(
                "INSERT INTO ledger (entry, job_id, user_key, guild_key, backend, resource, amount, day, month,"
                " created_at) VALUES ('reserve', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    who.user_key,
                    who.guild_key,
                    reservation.backend.value if reservation.backend else None,
                    reservation.resource.value,
                    reservation.amount,
                    reservation.day,
                    reservation.month,
                    now,
                ),
            )
        audit = work.audit
        db.execute(
            "INSERT INTO audit (at, actor, action, subject, job_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (now, audit.actor, audit.action, audit.subject, audit.job_id, json.dumps(audit.detail or {})),
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass
class LedgerResult:
    transactions: int
    flux_bot_tx_per_s: float
    flux_bot_50_at_once_tx_per_s: float
    raw_sqlite_tx_per_s: float
    ratio: float


async def ledger(count: int, scratch: Path) -> LedgerResult:
    # flux-bot, one transaction after another (as one user's submits are)
    settings = bench_settings(scratch / "ledger-store")
    store = await Store.open(settings.bot.database_path)
    try:
        work = await ledger_work(settings, store, count)
        started = time.perf_counter()
        for item in work:
            await store.submit_job(item.job, item.reservations, item.checks, item.max_active, item.audit)
        store_s = time.perf_counter() - started
    finally:
        await store.close()

    # flux-bot, 50 submitters at once (the store's lock makes them take turns)
    settings = bench_settings(scratch / "ledger-store-50")
    store = await Store.open(settings.bot.database_path)
    try:
        work = await ledger_work(settings, store, count)
        queue = iter(work)

        async def submitter() -> None:
            for item in queue:
                await store.submit_job(item.job, item.reservations, item.checks, item.max_active, item.audit)

        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(50)))
        concurrent_s = time.perf_counter() - started
    finally:
        await store.close()

    # plain sqlite3 on a file with the same schema (made by Store.open) and the same PRAGMAs
    settings = bench_settings(scratch / "ledger-raw")
    store = await Store.open(settings.bot.database_path)
    try:
        work = await ledger_work(settings, store, count)
    finally:
        await store.close()
    db = sqlite3.connect(settings.bot.database_path, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "busy_timeout=10000", "foreign_keys=ON", "synchronous=NORMAL"):
            db.execute(f"PRAGMA {pragma}")
        started = time.perf_counter()
        for item in work:
            raw_submit(db, item)
        raw_s = time.perf_counter() - started
        stored = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        db.close()
    assert stored == count, f"the baseline stored {stored} jobs, not {count}"
    return LedgerResult(
        transactions=count,
        flux_bot_tx_per_s=round(count / store_s, 1),
        flux_bot_50_at_once_tx_per_s=round(count / concurrent_s, 1),
        raw_sqlite_tx_per_s=round(count / raw_s, 1),
        ratio=round(raw_s / store_s, 3),
    )


# ---- 3. Discord: 200 interactions at once, time to the defer callback ----


class _WideBacklogSite(web.TCPSite):
    backlog = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("backlog", self.backlog)
        super().__init__(*args, **kwargs)


class TimedDiscord(FakeDiscord):
    """The fake Discord API, noting when each interaction callback and each followup arrives.

    discord.py opens one connection per request in flight, so a burst of 200 defers opens 200 connections at once.
    The fake listens with aiohttp's default backlog of 128; the kernel drops the connection attempts past it and
    the client retries them after its 1 s SYN timeout. That second is the fake's, not flux-bot's or Discord's, so
    the listen backlog is widened here (`--fake-backlog 128` keeps the fake's own).
    """

    def __init__(self, expected: int, backlog: int) -> None:
        super().__init__()
        self.backlog = backlog
        self.expected = expected
        self.callback_at: dict[str, float] = {}
        self.callback_type: dict[str, int] = {}
        self.followups = 0
        self.all_deferred = asyncio.Event()
        self.all_followed = asyncio.Event()

    async def __aenter__(self) -> TimedDiscord:
        plain = web.TCPSite
        _WideBacklogSite.backlog = self.backlog
        web.TCPSite = _WideBacklogSite  # type: ignore[misc]
        try:
            await super().__aenter__()
        finally:
            web.TCPSite = plain  # type: ignore[misc]
        return self

    async def _callback(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        self.callback_at[token] = time.perf_counter()
        self.callback_type[token] = int((await request.json())["type"])
        if len(self.callback_at) >= self.expected:
            self.all_deferred.set()
        return await super()._callback(request)

    async def _webhook_message(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.followups += 1
            if self.followups >= self.expected:
                self.all_followed.set()
        return await super()._webhook_message(request)


def imagine_payload(user_id: str, prompt: str) -> dict[str, Any]:
    """A raw /imagine interaction as Discord sends it (the builder tests/bot/test_discord.py uses)."""
    options = [{"name": "prompt", "type": 3, "value": prompt}, {"name": "model", "type": 3, "value": MODEL}]
    return interaction_payload(2, {"id": "700", "name": "imagine", "type": 1, "options": options}, user_id=user_id)


@dataclass
class DiscordRound:
    interactions: int
    defer_p50_ms: float
    defer_p99_ms: float
    defer_max_ms: float
    inject_ms: float  # how long injecting all of them took (the later ones start their clock later)
    all_delivered_s: float


def _serve_fake(conn: Connection, expected: int, backlog: int) -> None:
    """The fake Discord API in a process of its own, as Discord is remote: its work does not share the bot's CPU."""
    asyncio.run(_fake_main(conn, expected, backlog))


async def _fake_main(conn: Connection, expected: int, backlog: int) -> None:
    async with TimedDiscord(expected, backlog) as fake:
        conn.send(fake.port)
        await fake.all_deferred.wait()
        conn.send("deferred")
        await fake.all_followed.wait()
        conn.send((fake.callback_at, fake.callback_type))
        await asyncio.to_thread(conn.recv)  # stay up until the bot has closed


@asynccontextmanager
async def fake_discord(expected: int, backlog: int, in_process: bool) -> AsyncIterator[FakeHandle]:
    if in_process:
        async with TimedDiscord(expected, backlog) as fake:
            yield FakeHandle.local(fake)
        return
    # spawn, not fork: the parent has an event loop and threads running
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_fake, args=(child, expected, backlog), daemon=True)
    process.start()
    plain = discord.http.Route.BASE
    try:
        port = await asyncio.wait_for(asyncio.to_thread(parent.recv), 60)
        discord.http.Route.BASE = f"http://127.0.0.1:{port}/api/v10"
        yield FakeHandle.remote(parent)
        parent.send("stop")
        await asyncio.to_thread(process.join, 10)
    finally:
        discord.http.Route.BASE = plain
        if process.is_alive():
            process.kill()


@dataclass
class FakeHandle:
    """Waits on the fake, wherever it runs, and reads what it saw."""

    deferred: Callable[[], Awaitable[None]]
    followed: Callable[[], Awaitable[tuple[dict[str, float], dict[str, int]]]]

    @classmethod
    def local(cls, fake: TimedDiscord) -> FakeHandle:
        async def followed() -> tuple[dict[str, float], dict[str, int]]:
            await fake.all_followed.wait()
            return fake.callback_at, fake.callback_type

        async def deferred() -> None:
            await fake.all_deferred.wait()

        return cls(deferred, followed)

    @classmethod
    def remote(cls, conn: Connection) -> FakeHandle:
        async def deferred() -> None:
            assert await asyncio.to_thread(conn.recv) == "deferred"

        async def followed() -> tuple[dict[str, float], dict[str, int]]:
            seen: tuple[dict[str, float], dict[str, int]] = await asyncio.to_thread(conn.recv)
            return seen

        return cls(deferred, followed)


async def discord_round(
    count: int, local_slots: int, backlog: int, in_process: bool, scratch: Path, round_no: int
) -> DiscordRound:
    settings = bench_settings(scratch / f"discord-{round_no}")
    store = await Store.open(settings.bot.database_path)
    engine = Engine(settings, Secrets(), store, backends(settings, local_slots))
    await engine.start()
    try:
        async with fake_discord(count, backlog, in_process) as fake:
            app = DiscordFrontEnd(engine)  # the production edit throttle
            await app.client.login("token")  # REST only: interactions are injected, as Discord's gateway would
            try:
                payloads = [imagine_payload(str(10_000 + n), f"a lighthouse at dusk, number {n}") for n in range(count)]
                injected: dict[str, float] = {}
                # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in the fake's process
                first = time.perf_counter()
                for payload in payloads:
                    injected[payload["token"]] = time.perf_counter()
                    app.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
                inject_s = time.perf_counter() - first
                await asyncio.wait_for(fake.deferred(), 60)
                callback_at, callback_type = await asyncio.wait_for(fake.followed(), 120)
                delivered_s = time.perf_counter() - first
                # Delivery is recorded after Discord answers the followup: let those writes land before closing.
                for _ in range(1000):
                    if not await engine.undelivered():
                        break
                    await asyncio.sleep(0.01)
            finally:
                await app.close()
    finally:
        await engine.close()
    if set(callback_type.values()) != {5}:
        raise AssertionError(f"expected only defer callbacks (type 5), got {sorted(set(callback_type.values()))}")
    defers = [callback_at[token] - injected[token] for token in injected]
    return DiscordRound(
        interactions=count,
        defer_p50_ms=ms(quantile(defers, 0.50)),
        defer_p99_ms=ms(quantile(defers, 0.99)),
        defer_max_ms=ms(max(defers)),
        inject_ms=ms(inject_s),
        all_delivered_s=round(delivered_s, 2),
    )


# ---- the run ----


async def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    levels = [int(level) for level in args.levels.split(",") if level]
    if levels:
        results = []
        for users in levels:
            result = await admission_level(users, args.jobs, args.warmup, args.local_slots, scratch)
            print(f"  {users} users: {result}", flush=True)
            results.append(asdict(result))
        report["admission"] = results
    if args.ledger_tx:
        ledger_result = await ledger(args.ledger_tx, scratch)
        print(f"  ledger: {ledger_result}", flush=True)
        report["ledger"] = asdict(ledger_result)
    if args.discord_rounds:
        rounds = []
        for round_no in range(args.discord_rounds):
            burst = await discord_round(
                args.interactions, args.local_slots, args.fake_backlog, args.fake_in_process, scratch, round_no
            )
            print(f"  discord round {round_no + 1}: {burst}", flush=True)
            rounds.append(asdict(burst))
        report["discord"] = rounds
    return report


def profile(args: argparse.Namespace, scratch: Path) -> str:
    """cProfile one admission level or one Discord round (the event loop's thread only: SQLite itself runs in
    aiosqlite's thread, so time spent waiting for it shows as the loop's epoll wait)."""
    profiler = cProfile.Profile()
    profiler.enable()
    if args.profile == "discord":
        asyncio.run(
            discord_round(args.interactions, args.local_slots, args.fake_backlog, args.fake_in_process, scratch, 0)
        )
    else:
        asyncio.run(admission_level(int(args.profile), args.jobs, args.warmup, args.local_slots, scratch))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()


def table(report: dict[str, Any]) -> str:
    lines = []
    if "admission" in report:
        lines += [
            "| users at once | jobs | admitted / s | submit p50 | submit p99 | submit max | CPU per job |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["admission"]:
            lines.append(
                f"| {r['users']} | {r['jobs']} | {r['admitted_per_s']:,.0f} | {r['submit_p50_ms']} ms"
                f" | {r['submit_p99_ms']} ms | {r['submit_max_ms']} ms | {r['cpu_ms_per_job']} ms |"
            )
        lines.append("")
    if "ledger" in report:
        r = report["ledger"]
        lines += [
            "| ledger transactions | flux-bot `Store.submit_job` | same, 50 at once | plain sqlite3 | flux-bot / raw |",
            "|---|---|---|---|---|",
            f"| {r['transactions']} | {r['flux_bot_tx_per_s']:,.0f} / s | {r['flux_bot_50_at_once_tx_per_s']:,.0f} / s"
            f" | {r['raw_sqlite_tx_per_s']:,.0f} / s | {r['ratio']:.2f} |",
            "",
        ]
    if "discord" in report:
        lines += [
            "| Discord round | interactions at once | defer p50 | defer p99 | defer max | all images posted after |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in enumerate(report["discord"], start=1):
            lines.append(
                f"| {n} | {r['interactions']} | {r['defer_p50_ms']} ms | {r['defer_p99_ms']} ms"
                f" | {r['defer_max_ms']} ms | {r['all_delivered_s']} s |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,50,500", help="users at once, comma-separated ('' skips admission)")
    parser.add_argument("--jobs", type=int, default=3000, help="measured jobs per level")
    parser.add_argument("--warmup", type=int, default=200, help="jobs per level before measuring")
    parser.add_argument("--local-slots", type=int, default=8, help="jobs the instant local backend takes at once")
    parser.add_argument("--ledger-tx", type=int, default=5000, help="ledger transactions per side (0 skips)")
    parser.add_argument("--interactions", type=int, default=200, help="Discord interactions injected at once")
    parser.add_argument("--discord-rounds", type=int, default=3, help="Discord bursts, each on a fresh engine")
    parser.add_argument("--fake-backlog", type=int, default=1024, help="listen backlog of the fake Discord API")
    parser.add_argument("--fake-in-process", action="store_true", help="run the fake Discord API on the bot's loop")
    parser.add_argument("--skip-discord", action="store_true")
    parser.add_argument("--profile", metavar="USERS|discord", help="only cProfile one admission level or Discord round")
    parser.add_argument("--out", type=Path, default=Path("bench/out/engine_overhead"))
    args = parser.parse_args(argv)
    if args.skip_discord:
        args.discord_rounds = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flux-bot-overhead-") as scratch, production_logging():
        if args.profile:
            print(profile(args, Path(scratch)))
            return 0
        report = asyncio.run(run(args, Path(scratch)))
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(["python -m bench.engine_overhead", *(sys.argv[1:] if argv is None else argv)]),
        "total_s": round(time.perf_counter() - started, 1),
        **report,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\n{report['machine']}; {report['date']}; {report['total_s']} s; {args.out / 'engine_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
