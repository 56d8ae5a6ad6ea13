"""How the GPU lane scales across hosts: images per second with 1, 2, 4 and 8 remote workers, and what dispatching
a job over NATS adds against the in-host socket path.

A real nats-server and real GPU host processes (`flux-bot worker --nats URL`, one worker each) serve the real
engine, which is built as `flux-bot run` builds it. So that two CPU cores do not cap the lane, every worker runs the
synthetic generator (`--synthetic-for-bench SECONDS`: a fixed time per job, spread over its steps, and a fixed PNG);
what is measured is the lane: publishing, pulling, events, the Object Store, results, SQLite.

- Throughput: after one warm-up job per worker, `--jobs-per-worker` x N jobs from as many users are submitted at
  once; images per second = jobs / (last result - first submit). Ideal: N / SECONDS. The scaling ratio at N is
  throughput(N) / throughput(1) (goal at 8: >= 7.2, i.e. 0.9 x N).
- Dispatch latency: from the scheduler starting the job (JobStarted) to its first progress event, less the one
  step that the worker spends before it reports: the time for a job to reach a worker and its first word to come
  back. The same measure for the in-host path (the supervisor's own worker process on a pipe), jobs one at a time.

    python -m bench.pool_scaling                      # 1, 2, 4, 8 workers, ~2 minutes on 2 cores
    python -m bench.pool_scaling --workers 1,2 --jobs-per-worker 4

The last line: `pool scaling: 8 workers = X.XX x one worker` (the largest N against 1).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.backends.factory import IN_HOST, build_backends
from engine.backends.local.supervisor import LocalBackend
from engine.backends.local.synthetic import SYNTHETIC_ENV
from engine.backends.nats import RemoteHosts
from engine.backends.pool import GpuPool, Member
from engine.config import Secrets, Settings
from engine.models import BackendKind, ImageRequest, JobDone, JobProgress, JobStarted, Platform, Requester
from engine.service import Engine
from engine.store import Store
from tests.fakes.gpu_hosts import GpuHosts
from tests.fakes.nats_server import NatsServer

STEPS = 4
LANE = {"heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 3.0, "ack_wait_s": 30.0}
REQUEST = ImageRequest("a lighthouse at dusk", "schnell", width=512, height=512, steps=STEPS)


@dataclass(frozen=True, slots=True)
class Timing:
    submitted: float
    dispatched: float
    first_progress: float
    ended: float
    done: bool


@dataclass(frozen=True, slots=True)
class Size:
    workers: int
    jobs: int
    wall_s: float
    images_per_s: float
    latency_ms: list[float]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def requester(n: int) -> Requester:
    return Requester(Platform.CONSOLE, f"bench-{n}", display_name=f"bench {n}")


def settings(state: Path, url: str = "") -> Settings:
    return Settings.model_validate(
        {
            "bot": {"state_dir": str(state), "keep_images_days": 0},
            "routing": {"api_enabled": False, "max_local_wait_s": 3600},
            "nats": {"url": url, **LANE},
            "tiers": {"default": {"images_per_day": 100_000, "gpu_seconds_per_day": 10_000_000}},
        }
    )


async def follow(engine: Engine, job_id: str, submitted: float) -> Timing:
    dispatched = first_progress = 0.0
    async for event in engine.events(job_id):
        now = time.perf_counter()
        if isinstance(event, JobStarted) and not dispatched:
            dispatched = now
        elif isinstance(event, JobProgress) and not first_progress:
            first_progress = now
        elif type(event).__name__ in ("JobDone", "JobFailed", "JobCancelled"):
            return Timing(submitted, dispatched, first_progress, now, isinstance(event, JobDone))
    raise AssertionError(f"job {job_id}: events ended without a terminal one")


async def submit_all(engine: Engine, count: int, first_user: int) -> list[Timing]:
    followers = []
    for n in range(count):
        submitted = time.perf_counter()
        queued = await engine.submit(requester(first_user + n), REQUEST)
        followers.append(asyncio.create_task(follow(engine, queued.job_id, submitted)))
    return list(await asyncio.gather(*followers))


def latencies(timings: list[Timing], step_s: float) -> list[float]:
    return [(t.first_progress - t.dispatched - step_s) * 1000 for t in timings if t.dispatched and t.first_progress]


async def remote_size(folder: Path, workers: int, per_worker: int, seconds: float) -> Size:
    server = NatsServer(folder / "nats")
    await server.start()
    hosts = GpuHosts(folder / "hosts", server.url, nats=LANE)
    config = settings(folder / "bot", server.url)
    backends, _ = await build_backends(config, Secrets())
    engine = Engine(config, Secrets(), await Store.open(config.bot.database_path), backends)
    try:
        await engine.start()
        for n in range(workers):
            await hosts.start(f"gpu-{n}", synthetic_s=seconds)
        pool = backends[BackendKind.LOCAL]
        assert isinstance(pool, GpuPool)
        remote = pool.members[0].backend
        assert isinstance(remote, RemoteHosts)
        await remote.wait_for_slots(workers)
        await submit_all(engine, workers, 0)  # warm-up: every worker once
        jobs = per_worker * workers
        timings = await submit_all(engine, jobs, 10_000)
        assert all(t.done for t in timings), "every job of the run ended done"
        wall = max(t.ended for t in timings) - min(t.submitted for t in timings)
        return Size(workers, jobs, wall, jobs / wall, latencies(timings, seconds / STEPS))
    finally:
        await engine.close()
        await hosts.close()
        await server.stop()


async def in_host_latency(folder: Path, jobs: int, seconds: float) -> list[float]:
    config = settings(folder / "in-host")
    local = config.local.model_copy(update={"warmup": False, "compile": False, "fp8": False})
    backend = LocalBackend(local, config.models, Path("synthetic"), extra_env={SYNTHETIC_ENV: str(seconds)})
    pool = GpuPool([Member(IN_HOST, backend)], config.models)
    engine = Engine(config, Secrets(), await Store.open(config.bot.database_path), {BackendKind.LOCAL: pool})
    try:
        await engine.start()
        await submit_all(engine, 1, 0)
        timings = [t for n in range(jobs) for t in await submit_all(engine, 1, 100 + n)]
        return latencies(timings, seconds / STEPS)
    finally:
        await engine.close()


async def run(sizes: list[int], per_worker: int, seconds: float) -> tuple[list[Size], list[float]]:
    with tempfile.TemporaryDirectory(prefix="pool-scaling-") as folder:
        results = [await remote_size(Path(folder) / f"n{n}", n, per_worker, seconds) for n in sizes]
        in_host = await in_host_latency(Path(folder), max(per_worker * 2, 10), seconds)
    return results, in_host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8", help="remote worker counts, comma-separated")
    parser.add_argument("--jobs-per-worker", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0, help="the synthetic generator's time per job")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("engine").setLevel(logging.ERROR)
    logging.getLogger("flux_bot").setLevel(logging.ERROR)
    sizes = [int(part) for part in args.workers.split(",") if part.strip()]
    started = time.perf_counter()
    results, in_host = asyncio.run(run(sizes, args.jobs_per_worker, args.seconds))
    base = results[0].images_per_s / results[0].workers
    print(f"synthetic worker: {args.seconds:g} s per job ({STEPS} steps); ideal = N / {args.seconds:g} images per s")
    print("| remote workers | jobs | images / s | ideal | scaling vs 1 | dispatch -> worker p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for size in results:
        print(
            f"| {size.workers} | {size.jobs} | {size.images_per_s:.2f} | {size.workers / args.seconds:.2f} | "
            f"{size.images_per_s / base:.2f} | {statistics.median(size.latency_ms):.1f} ms | "
            f"{percentile(size.latency_ms, 0.99):.1f} ms |"
        )
    print(
        f"| in-host (pipe), one at a time | {len(in_host)} | | | | {statistics.median(in_host):.1f} ms | "
        f"{percentile(in_host, 0.99):.1f} ms |"
    )
    print()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{platform.machine()}, {platform.python_version()}; {when}; {time.perf_counter() - started:.0f} s")
    last = results[-1]
    print(f"pool scaling: {last.workers} workers = {last.images_per_s / base:.2f} x one worker")


if __name__ == "__main__":
    main()
