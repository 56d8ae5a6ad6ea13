"""ImageRequest -> ResolvedRequest: every option filled from the model's defaults and checked against its limits.

Sizes come from fixed resolution buckets (engine.models.ASPECT_SIZES, one per aspect ratio), and a width and
height given instead must lie within the BFL API's side limits (engine.models), which FLUX.1 on the GPU lane
shares: one rule for both lanes, so a job can fail over from one to the other as it is.
"""

from __future__ import annotations

import logging
import secrets

from engine.config import ASPECT_RATIOS, ModelSettings
from engine.errors import InvalidRequest
from engine.models import (
    ASPECT_SIZES,
    BFL_SIDE_MAX,
    BFL_SIDE_MIN,
    BFL_SIDE_MULTIPLE,
    BFL_STEPS_MIN,
    MAX_SEED,
    ImageRequest,
    ResolvedRequest,
)

__all__ = ["resolve"]

log = logging.getLogger(__name__)


def resolve(request: ImageRequest, model: ModelSettings, *, guided: tuple[str, ...] = ()) -> ResolvedRequest:
    """Fill and check every option; `guided` names the configured models that take guidance, for the advice."""
    aspect = request.aspect_ratio or "1:1"
    if aspect not in ASPECT_RATIOS:
        raise InvalidRequest(f"aspect ratio {aspect!r} is not one of {', '.join(ASPECT_RATIOS)}", field="aspect")
    width, height = _size(request, aspect, model)
    steps = model.default_steps if request.steps is None else request.steps
    if not BFL_STEPS_MIN <= steps <= model.max_steps:
        raise InvalidRequest(
            f"steps must be between {BFL_STEPS_MIN} and {model.max_steps} for {model.display_name}", field="steps"
        )
    # A model without a default guidance takes none (FLUX.1 [schnell] is distilled without it, and the API's pro
    # endpoints have no such field): a value would be silently ignored, and the image's metadata would show it.
    if request.guidance is not None and model.default_guidance is None:
        other = f", or choose a model that takes it ({', '.join(guided)})" if guided else ""
        raise InvalidRequest(
            f"{model.display_name} takes no guidance value; leave guidance out{other}", field="guidance"
        )
    guidance = request.guidance if request.guidance is not None else model.default_guidance
    if guidance is not None and not model.min_guidance <= guidance <= model.max_guidance:
        raise InvalidRequest(
            f"guidance must be between {model.min_guidance} and {model.max_guidance}", field="guidance"
        )
    seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}", field="seed")
    if model.needs_input_image and not request.input_image_url:
        raise InvalidRequest(f"{model.display_name} edits an image: attach one", field="image")
    return ResolvedRequest(
        prompt=request.prompt,
        model=request.model,
        width=width,
        height=height,
        aspect_ratio=aspect,
        steps=steps,
        guidance=guidance,
        seed=seed,
        mode=request.mode,
        input_image_url=request.input_image_url,
    )


def _size(request: ImageRequest, aspect: str, model: ModelSettings) -> tuple[int, int]:
    if request.width is None and request.height is None:
        return ASPECT_SIZES[aspect]
    if model.sizing == "aspect":
        raise InvalidRequest(f"{model.display_name} takes an aspect ratio, not a width and height", field="size")
    if request.width is None or request.height is None:
        raise InvalidRequest("give both width and height, or an aspect ratio", field="size")
    for name, side in (("width", request.width), ("height", request.height)):
        if not BFL_SIDE_MIN <= side <= BFL_SIDE_MAX or side % BFL_SIDE_MULTIPLE:
            raise InvalidRequest(
                f"{name} must be a multiple of {BFL_SIDE_MULTIPLE} between {BFL_SIDE_MIN} and {BFL_SIDE_MAX}",
                field=name,
            )
    return request.width, request.height
