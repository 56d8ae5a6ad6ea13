"""The chaos run: the real engine under faults, with exact checks of what it promises about jobs and money.

The engine runs as `flux-bot run` would (Engine.open, the real BFL client and the real local worker supervisor on
the tiny demo model) against the fake BFL API injecting seeded random faults: timeouts that are still billed, 5xx
answers, moderated results and bursts of 429. Meanwhile a local worker process is SIGKILLed at random moments and
the whole engine is stopped and opened again on the same database, twice, with jobs queued and running. Users keep
submitting, with budgets tight enough that refusals and failover-without-room happen; refusals are counted, not
errors. Each user's terminal message comes through the path the chat front-ends use: a follower per submitted job
and `bot.delivery.ChannelDelivery` for what ends after a restart, into a channel that records every message.

At the end it checks, exactly (any break is reported and makes the run fail):
- no job lost: every job that submit accepted is in the database, terminal, and nothing else is there;
- one terminal message per job, to the user who submitted it, matching the job's end and its charge;
- nothing charged twice: each reservation closed exactly once, each API route submitted at most one task;
- money: per job, the money posted equals the job's cost and what the BFL fake billed for that job's tasks
  (billed failures posted, unbilled ones not); ledger total == settled jobs' costs + billed failures' costs;
  the running totals equal what the ledger's lines add up to (Store.verify_totals);
- no limit exceeded: per user images and GPU time per day and API dollars per month, per guild and global API
  dollars per month, all computed from the ledger (a local job's GPU time is settled as measured, which may exceed
  its estimate: that documented overrun is added to the GPU limit explicitly; API money must fit exactly, since the
  fake bills the estimate).

With `--remote N` the GPU lane is N GPU host processes (`flux-bot worker --nats URL`, one tiny-model worker each)
on a real nats-server instead of the in-host supervisor: the SIGKILLs hit the hosts' worker processes, and the
nats-server is restarted once mid-run, with jobs queued and running.

    python -m bench.chaos --jobs 2000 --users 100 --seed 1
    python -m bench.chaos --jobs 600 --users 30 --remote 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.delivery import ChannelDelivery
from engine.backends.base import Backend
from engine.backends.bfl import BflBackend
from engine.backends.demo_model import ensure_demo_model
from engine.backends.factory import GPU_HOSTS
from engine.backends.local.supervisor import LocalBackend
from engine.backends.nats import RemoteHosts
from engine.backends.pool import GpuPool, Member
from engine.config import NatsCredentials, Secrets, Settings, dollars
from engine.errors import BackendUnavailable, EngineError, QuotaExceeded
from engine.models import (
    MICROS_PER_CREDIT,
    TERMINAL_EVENTS,
    BackendKind,
    ImageRequest,
    Job,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobQueued,
    JobState,
    Mode,
    Platform,
    Requester,
    Resource,
)
from engine.service import Engine
from engine.store import Store
from tests.fakes.bfl_server import API_KEY, FakeBfl, Faults
from tests.fakes.gpu_hosts import GpuHosts, LaneObserver
from tests.fakes.nats_server import NatsServer

log = logging.getLogger(__name__)

SIZE = 256  # the smallest size the API accepts, and the one bucket the tiny local worker warms
USERS_PER_GUILD = 10
JOBS_AT_ONCE = 3  # the tier's concurrent_jobs
# What a user asks for: (model, mode, weight). Relax only with models that run locally (else it is refused).
MIX: tuple[tuple[str, Mode, int], ...] = (
    ("schnell", Mode.AUTO, 10),
    ("schnell", Mode.RELAX, 5),
    ("dev", Mode.AUTO, 30),
    ("dev", Mode.FAST, 10),
    ("dev", Mode.RELAX, 5),
    ("pro", Mode.AUTO, 25),
    ("pro", Mode.FAST, 15),
)
TERMINAL_STATE = {JobDone: JobState.DONE, JobFailed: JobState.FAILED, JobCancelled: JobState.CANCELLED}


@dataclass(frozen=True)
class Options:
    jobs: int = 2000
    users: int = 100
    seed: int = 1
    restarts: int = 2
    kills: int = 8  # local worker processes SIGKILLed, at random moments
    local_share: float = 0.25  # of a user's jobs, how many the GPU-time budget covers (the local jobs are slow)
    timeout_rate: float = 0.05  # BFL tasks that never finish in time but are billed
    server_error_rate: float = 0.03  # BFL submits answered with a 5xx (not accepted, not billed)
    moderated_rate: float = 0.02  # BFL tasks moderated (not billed)
    burst_429_rate: float = 0.01  # BFL submits that start a burst of 429s
    bfl_total_timeout_s: float = 1.5  # how long the client waits for a task (a timed-out one waits this long)
    think_s: float = 0.05  # a user's longest pause between two submits
    guard_s: float = 900.0  # only guards against a hang: jobs still open after this long count as lost
    remote_hosts: int = 0  # GPU hosts on NATS instead of the in-host supervisor (0: in-host)
    server_restarts: int = 1  # nats-server restarts mid-run, with remote hosts


@dataclass(frozen=True)
class Message:
    """One terminal message as the chat channel received it."""

    job_id: str
    user_key: str
    kind: type[JobEvent]
    charged_micros: int


@dataclass
class Stop:
    queued: int
    running: int


@dataclass
class Report:
    options: Options
    attempts: int = 0
    accepted: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    rerouted: int = 0
    stops: list[Stop] = field(default_factory=list)
    kills: int = 0
    kills_busy: int = 0
    server_restarts: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    bfl_tasks: int = 0
    ledger_usd: int = 0
    settled_usd: int = 0
    billed_failures_usd: int = 0
    bfl_billed_usd: int = 0
    gpu_overrun_ms: int = 0
    messages: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


REMOTE_LANE = {"heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 3.0, "ack_wait_s": 10.0}
REMOTE_LOCAL = {"device": "cpu", "resolution_buckets": [f"{SIZE}x{SIZE}"], "warmup": False, "preview_every": 0}


def chaos_settings(state_dir: Path, api_url: str, options: Options, nats_url: str = "") -> Settings:
    """Small jobs, short BFL polls, tight budgets: one user's share of jobs does not fit in them."""
    per_user = max(1, options.jobs // options.users)
    guilds = max(1, options.users // USERS_PER_GUILD)
    raw: dict[str, Any] = {
        "bot": {"state_dir": str(state_dir)},
        "routing": {"max_local_wait_s": 2.0, "default_model": "schnell"},
        "scheduler": {"max_running_per_user": 2, "local_retries": 1},
        "bfl": {
            "api_url": api_url,
            "max_concurrency": 8,
            "request_timeout_s": 10.0,
            "total_timeout_s": options.bfl_total_timeout_s,
            "poll_interval_s": 0.02,
            "poll_max_interval_s": 0.1,
            "max_retries": 2,
        },
        "local": {
            "device": "cpu",
            "resolution_buckets": [f"{SIZE}x{SIZE}"],
            # Worker starts and job times are most of a run's wall time: no warm-up (nothing is compiled) and no
            # previews (progress events still flow; nothing here checks them).
            "warmup": False,
            "preview_every": 0,
            "job_timeout_s": 120.0,
            "step_timeout_s": 60.0,
            "start_timeout_s": 300.0,
        },
        "models": {
            "schnell": {"display_name": "tiny schnell", "local": True, "default_steps": 2, "max_steps": 4,
                        "local_seconds_per_step": 0.5},
            "dev": {"display_name": "tiny dev", "local": True, "api_endpoint": "flux-dev", "price_credits": "2.5",
                    "default_steps": 2, "max_steps": 4, "local_seconds_per_step": 0.5},
            "pro": {"display_name": "pro", "api_endpoint": "flux-pro-1.1", "price_credits": "4"},
        },
        "tiers": {
            "default": {
                "images_per_day": max(1, per_user - 1),
                "gpu_seconds_per_day": max(1, round(per_user * options.local_share)),  # 1 s per local job
                # About what a user's share of API jobs costs, so that about half the users run out.
                "api_usd_per_month": f"{0.025 * per_user:.3f}",
                "concurrent_jobs": JOBS_AT_ONCE,
            }
        },
        "limits": {
            # Below what their users may spend together, so that guild and global caps bind as well.
            "guild_api_usd_per_month": f"{0.2 * per_user:.2f}",
            "global_api_usd_per_month": f"{0.18 * per_user * guilds:.2f}",
        },
        "nats": {"url": nats_url, **REMOTE_LANE},
    }  # fmt: skip
    return Settings.model_validate(raw)


class ChannelFrontEnd:
    """A chat front-end reduced to its delivery, wired as bot/discord_app.py and bot/slack_app.py are.

    It follows each job it submits and delivers the end itself; `ChannelDelivery` takes the rest (jobs from before
    a restart) and what ended while no front-end was up. The platform call is `post`, which records the message.
    """

    def __init__(self, engine: Engine, post: Callable[[Job, JobEvent], None]) -> None:
        self.engine = engine
        self._post = post
        self._orphans = ChannelDelivery(engine, Platform.DISCORD, self._deliver)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        # As in the front-ends: subscribe to every job's end before reading the backlog, so none falls between.
        self._spawn(self._orphans.run())
        self._spawn(self._orphans.backlog())

    async def imagine(self, requester: Requester, request: ImageRequest) -> JobQueued:
        queued = await self.engine.submit(requester, request)
        self._orphans.follow(queued.job_id)
        self._spawn(self._follow(queued.job_id))
        return queued

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, job_id: str) -> None:
        try:
            async for event in self.engine.events(job_id):
                if isinstance(event, TERMINAL_EVENTS):
                    await self._deliver(await self.engine.get_job(job_id), event)
        except Exception:
            log.exception("job %s: following it failed", job_id)

    async def _deliver(self, job: Job, event: JobEvent) -> None:
        self._post(job, event)
        # Shielded, as the front-ends do: a close() that cancels this must not cut the write in half.
        await asyncio.shield(self.engine.mark_delivered(job.id))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass
class _Life:
    engine: Engine
    front: ChannelFrontEnd

    @property
    def local(self) -> LocalBackend | None:
        backend = self.engine._scheduler.backend(BackendKind.LOCAL)
        return backend if isinstance(backend, LocalBackend) else None


class Chaos:
    def __init__(self, options: Options, state_dir: Path, model: Path) -> None:
        self.options = options
        self.state_dir = state_dir
        self.model = model
        self.report = Report(options)
        self.random = random.Random(options.seed)
        self.fake = FakeBfl(
            pending_polls=1,
            faults=Faults(
                seed=options.seed,
                timeout=options.timeout_rate,
                server_error=options.server_error_rate,
                moderated=options.moderated_rate,
                burst_429=options.burst_429_rate,
            ),
        )
        self.settings: Settings | None = None
        self.accepted: dict[str, str] = {}  # job id -> the user key that submitted it
        self.by_token: dict[str, str] = {}  # the token in a job's prompt -> its id, to trace BFL tasks to jobs
        self.messages: defaultdict[str, list[Message]] = defaultdict(list)
        self.outstanding: Counter[str] = Counter()  # per user: accepted jobs without a terminal message yet
        self.unexpected: list[str] = []
        self._life: _Life | None = None
        self._up = asyncio.Event()
        self._submitting = 0
        self._killed: set[int] = set()
        self._tick = asyncio.Event()  # set (and replaced) whenever something the waiters look at changes
        self.server: NatsServer | None = None  # with remote hosts
        self.hosts: GpuHosts | None = None
        self.observer: LaneObserver | None = None

    # ---- the run ----

    async def run(self) -> Report:
        if not self.options.remote_hosts:
            return await self._run()
        self.server = NatsServer(self.state_dir.parent / "nats")
        await self.server.start()
        self.hosts = GpuHosts(self.state_dir.parent / "hosts", self.server.url, nats=REMOTE_LANE, local=REMOTE_LOCAL)
        try:
            self.observer = await LaneObserver.connect(self.server.url)
            for n in range(self.options.remote_hosts):
                await self.hosts.start(f"gpu-{n}", model_path=self.model, models="schnell,dev")
            return await self._run()
        finally:
            if self.observer is not None:
                await self.observer.close()
            await self.hosts.close()
            await self.server.stop()

    async def _run(self) -> Report:
        started = time.perf_counter()
        options = self.options
        async with self.fake:
            nats_url = self.server.url if self.server else ""
            self.settings = chaos_settings(self.state_dir, self.fake.api_url, options, nats_url)
            prices = {m.api_endpoint: str(m.price_credits) for m in self.settings.models.values() if m.api_endpoint}
            self.fake.costs.update(prices)  # the fake bills exactly the estimate, so API money must fit exactly
            self._life = await self._open()
            self._up.set()
            restart_at = [(n + 1) / (options.restarts + 1) for n in range(options.restarts)]
            kill_at = sorted(self.random.uniform(0.05, 0.9) for _ in range(options.kills))
            shares = [options.jobs // options.users + (n < options.jobs % options.users) for n in range(options.users)]
            restarter = asyncio.create_task(self._restarter(restart_at))
            killer = asyncio.create_task(self._killer(kill_at))
            server_at = [(n + 0.5) / (options.server_restarts + 1) for n in range(options.server_restarts)]
            server_restarter = asyncio.create_task(self._server_restarter(server_at if self.server else []))
            try:
                await asyncio.gather(*(self._user(n, share) for n, share in enumerate(shares)))
                await restarter
                await server_restarter
                await self._until_all_delivered()
            finally:
                killer.cancel()
                restarter.cancel()
                server_restarter.cancel()
                await asyncio.gather(killer, restarter, server_restarter, return_exceptions=True)
                if self._life is not None:
                    await self._close(self._life)
            self.report.faults.update(self.fake.injected)
            self.report.bfl_tasks = len(self.fake.tasks)
            await self._check()
        self.report.wall_s = time.perf_counter() - started
        return self.report

    async def _open(self) -> _Life:
        """What `flux-bot run` starts, with the backends the factory would build (one torch thread per worker)."""
        settings = self.settings
        assert settings is not None
        gpu_lane: Backend
        remote: RemoteHosts | None = None
        if self.server is not None:
            remote = RemoteHosts(settings.nats, NatsCredentials(), settings.models)
            gpu_lane = GpuPool([Member(GPU_HOSTS, remote)], settings.models)
        else:
            # OpenMP threads that outnumber the cores spin-wait: one thread each keeps the tiny jobs fast.
            gpu_lane = LocalBackend(settings.local, settings.models, self.model, extra_env={"OMP_NUM_THREADS": "1"})
        backends: dict[BackendKind, Backend] = {
            BackendKind.API: BflBackend(settings.bfl, settings.models, API_KEY),
            BackendKind.LOCAL: gpu_lane,
        }
        engine = await Engine.open(settings, Secrets(bfl_api_key=API_KEY), backends=backends)
        if remote is not None:
            # As a bot that starts before its GPU hosts have beaten: wait until the lane sees all of them.
            await remote.wait_for_slots(self.options.remote_hosts)
        front = ChannelFrontEnd(engine, self._post)
        front.start()
        return _Life(engine, front)

    async def _close(self, life: _Life) -> None:
        await life.front.close()
        await life.engine.close()

    def _changed(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._tick.wait()

    # ---- users ----

    async def _user(self, n: int, share: int) -> None:
        rng = random.Random(f"{self.options.seed}:{n}")
        guild = n // USERS_PER_GUILD
        requester = Requester(Platform.DISCORD, f"u{n:03d}", guild_id=f"g{guild:02d}", channel_id=f"c{guild:02d}")
        for i in range(share):
            await asyncio.sleep(rng.uniform(0, self.options.think_s))
            if self.outstanding[requester.user_key] >= JOBS_AT_ONCE and rng.random() < 0.9:
                # Most people wait for an image before asking for another; the rest meet the jobs-at-once limit.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._until(lambda: self.outstanding[requester.user_key] < JOBS_AT_ONCE), 60)
            model, mode, _ = rng.choices(MIX, weights=[weight for _, _, weight in MIX])[0]
            token = f"{requester.user_id}-{i}"
            request = ImageRequest(f"chaos {token}: a red fox in the snow", model, width=SIZE, height=SIZE,
                                   seed=rng.randrange(2**32), mode=mode)  # fmt: skip
            await self._submit(requester, request, token)

    async def _submit(self, requester: Requester, request: ImageRequest, token: str) -> None:
        while not self._up.is_set():  # checked again on waking: a restart may have begun meanwhile
            await self._up.wait()
        life = self._life
        assert life is not None
        self._submitting += 1
        self.report.attempts += 1
        try:
            queued = await life.front.imagine(requester, request)
        except QuotaExceeded as exc:
            self.report.refusals[f"quota: {exc.limit}"] += 1
        except BackendUnavailable:
            self.report.refusals["no backend could take it"] += 1
        except EngineError as exc:
            self.report.refusals[type(exc).__name__] += 1
        except Exception as exc:
            self.unexpected.append(f"submit raised {type(exc).__name__}: {exc}")
            log.exception("submit failed")
        else:
            self.accepted[queued.job_id] = requester.user_key
            self.by_token[token] = queued.job_id
            if queued.job_id not in self.messages:  # a job can end before its submit returns
                self.outstanding[requester.user_key] += 1
        finally:
            self._submitting -= 1
            self._changed()

    def _post(self, job: Job, event: JobEvent) -> None:
        """The chat channel: one message per call, recorded for the checks."""
        charged = event.cost_micros if isinstance(event, JobDone) else getattr(event, "charged_micros", 0)
        self.messages[job.id].append(Message(job.id, job.requester.user_key, type(event), charged))
        self.report.messages += 1
        if len(self.messages[job.id]) == 1 and job.id in self.accepted:
            self.outstanding[self.accepted[job.id]] -= 1
        self._changed()

    async def _until_all_delivered(self) -> None:
        try:
            await asyncio.wait_for(self._until(lambda: all(j in self.messages for j in self.accepted)),
                                   self.options.guard_s)  # fmt: skip
        except TimeoutError:
            log.error("jobs still without a terminal message after %.0f s", self.options.guard_s)

    # ---- chaos ----

    def _reached(self, fraction: float) -> bool:
        """Whether the run is this far through, in submits and in the accepted jobs' terminal messages.

        Counting both puts such a moment among jobs waiting and running; once every submit is in, it has come.
        """
        attempts = self.report.attempts
        if attempts >= self.options.jobs:
            return True
        return attempts >= fraction * self.options.jobs and len(self.messages) >= fraction * len(self.accepted)

    async def _restarter(self, restart_at: list[float]) -> None:
        for fraction in restart_at:
            await self._until(functools.partial(self._reached, fraction))
            self._up.clear()
            await self._until(lambda: self._submitting == 0)
            life, self._life = self._life, None
            assert life is not None
            await life.front.close()
            stop = Stop(
                await life.engine._store.count_jobs(JobState.QUEUED),
                await life.engine._store.count_jobs(JobState.RUNNING),
            )
            self.report.stops.append(stop)
            log.warning("chaos: stopping the engine (%d queued, %d running)", stop.queued, stop.running)
            await life.engine.close()
            self._life = await self._open()
            self._up.set()

    async def _killer(self, kill_at: list[float]) -> None:
        for fraction in kill_at:
            await self._until(functools.partial(self._reached, fraction))
            while not self._kill_one():
                # No worker is up right now (one is starting): try again after the next message.
                await self._until(functools.partial(self._more_messages_than, self.report.messages))

    def _more_messages_than(self, seen: int) -> bool:
        return self.report.messages > seen

    async def _server_restarter(self, restart_at: list[float]) -> None:
        for fraction in restart_at:
            await self._until(functools.partial(self._reached, fraction))
            assert self.server is not None
            log.warning("chaos: restarting nats-server")
            await self.server.stop()
            await asyncio.sleep(1.0)
            await self.server.start()
            self.report.server_restarts += 1

    def _kill_one(self) -> bool:
        if self.observer is not None:
            return self._kill_remote_worker()
        local = self._life.local if self._life else None
        # A killed worker stays listed until the supervisor notices its end: never count one twice.
        workers = [w for w in (local.workers() if local else []) if w.pid not in self._killed]
        if not workers:
            return False
        busy = [w for w in workers if w.busy]
        victim = self.random.choice(busy or workers)
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self._killed.add(victim.pid)
        log.warning("chaos: SIGKILL worker pid %d (%s)", victim.pid, "busy" if victim.busy else "idle")
        self.report.kills += 1
        self.report.kills_busy += bool(busy)
        return True

    def _kill_remote_worker(self) -> bool:
        """SIGKILL the worker process of a GPU host that most recently started a job (likely busy with it)."""
        assert self.observer is not None
        for started in reversed(self.observer.started):
            found = re.search(r"pid (\d+)", started.worker)
            pid = int(found.group(1)) if found else None
            if pid is None or pid in self._killed:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self._killed.add(pid)
                continue
            self._killed.add(pid)
            log.warning("chaos: SIGKILL worker pid %d of GPU host %s", pid, started.host)
            self.report.kills += 1
            self.report.kills_busy += 1
            return True
        return False

    # ---- the checks ----

    async def _check(self) -> None:
        assert self.settings is not None
        problems = self.report.problems
        problems.extend(self.unexpected)
        report = self.report
        report.accepted = len(self.accepted)
        store = await Store.open(self.settings.bot.database_path)
        try:
            jobs = {job.id: job for job in await store.jobs(limit=10 * self.options.jobs + 100)}
            ledgers = {job_id: await store.job_ledger(job_id) for job_id in jobs}
            totals = await store.ledger_totals()
            problems.extend(f"running total {difference}" for difference in await store.verify_totals())
        finally:
            await store.close()
        billed = self._billed_by_job(problems)

        for job_id in sorted(set(self.accepted) - set(jobs)):
            problems.append(f"job {job_id}: accepted by submit but not in the database")
        for job_id in sorted(set(jobs) - set(self.accepted)):
            problems.append(f"job {job_id}: in the database but never accepted by submit")
        for job_id in sorted(set(self.messages) - set(jobs)):
            problems.append(f"job {job_id}: a message for a job that does not exist")

        for job_id, job in jobs.items():
            self._check_job(job, ledgers[job_id], billed.get(job_id, []), problems)
        self._check_limits(ledgers, problems)

        report.ledger_usd = totals.get(Resource.USD_MICROS.value, 0)
        report.settled_usd = sum(j.cost_micros for j in jobs.values() if j.state is JobState.DONE)
        report.billed_failures_usd = sum(j.cost_micros for j in jobs.values() if j.state is not JobState.DONE)
        report.bfl_billed_usd = sum(sum(costs) for costs in billed.values())
        if report.ledger_usd != report.settled_usd + report.billed_failures_usd:
            problems.append(
                f"ledger total {report.ledger_usd} != settled jobs {report.settled_usd}"
                f" + billed failures {report.billed_failures_usd} (micro-dollars)"
            )
        if report.ledger_usd != report.bfl_billed_usd:
            problems.append(f"ledger total {report.ledger_usd} != what BFL billed {report.bfl_billed_usd}")

    def _billed_by_job(self, problems: list[str]) -> dict[str, list[int]]:
        """Micro-dollars the fake billed, per job, traced through the token in each task's prompt."""
        out: dict[str, list[int]] = defaultdict(list)
        billed = self.fake.billed()
        for task in self.fake.tasks.values():
            prompt = str(task.payload.get("prompt", ""))
            token = prompt.removeprefix("chaos ").partition(":")[0]
            job_id = self.by_token.get(token)
            if job_id is None:
                problems.append(f"BFL task {task.id} belongs to no accepted job (prompt {prompt!r})")
                continue
            out[job_id].append(int(billed[task.id] * MICROS_PER_CREDIT) if task.id in billed else 0)
        return out

    def _check_job(self, job: Job, ledger: list[dict[str, Any]], tasks: list[int], problems: list[str]) -> None:
        report = self.report
        if not job.state.terminal:
            problems.append(f"job {job.id}: lost: still {job.state.value} at the end")
        label = job.state.value if job.state is not JobState.FAILED else f"failed: {job.failure_reason}"
        if job.state is JobState.DONE:
            label = f"done on {job.backend.value}"
        report.outcomes[label] += 1

        messages = self.messages.get(job.id, [])
        if len(messages) != 1:
            problems.append(f"job {job.id} ({job.state.value}): {len(messages)} terminal messages, not one")
        submitter = self.accepted.get(job.id)
        for message in messages:
            if submitter is not None and message.user_key != submitter:
                problems.append(f"job {job.id}: its message went to {message.user_key}, not {submitter}")
            if TERMINAL_STATE[message.kind] is not job.state:
                problems.append(f"job {job.id}: the message says {message.kind.__name__}, the job is {job.state}")
            if message.charged_micros != job.cost_micros:
                problems.append(
                    f"job {job.id}: the message says {message.charged_micros} charged, the job {job.cost_micros}"
                )

        reserves = {line["id"]: line for line in ledger if line["entry"] == "reserve"}
        closes = Counter(line["ref"] for line in ledger if line["entry"] in ("settle", "void"))
        for ref, count in closes.items():
            if ref not in reserves:
                problems.append(f"job {job.id}: ledger line closes reservation {ref} of another job")
            elif count > 1:
                problems.append(f"job {job.id}: reservation {ref} closed {count} times")
        if job.state.terminal:
            for reserve_id in sorted(set(reserves) - set(closes)):
                problems.append(f"job {job.id}: reservation {reserve_id} still open after the job ended")
        usd_posted = sum(line["amount"] for line in ledger
                         if line["entry"] == "settle" and line["resource"] == Resource.USD_MICROS.value)  # fmt: skip
        if usd_posted != job.cost_micros:
            problems.append(f"job {job.id}: {usd_posted} posted for it, but its cost is {job.cost_micros}")
        if usd_posted != sum(tasks):
            problems.append(f"job {job.id}: {usd_posted} posted for it, but BFL billed {sum(tasks)} ({tasks})")
        usd_routes = sum(1 for line in reserves.values() if line["resource"] == Resource.USD_MICROS.value)
        if len(tasks) > usd_routes:
            problems.append(f"job {job.id}: {len(tasks)} BFL tasks for {usd_routes} API routes (submitted twice)")
        images = sum(line["amount"] for line in ledger
                     if line["entry"] == "settle" and line["resource"] == Resource.IMAGES.value)  # fmt: skip
        if images != (job.state is JobState.DONE):
            problems.append(f"job {job.id} ({job.state.value}): {images} images posted")
        report.rerouted += len(reserves) > 2  # the image plus one route's reservation, unless it was rerouted

    def _check_limits(self, ledgers: dict[str, list[dict[str, Any]]], problems: list[str]) -> None:
        """Posted amounts per scope and period (nothing is pending now) against each limit."""
        assert self.settings is not None
        tier = self.settings.tiers["default"]
        limits = self.settings.limits
        user_limits = {
            Resource.IMAGES.value: tier.images_per_day,
            Resource.GPU_MS.value: None if tier.gpu_seconds_per_day is None else tier.gpu_seconds_per_day * 1000,
            Resource.USD_MICROS.value: dollars(tier.api_usd_per_month),
        }
        posted: Counter[tuple[str, str, str, str]] = Counter()  # (scope, key, resource, period) -> amount
        overrun: Counter[tuple[str, str, str, str]] = Counter()
        for ledger in ledgers.values():
            reserves = {line["id"]: line for line in ledger if line["entry"] == "reserve"}
            for line in ledger:
                if line["entry"] != "settle":
                    continue
                resource = line["resource"]
                period = line["month"] if resource == Resource.USD_MICROS.value else line["day"]
                extra = max(0, line["amount"] - reserves[line["ref"]]["amount"])
                for kind, who in (("user", line["user_key"]), ("guild", line["guild_key"]), ("global", "")):
                    key = (kind, who, resource, period)
                    posted[key] += line["amount"]
                    overrun[key] += extra
        for (scope, who, resource, period), amount in sorted(posted.items()):
            limit: int | None = None
            if scope == "user":
                limit = user_limits[resource]
            elif resource == Resource.USD_MICROS.value:
                limit = dollars(limits.guild_api_usd_per_month if scope == "guild" else limits.global_api_usd_per_month)
            extra = overrun[(scope, who, resource, period)]
            if resource == Resource.GPU_MS.value:
                if scope == "global":
                    self.report.gpu_overrun_ms += extra
            elif extra:
                # Only GPU time is settled as measured; images count 1 and API money is billed at the estimate.
                problems.append(f"{scope} {who}: {extra} {resource} settled above its reservations in {period}")
            if limit is not None and amount > limit + extra:
                problems.append(f"{scope} {who}: {amount} {resource} posted in {period}, over the limit {limit}")


# ---- the command line ----


def summary(report: Report) -> str:
    o = report.options
    faults = report.faults
    rows = [
        ("jobs submitted / accepted / refused",
         f"{report.attempts} / {report.accepted} / {sum(report.refusals.values())}"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))),
        ("jobs rerouted (failover)", str(report.rerouted)),
        ("refusals", ", ".join(f"{k} {v}" for k, v in report.refusals.most_common()) or "none"),
        ("engine restarts (queued / running at the stop)",
         f"{len(report.stops)} (" + "; ".join(f"{s.queued} / {s.running}" for s in report.stops) + ")"),
        ("GPU lane", f"{o.remote_hosts} GPU hosts on NATS" if o.remote_hosts else "in-host supervisor"),
        ("worker SIGKILLs (of them mid-job)", f"{report.kills} ({report.kills_busy})"),
        ("nats-server restarts", str(report.server_restarts)),
        ("BFL faults injected",
         f"timeouts {faults['timeout']}, 5xx {faults['server_error']}, moderated {faults['moderated']},"
         f" 429 bursts {faults['429 burst']} ({faults['429']} answers); {report.bfl_tasks} tasks accepted"),
        ("money (micro-dollars)",
         f"ledger {report.ledger_usd} = settled {report.settled_usd} + billed failures {report.billed_failures_usd};"
         f" BFL billed {report.bfl_billed_usd}"),
        ("GPU time settled above estimates (ms, all jobs)", str(report.gpu_overrun_ms)),
        ("terminal messages", str(report.messages)),
        ("wall time", f"{report.wall_s:.1f} s"),
        ("invariants", "all hold" if report.ok else f"{len(report.problems)} BROKEN"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = [f"chaos run: {o.jobs} jobs, {o.users} users, seed {o.seed}"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"  ! {problem}" for problem in report.problems[:50]]
    if len(report.problems) > 50:
        lines.append(f"  ! ... and {len(report.problems) - 50} more")
    return "\n".join(lines)


async def run_chaos(options: Options, state_dir: Path, model: Path) -> Report:
    """One chaos run with its database under `state_dir` and the local workers on the FluxPipeline in `model`."""
    return await Chaos(options, state_dir, model).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--local-share", type=float, default=defaults.local_share)
    parser.add_argument("--remote", type=int, default=0, help="GPU hosts on a real nats-server (0: in-host)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/chaos"))
    args = parser.parse_args(argv)
    options = Options(
        jobs=args.jobs,
        users=args.users,
        seed=args.seed,
        kills=args.kills,
        local_share=args.local_share,
        remote_hosts=args.remote,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=args.out / "chaos.log",
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with tempfile.TemporaryDirectory(prefix="flux-bot-chaos-") as scratch:
        model = ensure_demo_model(Path(scratch) / "demo-model")
        report = asyncio.run(run_chaos(options, Path(scratch) / "state", model))
    text = summary(report)
    print(text)
    record = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used (device = cpu)",
        "command": " ".join(["python -m bench.chaos", *(argv if argv is not None else sys.argv[1:])]),
        "summary": text,
        "problems": report.problems,
    }
    (args.out / "chaos.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
