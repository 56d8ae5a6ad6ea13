"""The tiny FLUX.1 pipeline as a test fixture: real diffusers code, random weights, CPU, well under a second a job.

`build_tiny_flux` builds it once into a folder (the same builder as the built-in demo model); the rest are helpers
for driving `LocalBackend` with it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from engine.backends.demo_model import ensure_demo_model
from engine.backends.local.supervisor import LocalBackend
from engine.config import LocalSettings, ModelSettings
from engine.models import BackendEvent, BackendJob, Mode, ResolvedRequest

MODEL = "tiny"
MODELS = {MODEL: ModelSettings(display_name="tiny FLUX", local=True, default_steps=4, max_steps=8)}
SIZE = 64  # the warmed bucket


def build_tiny_flux(folder: Path) -> Path:
    """The tiny pipeline saved with save_pretrained into `folder` (built once; later calls reuse it)."""
    return ensure_demo_model(folder)


def tiny_settings(**overrides: Any) -> LocalSettings:
    """LocalSettings for the tiny pipeline on the CPU: one small bucket, a preview every step."""
    base: dict[str, Any] = {
        "device": "cpu",
        "resolution_buckets": (f"{SIZE}x{SIZE}",),
        "preview_every": 1,
    }
    return LocalSettings(**{**base, **overrides})


def tiny_backend(model: Path, *, fault: str | None = None, **settings: Any) -> LocalBackend:
    """A LocalBackend on the tiny pipeline; `fault` sets the worker's test-only FLUX_BOT_WORKER_FAULT switch."""
    # Tests run several workers on few cores: one thread each, since oversubscribed OpenMP threads spin and burn
    # the CPU that the other workers need (the tiny model gains nothing from more threads).
    env = {"OMP_NUM_THREADS": "1"}
    if fault:
        env["FLUX_BOT_WORKER_FAULT"] = fault
    return LocalBackend(tiny_settings(**settings), MODELS, model, extra_env=env)


def tiny_request(seed: int = 1, *, width: int = SIZE, height: int = SIZE, steps: int = 4) -> ResolvedRequest:
    return ResolvedRequest(
        prompt="a red fox in the snow",
        model=MODEL,
        width=width,
        height=height,
        aspect_ratio="1:1",
        steps=steps,
        guidance=None,
        seed=seed,
        mode=Mode.RELAX,
    )


def tiny_job(job_id: str, seed: int = 1, **request: Any) -> BackendJob:
    return BackendJob(job_id, tiny_request(seed, **request))


def png_pixels(data: bytes) -> bytes:
    """A PNG's decoded pixels: what two results must share to be the same image (their text chunks name the job)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def png_size(data: bytes) -> tuple[int, int]:
    """The size of a PNG, after checking that it decodes completely."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def kinds(events: Sequence[BackendEvent]) -> list[str]:
    return [type(event).__name__ for event in events]
