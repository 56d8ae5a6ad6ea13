"""A stand-in image classifier that flags by a marker, since no test may hold real explicit content.

`MarkerClassifier` scores FEMALE_BREAST_EXPOSED 0.9 for an image whose top-left pixel is `MARKER` (magenta) and
nothing otherwise; `marked_png()` makes such an image. Install it with `Engine(...)` through the `classifier`
hook the tests use (`ReviewStep(settings.review, MarkerClassifier())`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image

MARKER = (255, 0, 255)
FLAGGED_LABEL = "FEMALE_BREAST_EXPOSED"


def marked_png(size: tuple[int, int] = (16, 16)) -> bytes:
    image = Image.new("RGB", size, (40, 120, 40))
    image.putpixel((0, 0), MARKER)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class MarkerClassifier:
    def __init__(self) -> None:
        self.calls = 0

    def scores(self, image: bytes) -> Mapping[str, float]:
        self.calls += 1
        with Image.open(io.BytesIO(image)) as opened:
            marked = opened.convert("RGB").getpixel((0, 0)) == MARKER
        return {FLAGGED_LABEL: 0.9} if marked else {}
