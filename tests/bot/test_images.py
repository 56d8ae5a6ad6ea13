"""bot/images.py: a result that fits is posted as stored; one over the limit becomes a JPEG that fits and keeps the
generation parameters in its comment."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.images import fit_attachment

PARAMETERS = {"prompt": "a red cat, 富士山", "seed": "42", "model": "FLUX.1 [dev]", "job": "j0000000000000001"}


def stored_png(side: int = 256) -> bytes:
    """A noisy PNG (noise compresses badly, so it is large) with parameters in text chunks, as the engine stores."""
    noise = random.Random(7).randbytes(side * side * 3)
    info = PngInfo()
    for key, value in PARAMETERS.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), noise).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_a_result_that_fits_is_posted_as_stored() -> None:
    png = stored_png()
    assert fit_attachment(png, len(png), "j1") == (png, "j1.png")


def test_an_oversized_result_is_reencoded_as_a_jpeg_that_keeps_its_parameters() -> None:
    png = stored_png()
    limit = len(png) // 4
    data, filename = fit_attachment(png, limit, "j1")
    assert filename == "j1.jpg" and len(data) <= limit
    with Image.open(io.BytesIO(data)) as jpeg:
        assert jpeg.format == "JPEG"
        comment = jpeg.info["comment"].decode()
    assert comment.splitlines() == [f"{key}: {value}" for key, value in PARAMETERS.items()]


def test_a_tight_limit_shrinks_the_image_until_it_fits() -> None:
    png = stored_png()
    data, _ = fit_attachment(png, 8_000, "j1")
    with Image.open(io.BytesIO(data)) as jpeg:
        assert len(data) <= 8_000 and jpeg.width < 256 and jpeg.width == jpeg.height  # the aspect is kept


def test_a_limit_no_size_can_meet_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be made smaller than 100 bytes"):
        fit_attachment(stored_png(), 100, "j1")
