"""Input images: every bad kind refused with one clear message and nothing reserved or stored; good ones cleaned,
stored once by content, sent to BFL as base64, and removed by retention when no job needs them any more."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from engine.backends.bfl import BflBackend
from engine.config import Secrets
from engine.errors import BackendUnavailable, InvalidRequest
from engine.inputs import InputImages
from engine.models import BackendKind, ImageRequest, JobDone, Mode, Task
from engine.retention import Retention
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.bfl_server import API_KEY, FakeBfl


def encoded(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=kind, **options)
    return out.getvalue()


def photo(width: int = 96, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 40, 40))
    image.paste((20, 20, 220), (0, 0, width // 2, height // 2))
    return image


def animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), index) for index in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (32, 32), (index * 80, 0, 0)) for index in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:])
    return out.getvalue()


BAD_INPUTS = {
    "not an image": (b"this is a text file, not a picture", "not an image flux-bot can read"),
    "truncated": (encoded(photo(512, 512))[:300], "damaged or cut short"),
    "decompression bomb": (encoded(Image.new("1", (20_000, 20_000))), "far more pixels than the 40 megapixels"),
    "over 40 megapixels": (encoded(Image.new("1", (9_000, 9_000))), "9000x9000 (81 megapixels)"),
    "25 MB": (b"\x89PNG\r\n\x1a\n" + os.urandom(25_000_000), "the image is 25.0 MB; at most 20 MB are accepted"),
    "SVG": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "an SVG"),
    "animated GIF": (animated_gif(), "a GIF is not accepted: use a PNG, JPEG or WebP image"),
    "animated WebP": (animated_webp(), "the WebP is animated: use a still image"),
    "empty": (b"", "the file is empty"),
}


@pytest.fixture
def inputs(tmp_path: Path) -> InputImages:
    return InputImages(tmp_path / "inputs", max_bytes=20_000_000, max_pixels=40_000_000)


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_each_bad_input_is_refused_with_what_is_wrong_and_nothing_stored(inputs: InputImages, kind: str) -> None:
    data, says = BAD_INPUTS[kind]
    with pytest.raises(InvalidRequest) as refused:
        inputs.accept(data)
    assert says in refused.value.problem and refused.value.field == "image"
    assert not inputs.folder.exists() or not any(inputs.folder.iterdir())


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_a_still_image_is_stored_once_by_its_content(inputs: InputImages, kind: str) -> None:
    data = encoded(photo(), kind)
    first, again = inputs.accept(data), inputs.accept(data)
    assert first == again and (first.width, first.height) == (96, 64)
    stored = inputs.read(first.sha256)
    assert hashlib.sha256(stored).hexdigest() == first.sha256
    assert [path.name for path in inputs.folder.iterdir()] == [f"{first.sha256}.png"]


def test_exif_orientation_is_applied_and_metadata_dropped(inputs: InputImages) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCam"  # the camera's make: metadata that must not survive
    data = encoded(photo(96, 64), "JPEG", exif=exif, quality=95)
    stored = inputs.accept(data)
    assert (stored.width, stored.height) == (64, 96)  # upright
    with Image.open(io.BytesIO(inputs.read(stored.sha256))) as cleaned:
        assert cleaned.format == "PNG" and not cleaned.getexif() and "exif" not in cleaned.info
    assert b"SecretCam" not in inputs.read(stored.sha256)


async def test_a_bad_input_reserves_nothing_and_stores_nothing(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    for data, says in BAD_INPUTS.values():
        request = ImageRequest("make it blue", "schnell", task=Task.VARY, input_image=data, strength=0.4)
        with pytest.raises(InvalidRequest) as refused:
            await engine.submit(user(), request)
        assert says in refused.value.problem
    store = await Store.open(engine.database_path)
    try:
        assert await store.jobs() == [] and await store.ledger_totals() == {}
    finally:
        await store.close()
    assert not engine.settings.bot.inputs_dir.exists() or not any(engine.settings.bot.inputs_dir.iterdir())


async def test_an_edit_goes_to_bfl_as_base64_of_the_cleaned_image(make_settings: SettingsFactory) -> None:
    settings = make_settings(bfl={"poll_interval_s": 0.01, "poll_max_interval_s": 0.02})
    async with FakeBfl(pending_polls=1) as bfl:
        backend = BflBackend(settings.bfl.model_copy(update={"api_url": bfl.api_url}), settings.models, API_KEY)
        engine = Engine(
            settings,
            Secrets(bfl_api_key=API_KEY),
            await Store.open(settings.bot.database_path),
            {BackendKind.API: backend},
        )
        await engine.start()
        try:
            request = ImageRequest("make the sky green", "kontext-pro", task=Task.EDIT, input_image=encoded(photo()))
            queued = await engine.submit(user(), request)
            assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
            job = await engine.get_job(queued.job_id)
            assert job.request.input_image is not None and job.request.aspect_ratio == "3:2"  # the input's shape
            cleaned = (settings.bot.inputs_dir / f"{job.request.input_image}.png").read_bytes()
        finally:
            await engine.close()
        [post] = [r for r in bfl.requests if r.method == "POST"]
        assert post.path.endswith("/flux-kontext-pro")
        assert post.body["input_image"] == base64.b64encode(cleaned).decode()
        assert post.body["aspect_ratio"] == "3:2" and "http" not in post.body["input_image"][:10]


async def test_an_image_the_api_cannot_take_stays_on_the_gpu_lane_and_says_why(make_engine: EngineFactory) -> None:
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: api})
    request = ImageRequest("a fox", "dev", task=Task.VARY, input_image=encoded(photo()), strength=0.3, mode=Mode.FAST)
    queued = await engine.submit(user(), request)
    assert queued.route.backend is BackendKind.LOCAL
    assert "FLUX.1 [dev] on the API varies no image" in queued.route.reason


async def test_retention_removes_old_inputs_no_job_needs(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(bot={"keep_images_days": 1})
    store = await Store.open(settings.bot.database_path)
    inputs = InputImages(settings.bot.inputs_dir, max_bytes=20_000_000, max_pixels=40_000_000)
    try:
        old, fresh = inputs.accept(encoded(photo(64, 64))), inputs.accept(encoded(photo(80, 64)))
        two_days_ago = time.time() - 2 * 86_400
        os.utime(inputs.path(old.sha256), (two_days_ago, two_days_ago))
        swept = await Retention(store, settings.bot, time.time, inputs=inputs).sweep()
        assert swept.inputs == 1
        assert not inputs.path(old.sha256).exists() and inputs.path(fresh.sha256).exists()
    finally:
        await store.close()


async def test_an_edit_goes_only_where_an_edit_model_runs_and_the_refusal_says_why(
    make_engine: EngineFactory, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    from engine.backends.factory import IN_HOST
    from engine.backends.pool import GpuPool, Member
    from tests.fakes.tiny_flux import tiny_backend

    settings = make_settings()
    lane = GpuPool([Member(IN_HOST, tiny_backend(tmp_path / "never-started"))], settings.models)
    engine = await make_engine({BackendKind.LOCAL: lane}, settings, dispatch=False)
    request = ImageRequest("make it blue", "kontext-dev", task=Task.EDIT, input_image=encoded(photo()))
    with pytest.raises(BackendUnavailable) as refused:
        await engine.submit(user(), request)
    assert "no GPU worker here runs FLUX.1 Kontext [dev] (its Kontext weights are not set up" in refused.value.reason
