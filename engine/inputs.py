"""Input images (edits, image-guided generation, variations): checked, cleaned and stored by content.

An adapter hands the engine the bytes it downloaded (chat URLs expire: they are never stored or sent on). Before
anything is reserved, the bytes must be one still image in PNG, JPEG or WebP, at most `max_input_mb` and
`max_input_megapixels` (a decompression bomb is refused from its header, before its pixels are decoded). The image
is then turned upright (EXIF orientation), its metadata dropped, and stored as PNG under the state folder named by
the sha256 of those PNG bytes: the same image submitted twice is stored once, and the job records only the hash.
Retention removes inputs as it removes results (`[bot] keep_images_days`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

ACCEPTED = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIELD = "image"


@dataclass(frozen=True, slots=True)
class StoredInput:
    sha256: str
    width: int
    height: int


class InputImages:
    """The content-addressed folder of input images (see the module docstring)."""

    def __init__(self, folder: Path, *, max_bytes: int, max_pixels: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def accept(self, data: bytes) -> StoredInput:
        """Check, clean and store `data`; InvalidRequest saying what is wrong with it, storing nothing."""
        cleaned, width, height = self.clean(data)
        sha256 = hashlib.sha256(cleaned).hexdigest()
        path = self.path(sha256)
        try:
            os.utime(path)  # stored already: retention counts from its latest use
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, cleaned)
        return StoredInput(sha256, width, height)

    def clean(self, data: bytes) -> tuple[bytes, int, int]:
        """The image as upright PNG without metadata, with its size; InvalidRequest for anything else."""
        limit_mb = self.max_bytes / 1_000_000
        if len(data) > self.max_bytes:
            raise InvalidRequest(
                f"the image is {len(data) / 1_000_000:.1f} MB; at most {limit_mb:g} MB are accepted", field=_FIELD
            )
        if not data:
            raise InvalidRequest("the file is empty: attach a PNG, JPEG or WebP image", field=_FIELD)
        if _looks_like_svg(data):
            raise InvalidRequest("an SVG drawing is not accepted: use a PNG, JPEG or WebP image", field=_FIELD)
        try:
            with warnings.catch_warnings():
                # Pillow warns (then raises) past its own pixel limit: our limit, checked from the header, comes first.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as opened:
                    kind = ACCEPTED.get(opened.format or "")
                    if kind is None:
                        raise InvalidRequest(
                            f"a {opened.format or 'file of an unknown kind'} is not accepted: use a PNG, JPEG or"
                            " WebP image",
                            field=_FIELD,
                        )
                    if getattr(opened, "n_frames", 1) > 1:
                        raise InvalidRequest(f"the {kind} is animated: use a still image", field=_FIELD)
                    width, height = opened.size
                    if width * height > self.max_pixels:
                        raise InvalidRequest(
                            f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels); at most"
                            f" {self.max_pixels / 1e6:g} megapixels are accepted",
                            field=_FIELD,
                        )
                    opened.load()
                    upright = ImageOps.exif_transpose(opened)
                    converted = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
        except InvalidRequest:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidRequest(
                f"the image has far more pixels than the {self.max_pixels / 1e6:g} megapixels accepted", field=_FIELD
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidRequest(
                "that file is not an image flux-bot can read: use a PNG, JPEG or WebP image", field=_FIELD
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            # Pillow's words for a truncated or corrupt file.
            raise InvalidRequest(
                "the image is damaged or cut short (it could not be read to the end): upload it again", field=_FIELD
            ) from exc
        out = io.BytesIO()
        converted.save(out, format="PNG")  # no info, no EXIF: nothing of the original file's metadata remains
        return out.getvalue(), converted.width, converted.height

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.folder / f"{sha256}.png"

    def read(self, sha256: str) -> bytes:
        """The stored input; FileNotFoundError once retention has removed it."""
        return self.path(sha256).read_bytes()

    def remove_older_than(self, seconds: float, keep: set[str]) -> int:
        """Delete the inputs last stored more than `seconds` ago, except those in `keep` (active jobs'); how many."""
        if not self.folder.is_dir():
            return 0
        cutoff = time.time() - seconds
        removed = 0
        for path in self.folder.glob("*.png"):
            with contextlib.suppress(FileNotFoundError):
                if path.stem not in keep and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower()


def _write_atomically(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".input-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
