"""What a LoRA style switch costs a job, on the demo model in this process (CPU).

One FluxRunner per way of holding the adapters: named peft adapters (`set_adapters` / `disable_lora` per job, as a
worker without torch.compile does) and hot-swap slots (the style's weights copied into fixed slots per job, as a
compiled worker does; not compiled here). Two styles: "ink" (one rank-16 LoRA on to_q/to_k/to_v/to_out.0) and
"neon" (two: rank 8 on to_q/to_v, rank 4 on all four). Each sequence runs `--jobs` jobs, after two unmeasured ones:

    same style   ink, ink, ink, ...           (the switch finds the style already set)
    alternating  ink, neon, ink, neon, ...    (every job switches)
    style/base   ink, base, ink, base, ...    (every job switches, every other one to the base model)
    base only    no style at all, on the same runner

It reports the median milliseconds per job (FluxRunner.run, PNG and the between-jobs collection included) and the
median of the switch alone (Styles.apply), for the switches the sequence really makes.

    python -m bench.style_switch              # 64x64, 4 steps, 30 jobs per sequence (about a minute on 2 cores)
    python -m bench.style_switch --jobs 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from engine.backends.demo_model import ensure_demo_model
from engine.backends.local.pipeline import FluxRunner, Options, load_pipeline
from engine.backends.local.styles import BASE_MODEL, check_styles, load_styles
from engine.backends.protocol import ImageDone, JobSpec, Message
from tests.fakes.loras import ATTENTION, make_lora

SEQUENCES = {
    "same style": ("ink", "ink"),
    "alternating": ("ink", "neon"),
    "style/base": ("ink", BASE_MODEL),
    "base only": (BASE_MODEL, BASE_MODEL),
}


class _Quiet:
    """Progress goes nowhere and nothing is cancelled."""

    def send(self, message: Message) -> None:
        return None

    def cancelled(self, job_id: str) -> bool:
        return False

    def until_cancelled(self, job_id: str) -> None:
        raise AssertionError("no fault is injected")


def build_runner(options: Options, *, hotswap: bool) -> FluxRunner:
    pipe, device, _ = load_pipeline(replace(options, styles={}))
    return FluxRunner(pipe, device, options, None, load_styles(pipe, check_styles(options), hotswap=hotswap))


def measure(runner: FluxRunner, pattern: tuple[str, str], args: argparse.Namespace) -> tuple[float, float | None]:
    """Median ms per job, and per switch that changed the style (None: the sequence never changes it)."""
    quiet = _Quiet()
    job_ms: list[float] = []
    switch_ms: list[float] = []
    previous = runner.styles.names[0] if pattern[0] == BASE_MODEL else BASE_MODEL
    for n in range(args.jobs + 2):
        style = pattern[n % 2]
        if style != previous:
            # The switch the job would make, timed alone, then undone so that the job below makes it again.
            started = time.perf_counter()
            runner.styles.apply(style)
            if n >= 2:
                switch_ms.append((time.perf_counter() - started) * 1000)
            runner.styles.apply(previous)
        spec = JobSpec(f"bench-{n}", "demo", "a red fox", args.size, args.size, args.steps, None, n, style=style)
        started = time.perf_counter()
        result = runner.run(spec, quiet, quiet)
        if not isinstance(result, ImageDone):
            raise RuntimeError(f"job {n} ({style or 'base'}) did not finish: {result}")
        if n >= 2:
            job_ms.append((time.perf_counter() - started) * 1000)
        previous = style
    return statistics.median(job_ms), statistics.median(switch_ms) if switch_ms else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30, help="measured jobs per sequence")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="flux-bot-styles-") as scratch:
        folder = Path(scratch)
        model = ensure_demo_model(folder / "demo-model")
        ink = make_lora(model, folder / "ink.safetensors", seed=1, rank=16, targets=ATTENTION)
        neon_a = make_lora(model, folder / "neon-a.safetensors", seed=2, rank=8, targets=("to_q", "to_v"))
        neon_b = make_lora(model, folder / "neon-b.safetensors", seed=3, rank=4, targets=ATTENTION)
        options = Options(
            model=str(model), device="cpu", dtype="float32", buckets=[(args.size, args.size)], warmup=False,
            compile=False, fp8=False, fuse_qkv=False, vae_tiling=False, cpu_offload=False, preview_every=0,
            styles={"ink": (ink.adapter(),), "neon": (neon_a.adapter(0.8), neon_b.adapter(-0.5))},
        )  # fmt: skip
        for holder, hotswap in (("named adapters", False), ("hot-swap slots", True)):
            runner = build_runner(options, hotswap=hotswap)
            for sequence, pattern in SEQUENCES.items():
                job, switch = measure(runner, pattern, args)
                rows.append({"adapters": holder, "sequence": sequence, "job_ms": round(job, 1),
                             "switch_ms": None if switch is None else round(switch, 2)})  # fmt: skip
    print(f"{'adapters':<16} {'sequence':<12} {'ms/job':>8} {'ms/switch':>10}")
    for row in rows:
        switch = "-" if row["switch_ms"] is None else f"{row['switch_ms']:.2f}"
        print(f"{row['adapters']!s:<16} {row['sequence']!s:<12} {row['job_ms']:>8.1f} {switch:>10}")
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used (device = cpu)",
        "command": " ".join(["python -m bench.style_switch", *(argv or sys.argv[1:])]),
        "size": args.size,
        "steps": args.steps,
        "jobs_per_sequence": args.jobs,
        "threads": args.threads,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
