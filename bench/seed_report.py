"""Seed a database with 30 days of plausible traffic through the real engine, then draw the admin report from it.

Jobs go through Engine.submit, the scheduler, the quota and the ledger exactly as in service; only image making is
the tests' scripted backend, and a fake clock moves time along (each job's latency is added while it "runs"). The
result is the chart a person looks at to judge the report (docs/admin_report.png), plus how long building and
drawing it took.

    python -m bench.seed_report --out docs/admin_report.png
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.config import Secrets, Settings
from engine.models import (
    TERMINAL_EVENTS,
    BackendEvent,
    BackendJob,
    BackendKind,
    FailureReason,
    Finished,
    ImageRequest,
    Mode,
    Platform,
    Requester,
)
from engine.report import build_report, render_png, summary_text
from engine.service import Engine
from engine.store import Store
from tests.fakes.backends import ScriptedBackend, fail, tiny_png

TODAY_NOON = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PRICES = {"dev": 25_000, "pro": 40_000, "ultra": 60_000}  # micro-dollars, as the BFL answers them


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Outcome:
    latency_s: float
    failure: FailureReason | None = None
    charged_micros: int = 0
    cost_micros: int = 0


class Seeder:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self.scripts: dict[str, Outcome] = {}

    def plan(self, job: BackendJob, attempt: int) -> list[BackendEvent]:
        outcome = self.scripts[job.job_id]  # a failed local job is retried once: the retry meets the same fate
        self.clock.now += outcome.latency_s  # the job "runs" this long, so finished_at - created_at is the latency
        if outcome.failure is not None:
            return fail(outcome.failure, charged=outcome.charged_micros, retryable=False)
        return [Finished(tiny_png(), "image/png", job.request.seed, cost_micros=outcome.cost_micros, gpu_ms=4000)]

    async def job(self, user: str, model: str, outcome: Outcome) -> None:
        requester = Requester(Platform.DISCORD, user, guild_id="g1", channel_id="c1")
        mode = Mode.RELAX if model == "schnell" else Mode.FAST
        queued = await self.engine.submit(requester, ImageRequest(f"a picture by {user}", model, mode=mode))
        self.scripts[queued.job_id] = outcome
        async for event in self.engine.events(queued.job_id):
            if isinstance(event, TERMINAL_EVENTS):
                return


def day_traffic(rng: random.Random, day: datetime, index: int) -> list[tuple[str, Outcome]]:
    """One day's jobs: more on weekdays, a few API-heavy days, an API outage on day 18, a slow GPU on day 23."""
    weekday = day.weekday() < 5
    count = rng.randint(35, 60) if weekday else rng.randint(15, 28)
    api_share = 0.55 if index in (9, 10, 24) else 0.3
    jobs = []
    for _ in range(count):
        if rng.random() < api_share:
            model = rng.choice(["dev", "pro", "pro", "ultra"])
            latency = rng.uniform(8, 20) + rng.expovariate(1 / 4)
            if index == 18 and rng.random() < 0.45:
                jobs.append((model, Outcome(45.0, FailureReason.TIMEOUT, charged_micros=PRICES[model])))
            elif rng.random() < 0.03:
                jobs.append((model, Outcome(6.0, FailureReason.MODERATED)))
            else:
                jobs.append((model, Outcome(latency, cost_micros=PRICES[model])))
        else:
            latency = rng.uniform(4, 12) + rng.expovariate(1 / (40 if index == 23 else 8))
            if rng.random() < (0.12 if index == 23 else 0.02):
                jobs.append(("schnell", Outcome(latency, FailureReason.OOM)))
            else:
                jobs.append(("schnell", Outcome(latency)))
    return jobs


async def seed(database: Path, settings: Settings, seed_value: int = 7) -> Engine:
    clock = Clock(0.0)
    seeder: Seeder | None = None

    def plan(job: BackendJob, attempt: int) -> list[BackendEvent]:
        assert seeder is not None
        return seeder.plan(job, attempt)

    backends = {
        BackendKind.LOCAL: ScriptedBackend(BackendKind.LOCAL, plan=plan),
        BackendKind.API: ScriptedBackend(BackendKind.API, slots=8, plan=plan),
    }
    engine = Engine(settings, Secrets(), await Store.open(database, clock), backends, clock=clock)
    await engine.start()
    seeder = Seeder(engine, clock)
    rng = random.Random(seed_value)
    first = (TODAY_NOON - timedelta(days=29)).replace(hour=7)
    for index in range(30):
        day = first + timedelta(days=index)
        jobs = day_traffic(rng, day, index)
        end = day.replace(hour=12) if index == 29 else day.replace(hour=23)
        step = (end - day).total_seconds() / len(jobs)
        for n, (model, outcome) in enumerate(jobs):
            clock.now = max(clock.now, day.timestamp() + n * step)
            await seeder.job(rng.choice(["ada", "bob", "cy", "dee", "eve", "fay"]), model, outcome)
    return engine


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/admin_report.png"))
    parser.add_argument("--cap", default="50.00", help="global API cap in dollars per month")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        settings = Settings.model_validate(
            {
                "bot": {"state_dir": state},
                "limits": {"global_api_usd_per_month": args.cap},
                "tiers": {"default": {}},  # no per-user limits: the point is the traffic, not the quotas
            }
        )
        started = time.perf_counter()
        engine = await seed(settings.bot.database_path, settings)
        seeded = time.perf_counter() - started
        try:
            started = time.perf_counter()
            report = await build_report(engine._store, settings, engine._quota.periods())
            built = time.perf_counter() - started
            started = time.perf_counter()
            png = render_png(report)
            drawn = time.perf_counter() - started
        finally:
            await engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    jobs = sum(report.ended) + sum(report.cancelled)
    print(summary_text(report))
    print(f"\n{jobs} jobs seeded in {seeded:.1f} s; report built in {built * 1000:.0f} ms, drawn in {drawn:.2f} s")
    print(f"chart: {args.out} ({len(png):,} bytes)")


if __name__ == "__main__":
    asyncio.run(main())
