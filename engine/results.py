"""The stored result: one PNG per job that carries its own generation parameters.

The scheduler writes it once; every front-end posts or links those same bytes, so an image saved from Discord,
Slack or the console's folder tells any image tool (they read PNG text chunks) what made it.
"""

from __future__ import annotations

import io
import logging

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.config import StyleSettings
from engine.models import PNG, Job

log = logging.getLogger(__name__)


def png_with_parameters(image: bytes, job: Job, model_display: str, style: StyleSettings | None = None) -> bytes:
    """Re-encode as PNG (lossless) carrying the generation parameters in text chunks; with a style, its name and
    its adapters' hashes and weights (which say exactly which LoRA files made it)."""
    info = PngInfo()
    r = job.request
    if r.style:
        info.add_text("style", r.style)
        info.add_text("styled prompt", r.for_model)
        if style is not None and style.adapters:
            info.add_text("adapters", style.adapters_text())
    for key, value in (
        ("prompt", r.prompt),
        ("seed", str(r.seed)),
        ("model", model_display),
        ("steps", str(r.steps)),
        ("size", f"{r.width}x{r.height}"),
        ("guidance", "" if r.guidance is None else str(r.guidance)),
        ("backend", job.backend.value),
        ("job", job.id),
        ("Software", "flux-bot"),
    ):
        info.add_text(key, value)
    with Image.open(io.BytesIO(image)) as opened:
        out = io.BytesIO()
        opened.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def annotated(
    image: bytes, mime: str, job: Job, model_display: str, style: StyleSettings | None = None
) -> tuple[bytes, str]:
    """What to store and its type: the PNG with parameters; the bytes as made when they cannot be decoded (logged,
    so the user still gets what the backend produced and the operator learns of it)."""
    try:
        return png_with_parameters(image, job, model_display, style), PNG.mime
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("job %s: the %s result could not be decoded to add its parameters (%s)", job.id, mime, exc)
        return image, mime
