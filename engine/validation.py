"""ImageRequest -> ResolvedRequest: every option filled from the model's defaults and checked against its limits.

Sizes come from fixed resolution buckets (engine.models.ASPECT_SIZES, one per aspect ratio), and a width and
height given instead must lie within the BFL API's side limits (engine.models), which FLUX.1 on the GPU lane
shares: one rule for both lanes, so a job can fail over from one to the other as it is.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping

from engine.config import ASPECT_RATIOS, ModelSettings, StyleSettings
from engine.errors import InvalidRequest
from engine.inputs import StoredInput
from engine.models import (
    ASPECT_SIZES,
    BFL_SIDE_MAX,
    BFL_SIDE_MIN,
    BFL_SIDE_MULTIPLE,
    BFL_STEPS_MIN,
    MAX_SEED,
    ImageRequest,
    ResolvedRequest,
    Task,
)

__all__ = ["resolve"]

log = logging.getLogger(__name__)


def resolve(
    request: ImageRequest,
    model: ModelSettings,
    *,
    guided: tuple[str, ...] = (),
    edit_models: tuple[str, ...] = (),
    input_image: StoredInput | None = None,
    styles: Mapping[str, StyleSettings] | None = None,
) -> ResolvedRequest:
    """Fill and check every option; `guided` and `edit_models` name the configured models that take guidance and
    that edit images, for the advice; `input_image` is the request's image, checked and stored already; `styles`
    are the configured [styles.*] (a style's defaults are filled by the caller, which knows what was asked)."""
    styled_prompt = _styled(request, model, styles or {})
    task = Task.EDIT if model.needs_input_image else request.task
    if task is Task.EDIT and not model.needs_input_image:
        other = f": use {', '.join(edit_models)}" if edit_models else ", and none is configured here"
        raise InvalidRequest(f"{model.display_name} does not edit images{other}", field="model")
    if task in (Task.EDIT, Task.VARY) and input_image is None:
        what = "edits" if task is Task.EDIT else "varies"
        raise InvalidRequest(f"{model.display_name} {what} an image: attach one", field="image")
    strength = request.strength if task is Task.VARY else None
    if task is Task.VARY and (strength is None or not 0 < strength <= 1):
        raise InvalidRequest("a variation's strength must be above 0 and at most 1", field="strength")
    # An edit or a variation keeps its input's shape: the nearest of the standard aspect ratios, unless one is asked.
    aspect = request.aspect_ratio or (
        nearest_aspect(input_image) if input_image and task is not Task.GENERATE else "1:1"
    )
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
        task=task,
        input_image=input_image.sha256 if input_image else None,
        strength=strength,
        style=request.style,
        styled_prompt=styled_prompt,
    )


def _styled(request: ImageRequest, model: ModelSettings, styles: Mapping[str, StyleSettings]) -> str:
    """The style's template around the prompt ("" without a style), once the style is known to suit the model."""
    if request.style is None:
        return ""
    style = styles.get(request.style)
    if style is None:
        known = f"choose one of: {', '.join(styles)}" if styles else "this server has no styles configured"
        raise InvalidRequest(f"there is no style {request.style!r}; {known}", field="style")
    if style.models and request.model not in style.models:
        raise InvalidRequest(
            f"the style {style.display_name} works with {', '.join(style.models)}, not {model.display_name}",
            field="style",
        )
    if style.gpu_only and not model.local:
        raise InvalidRequest(
            f"the style {style.display_name} uses LoRA adapters, which run on the GPU lane only, and"
            f" {model.display_name} runs only on the API: choose a model of the GPU lane",
            field="style",
        )
    return style.apply(request.prompt)


def nearest_aspect(image: StoredInput) -> str:
    """The standard aspect ratio closest to the image's own (compared in log space: 2:1 is as far from 1:1 as 1:2)."""

    def distance(ratio: str) -> float:
        width, height = (int(part) for part in ratio.split(":"))
        return abs(math.log((image.width / image.height) / (width / height)))

    return min(ASPECT_RATIOS, key=distance)


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
