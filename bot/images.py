"""Result images as the chat platforms take them: the stored PNG when it fits, else a JPEG that does.

The engine stores each result as a PNG whose text chunks carry its generation parameters (prompt, seed, model...).
A JPEG has no text chunks, so when a result must be re-encoded to fit an attachment limit the same parameters go
into its comment segment: a saved image tells any image tool what made it, whichever form it was posted in.
"""

from __future__ import annotations

import io
import logging

from PIL import Image

log = logging.getLogger(__name__)

JPEG_QUALITIES = (90, 75, 60, 45)  # tried in turn before the image is made smaller
SMALLEST_SIDE = 16  # below this a result says nothing: refuse rather than post a smudge


def fit_attachment(png: bytes, limit: int, stem: str) -> tuple[bytes, str]:
    """The PNG and its file name if it fits in `limit` bytes, else the largest JPEG that does: lower quality first,
    then smaller sizes, the parameters in its comment. ValueError when not even the smallest size fits."""
    if len(png) <= limit:
        return png, f"{stem}.png"
    with Image.open(io.BytesIO(png)) as opened:
        text: dict[str, str] = getattr(opened, "text", {})
        comment = "\n".join(f"{key}: {value}" for key, value in text.items()).encode()  # one `key: value` a line
        image = opened.convert("RGB")
    while True:
        for quality in JPEG_QUALITIES:
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality, optimize=True, comment=comment)
            if out.tell() <= limit:
                log.debug("%s: %d-byte PNG sent as a %d-byte JPEG (quality %d)", stem, len(png), out.tell(), quality)
                return out.getvalue(), f"{stem}.jpg"
        if min(image.size) <= SMALLEST_SIDE:
            raise ValueError(f"the image cannot be made smaller than {limit} bytes")
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.Resampling.LANCZOS)
