"""Time from cancelling a running local job to the next job starting, through LocalBackend and real worker processes.

One worker on the demo model (CPU). Each repetition lets a job run to `--cancel-at` steps, cancels its consumer as
the scheduler does on /cancel (task.cancel(), then waits for it), and starts the next job at once; it measures from
the cancel to that job's Started (a worker took it) and to its first Progress (its first step is done). The next
job is then the one cancelled in the following repetition. It reports the medians and how many worker processes
were replaced meanwhile (a replacement reloads the model).

    python -m bench.cancel_latency               # 1024x1024, 5 repetitions (about a minute on 2 cores)
    python -m bench.cancel_latency --quick       # 512x512, 3 repetitions

It uses only what LocalBackend has had from the start, so it also measures an older checkout of the engine: run it
from that checkout's root, with its own `engine` package first on PYTHONPATH.
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
from dataclasses import dataclass, field
from pathlib import Path

from engine.backends.demo_model import ensure_demo_model
from engine.backends.local.supervisor import LocalBackend
from engine.config import LocalSettings, ModelSettings
from engine.models import BackendJob, Mode, Progress, ResolvedRequest, Started

MODEL = "demo"


@dataclass
class _Job:
    """One consumer of backend.run, and when its events came."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)  # Progress at `--cancel-at` steps
    ended: bool = False  # before it was cancelled: it failed, or --steps is too small
    started_at: float = 0.0
    first_progress_at: float = 0.0
    pid: int = 0


async def _consume(backend: LocalBackend, job_id: str, n: int, args: argparse.Namespace, job: _Job) -> None:
    request = ResolvedRequest(f"cancel {n}", MODEL, args.size, args.size, "1:1", args.steps, None, n, Mode.RELAX)
    async for event in backend.run(BackendJob(job_id, request)):
        if isinstance(event, Started):
            job.started_at = time.perf_counter()
            (job.pid,) = (info.pid for info in backend.workers() if info.busy)
        elif isinstance(event, Progress):
            if not job.first_progress_at:
                job.first_progress_at = time.perf_counter()
            if event.step >= args.cancel_at:
                job.reached.set()
        else:
            print(f"job {job_id} ended before its cancel: {event}", file=sys.stderr)
            job.ended = True
            job.reached.set()


async def _until_cancellable(job: _Job) -> None:
    await job.reached.wait()
    if job.ended:
        raise RuntimeError("a job ended before it could be cancelled")


async def measure(args: argparse.Namespace, model: Path) -> dict[str, object]:
    settings = LocalSettings(device="cpu", resolution_buckets=(f"{args.size}x{args.size}",), preview_every=0)
    models = {MODEL: ModelSettings(display_name="demo", local=True, default_steps=args.steps, max_steps=args.steps)}
    # OpenMP threads that outnumber the free cores spin-wait and make every step several times slower.
    backend = LocalBackend(settings, models, model, extra_env={"OMP_NUM_THREADS": str(args.threads)})
    to_started: list[float] = []
    to_first_step: list[float] = []
    pids: list[int] = []
    await backend.start()
    try:
        job = _Job()
        task = asyncio.create_task(_consume(backend, "c0", 0, args, job))
        for n in range(1, args.repetitions + 1):
            await _until_cancellable(job)
            pids.append(job.pid)
            cancelled_at = time.perf_counter()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            job = _Job()
            task = asyncio.create_task(_consume(backend, f"c{n}", n, args, job))
            await _until_cancellable(job)
            to_started.append(job.started_at - cancelled_at)
            to_first_step.append(job.first_progress_at - cancelled_at)
            print(f"repetition {n}: next job started {to_started[-1]:.3f} s after the cancel", flush=True)
        pids.append(job.pid)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        recycles = backend.recycles
        await backend.close()
    return {
        "repetitions": args.repetitions,
        "cancel_to_next_started_s": {
            "median": round(statistics.median(to_started), 3),
            "min": round(min(to_started), 3),
            "max": round(max(to_started), 3),
        },
        "cancel_to_next_first_step_s": round(statistics.median(to_first_step), 3),
        "workers_replaced": recycles,
        "worker_pids": pids,  # of the cancelled jobs, then the last job
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512x512 and 3 repetitions")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; 512 with --quick)")
    parser.add_argument("--repetitions", type=int, help="cancels measured (default 5; 3 with --quick)")
    parser.add_argument("--steps", type=int, default=28, help="steps per job: more than --cancel-at, so jobs run on")
    parser.add_argument("--cancel-at", type=int, default=2, help="cancel once a job has made this many steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (OMP_NUM_THREADS)")
    parser.add_argument("--model", type=Path, help="a FluxPipeline folder (default: the demo model, built here)")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    args.size = args.size or (512 if args.quick else 1024)
    args.repetitions = args.repetitions or (3 if args.quick else 5)
    if not 0 < args.cancel_at < args.steps:
        parser.error("--cancel-at must be at least 1 and below --steps")
    with tempfile.TemporaryDirectory(prefix="flux-bot-cancel-") as scratch:
        model = args.model or ensure_demo_model(Path(scratch) / "demo-model")
        report = asyncio.run(measure(args, model))
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used (device = cpu)",
        "command": " ".join(["python -m bench.cancel_latency", *(argv or sys.argv[1:])]),
        "size": args.size,
        "steps": args.steps,
        "cancel_at_step": args.cancel_at,
        **report,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
