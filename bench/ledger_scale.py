"""What a submit costs as the month's ledger grows: the reserving transaction and the usage read, at 0 to 1M API jobs.

Each size gets a fresh database holding N API jobs made earlier this month (spread over 1,000 users of one
server, each with an images and a money reservation, settled), written straight through the store's own job and
ledger statements in one transaction. A server and a global API budget are set (as every operator who tracks spend
does), so a submit's checks read the user's, the server's and the whole bot's use. The running totals are then
rebuilt from the ledger once (what the migration that added them costs on an existing database), and, one after
another:

- the usage read alone: `Store.usages` of what `Quota.standing` asks (the pre-check before routing);
- a submit: that read, then `Store.submit_job` with the reservations and limit checks of an API route (the
  `BEGIN IMMEDIATE` transaction that holds SQLite's write lock).

    python -m bench.ledger_scale                                # 0, 10,000, 100,000 and 1,000,000 jobs
    python -m bench.ledger_scale --sizes 0,10000 --submits 50   # a quick look

The last line is the goal's ratio: `ledger scale: submit p50 at 1M / at 0 = X.XX` (largest size over the smallest).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings
from engine.ledger import Reservation
from engine.models import (
    BackendKind,
    Job,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    Resource,
    RouteDecision,
)
from engine.quota import Quota
from engine.store import Store

USERS = 1000
GUILD = "bench-guild"
COST_MICROS = 25_000  # a FLUX.1 [dev] image on the API: $0.025


@dataclass(frozen=True, slots=True)
class Result:
    jobs: int
    build_s: float
    rebuild_s: float
    read_ms: list[float]
    submit_ms: list[float]


def settings(state_dir: Path) -> Settings:
    return Settings.model_validate(
        {
            "bot": {"state_dir": str(state_dir)},
            "limits": {"guild_api_usd_per_month": 500_000, "global_api_usd_per_month": 900_000},
        }
    )


def requester(n: int) -> Requester:
    return Requester(Platform.DISCORD, user_id=str(n), guild_id=GUILD, channel_id="1", display_name=f"user {n}")


def request() -> ResolvedRequest:
    return ResolvedRequest("a lighthouse at dusk", "dev", 1024, 1024, "1:1", 28, 3.5, 1, Mode.FAST)


def history(n: int, month_start: float, now: float) -> list[Job]:
    """N API jobs spread over this month until now, round-robin over the users."""
    span = max(now - month_start - 60, 1.0)
    return [
        Job(
            id=f"h{i:08d}",
            requester=requester(i % USERS),
            request=request(),
            state=JobState.DONE,
            backend=BackendKind.API,
            reason="bench history",
            created_at=month_start + span * i / max(n, 1),
            estimated_cost_micros=COST_MICROS,
        )
        for i in range(n)
    ]


def reservations_of(job: Job) -> list[Reservation]:
    """An API job's image and money, reserved on the day it was made."""
    day, month = (
        time.strftime("%Y-%m-%d", time.gmtime(job.created_at)),
        time.strftime("%Y-%m", time.gmtime(job.created_at)),
    )
    return [
        Reservation(Resource.IMAGES, 1, BackendKind.API, day, month),
        Reservation(Resource.USD_MICROS, job.estimated_cost_micros, BackendKind.API, day, month),
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(size: int, submits: int, folder: Path) -> Result:
    config = settings(folder / f"state-{size}")
    store = await Store.open(config.bot.database_path)
    quota = Quota(store, config, time.time)
    periods = quota.periods()
    month_start = periods.resets_at(Resource.USD_MICROS).replace(day=1).timestamp()
    month_start = min(month_start, time.time() - 3600)
    try:
        started = time.perf_counter()
        await store.add_settled_jobs(history(size, month_start, time.time()), reservations_of)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        await store.rebuild_totals()
        rebuild_s = time.perf_counter() - started
        decision = RouteDecision(BackendKind.API, "bench", estimated_cost_micros=COST_MICROS)
        read_ms, submit_ms = [], []
        for i in range(submits):
            who = requester(USERS + i)  # a new user each time: the shared budgets are what grows
            started = time.perf_counter()
            standing = await quota.standing(who)
            read_ms.append((time.perf_counter() - started) * 1000)
            job = Job(
                id=f"s{size:08d}{i:05d}",
                requester=who,
                request=request(),
                state=JobState.QUEUED,
                backend=BackendKind.API,
                reason="bench",
                created_at=time.time(),
                estimated_cost_micros=COST_MICROS,
            )
            started = time.perf_counter()
            await quota.standing(who)
            await store.submit_job(
                job, quota.reservations(decision, periods, with_image=True), standing.checks, max_active_jobs=None
            )
            submit_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await store.close()
    return Result(size, build_s, rebuild_s, read_ms, submit_ms)


async def run(sizes: list[int], submits: int) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="ledger-scale-") as folder:
        return [await measure(size, submits, Path(folder)) for size in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10000,100000,1000000", help="API jobs this month, comma-separated")
    parser.add_argument("--submits", type=int, default=200, help="measured submits per size")
    args = parser.parse_args()
    sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    results = asyncio.run(run(sizes, args.submits))
    print("| API jobs this month | built in | totals rebuilt in | usage read p50 | p99 | submit p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.jobs:,} | {r.build_s:.1f} s | {r.rebuild_s:.1f} s | {statistics.median(r.read_ms):.2f} ms | "
            f"{percentile(r.read_ms, 0.99):.2f} ms | {statistics.median(r.submit_ms):.2f} ms | "
            f"{percentile(r.submit_ms, 0.99):.2f} ms |"
        )
    first, last = results[0], results[-1]
    ratio = statistics.median(last.submit_ms) / statistics.median(first.submit_ms)
    label = f"{last.jobs / 1_000_000:g}M" if last.jobs >= 1_000_000 else f"{last.jobs:,}"
    print(f"ledger scale: submit p50 at {label} / at {first.jobs:,} = {ratio:.2f}")


if __name__ == "__main__":
    main()
