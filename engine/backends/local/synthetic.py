"""A worker that makes no image, for benchmarks and tests of the lane only: FLUX_BOT_WORKER_SYNTHETIC_S=SECONDS.

Each job takes SECONDS (spread over its steps, with progress after each, so cancel and the lease behave as with
a pipeline) and returns the same small PNG, with no torch and no model: on a 2-core box, eight such workers
measure what the lane costs rather than what the CPU can render. Never set it on a host that serves users.
"""

from __future__ import annotations

import io
import logging
import time

from engine.backends.local.pipeline import Cancels, JobOutcome, Sink, rss_mb
from engine.backends.protocol import CancelledJob, ImageDone, JobSpec, MemoryStats, StepProgress

log = logging.getLogger(__name__)

SYNTHETIC_ENV = "FLUX_BOT_WORKER_SYNTHETIC_S"


def synthetic_seconds(text: str | None) -> float | None:
    """The seconds per job the switch asks for, None when unset; ValueError for anything but a number >= 0."""
    if not text:
        return None
    seconds = float(text)
    if not seconds >= 0:
        raise ValueError(f"{SYNTHETIC_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds


def _fixed_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class SyntheticRunner:
    """Serves jobs as FluxRunner does, sleeping instead of rendering (see the module docstring)."""

    device = "synthetic"
    dtype = "none"

    def __init__(self, seconds_per_job: float) -> None:
        self.seconds_per_job = seconds_per_job
        self.model = f"synthetic ({seconds_per_job:g} s per job)"
        self._png = _fixed_png()

    def run(self, spec: JobSpec, progress: Sink, cancels: Cancels) -> JobOutcome:
        started = time.perf_counter()
        per_step = self.seconds_per_job / max(spec.steps, 1)
        for step in range(1, spec.steps + 1):
            if cancels.cancelled(spec.id):
                return CancelledJob(spec.id, step - 1)
            time.sleep(max(started + step * per_step - time.perf_counter(), 0.0))
            progress.send(StepProgress(spec.id, step, spec.steps))
        return ImageDone(spec.id, spec.seed, time.perf_counter() - started, self._png)

    def memory(self) -> MemoryStats:
        return MemoryStats(rss_mb=rss_mb())
