"""Soak the local backend: N tiny generations through LocalBackend and its real worker processes, with recycling.

It checks, at a scale no test runs, what the supervisor promises: every job ends in exactly one terminal event, workers
are recycled every `--recycle-after` jobs, and a worker's memory does not grow across its lifetime. It reports each
worker's RSS when it started and after its last job, the number of recycles and any failures.

    python -m bench.soak_local --jobs 1000 --recycle-after 100 --out bench/out/soak
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.backends.demo_model import ensure_demo_model
from engine.backends.local.supervisor import LocalBackend
from engine.config import LocalSettings, ModelSettings
from engine.models import BackendJob, Failed, Finished, Mode, ResolvedRequest

MODEL = "demo"


@dataclass
class WorkerLife:
    pid: int
    jobs: int
    rss_start_mb: float
    # After the last job whose between-jobs check the soak saw: for a worker recycled after N jobs, job N - 1.
    rss_last_mb: float


async def soak(args: argparse.Namespace, model: Path) -> dict[str, object]:
    settings = LocalSettings(
        device="cpu",
        resolution_buckets=(f"{args.size}x{args.size}",),
        recycle_after_jobs=args.recycle_after,
        preview_every=args.preview_every,
    )
    models = {MODEL: ModelSettings(display_name="tiny demo", local=True, default_steps=args.steps)}
    # OpenMP threads that outnumber the free cores spin-wait and make every job several times slower.
    backend = LocalBackend(settings, models, model, extra_env={"OMP_NUM_THREADS": str(args.threads)})
    lives: dict[int, WorkerLife] = {}
    outcomes: Counter[str] = Counter()
    seconds: list[float] = []
    started = time.perf_counter()
    await backend.start()
    try:
        for n in range(args.jobs):
            request = ResolvedRequest(f"soak {n}", MODEL, args.size, args.size, "1:1", args.steps, None, n, Mode.RELAX)
            job_started = time.perf_counter()
            terminal = [e async for e in backend.run(BackendJob(f"s{n}", request)) if isinstance(e, Finished | Failed)]
            seconds.append(time.perf_counter() - job_started)
            outcomes["lost" if len(terminal) != 1 else type(terminal[0]).__name__] += 1
            if isinstance(terminal[-1], Failed):
                print(f"job {n}: {terminal[-1].reason}: {terminal[-1].detail}", file=sys.stderr)
            await backend.wait_idle()
            for info in backend.workers():
                life = lives.setdefault(info.pid, WorkerLife(info.pid, 0, info.rss_start_mb, info.rss_mb))
                life.jobs, life.rss_last_mb = info.jobs, info.rss_mb
            if (n + 1) % 100 == 0:
                print(f"{n + 1} jobs, {backend.recycles} recycles, {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        recycles, failures = backend.recycles, backend.failures
        await backend.close()
    ordered = sorted(lives.values(), key=lambda life: life.pid)
    # The last job's recycle starts one more worker that serves nothing: leave it out of the RSS figures.
    served = [life for life in ordered if life.jobs]
    growth = [life.rss_last_mb - life.rss_start_mb for life in served]
    return {
        "jobs": args.jobs,
        "outcomes": dict(outcomes),
        "recycles": recycles,
        "failures": failures,
        "worker_processes_started": len(ordered),
        "wall_s": round(time.perf_counter() - started, 1),
        "median_job_s": round(statistics.median(seconds), 3),
        "rss_first_worker_start_mb": round(served[0].rss_start_mb, 1),
        "rss_last_worker_end_mb": round(served[-1].rss_last_mb, 1),
        "rss_growth_per_worker_mb": {
            "min": round(min(growth), 1),
            "median": round(statistics.median(growth), 1),
            "max": round(max(growth), 1),
        },
        "worker_lives": [asdict(life) for life in ordered],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--recycle-after", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--preview-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (OMP_NUM_THREADS)")
    parser.add_argument("--model", type=Path, help="a FluxPipeline folder (default: the demo model, built here)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/soak"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flux-bot-soak-") as scratch:
        model = args.model or ensure_demo_model(Path(scratch) / "demo-model")
        report = asyncio.run(soak(args, model))
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used (device = cpu)",
        "command": " ".join(["python -m bench.soak_local", *(argv or sys.argv[1:])]),
        **report,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "worker_lives"}, indent=2))
    return 0 if report["outcomes"] == {"Finished": args.jobs} else 1


if __name__ == "__main__":
    sys.exit(main())
