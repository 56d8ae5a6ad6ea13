"""The Discord front-end working from an image: /imagine's image option, /edit, the "Edit with FLUX" message menu and
the result buttons Vary (subtle), Vary (strong) and Edit.

As tests/bot/test_discord.py: the real discord.py client against the fake Discord API, the real engine behind it. The
images come from the fake's CDN route, so each test also proves the bytes were downloaded (and the URL not kept).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot import render
from bot.discord_app import DiscordFrontEnd
from engine.backends.base import Backend
from engine.config import Settings
from engine.models import BackendEvent, BackendJob, BackendKind, Job, JobState, Task
from engine.service import Engine
from tests.bot.test_discord import (
    ALICE,
    EPHEMERAL,
    NOBODY,
    FrontEndFactory,
    allows,
    click,
    command,
    content,
    feed,
    followups,
    imagine,
    interaction,
    wait_delivered,
    wait_followup,
)
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.discord_server import CHANNEL_ID, FakeDiscord, Recorded

IMAGE_OPTION = 11  # Discord's option type for an attachment
MESSAGE_MENU = 3  # Discord's command type for a message context menu
MODAL = 9  # the interaction callback that opens a modal
MODAL_SUBMIT = 5


# The same two fixtures as tests/bot/test_discord.py (pytest fixtures are not shared by importing them).
@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def front_end(fake: FakeDiscord) -> AsyncIterator[FrontEndFactory]:
    started: list[DiscordFrontEnd] = []

    async def build(engine: Engine) -> DiscordFrontEnd:
        app = DiscordFrontEnd(engine, edit_interval_s=0.0)
        await app.client.login("token")
        started.append(app)
        return app

    yield build
    for app in started:
        await app.close()


def both_lanes() -> dict[BackendKind, Backend]:
    """The local lane for schnell and the API lane for Kontext [pro] (the default edit model), both scripted; each
    records the input image it was handed."""
    return {BackendKind.LOCAL: RecordingBackend(), BackendKind.API: RecordingBackend(kind=BackendKind.API)}


class RecordingBackend(ScriptedBackend):
    def __init__(self, kind: BackendKind = BackendKind.LOCAL) -> None:
        super().__init__(kind=kind)
        self.inputs: dict[str, bytes | None] = {}

    def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        self.inputs[job.job_id] = job.input_image
        return super().run(job)


def photo(size: tuple[int, int] = (48, 32)) -> bytes:
    """A PNG with metadata a user would not want passed on (the engine must drop it)."""
    image = Image.new("RGB", size)
    image.putdata([(x * 5 % 256, y * 7 % 256, 90) for y in range(size[1]) for x in range(size[0])])
    info = PngInfo()
    info.add_text("Author", "Alice Example, 12 Home Street")
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def attachment_option(name: str, attachment: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "type": IMAGE_OPTION, "value": attachment["id"]}


def edit_command(attachment: dict[str, Any], instruction: str = "make it night time") -> dict[str, Any]:
    options = [attachment_option("image", attachment), {"name": "instruction", "type": 3, "value": instruction}]
    return command("edit", options, resolved={"attachments": {attachment["id"]: attachment}})


def message_menu(message: dict[str, Any]) -> dict[str, Any]:
    data = {
        "id": "701",
        "name": "Edit with FLUX",
        "type": MESSAGE_MENU,
        "target_id": message["id"],
        "resolved": {"messages": {message["id"]: message}},
    }
    return interaction(2, data)


async def callback_of(fake: FakeDiscord, token: str) -> dict[str, Any]:
    """The interaction's first answer (a defer, a modal or an ephemeral refusal)."""
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{token}/callback")), f"the answer to {token}")
    [answer] = fake.matching("POST", f"{token}/callback")
    return dict(answer.json)


def submit_modal(modal: dict[str, Any], value: str) -> dict[str, Any]:
    """The modal's submit as Discord sends it, with `value` typed into its one text input."""
    [[text_input]] = [row["components"] for row in modal["data"]["components"]]
    row = {"type": 1, "components": [{"type": 4, "custom_id": text_input["custom_id"], "value": value}]}
    return interaction(MODAL_SUBMIT, {"custom_id": modal["data"]["custom_id"], "components": [row]})


async def only_job(engine: Engine, exclude: tuple[str, ...] = ()) -> Job:
    [job] = [job for job in await engine._store.jobs(states=list(JobState)) if job.id not in exclude]
    return job


def cleaned(data: bytes) -> bytes:
    """What the engine keeps of an input: upright, RGB or RGBA, re-saved as PNG with no metadata."""
    with Image.open(io.BytesIO(data)) as image:
        converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        converted.save(out, format="PNG")
        return out.getvalue()


async def stored_input(settings: Settings, job: Job) -> bytes:
    assert job.request.input_image is not None
    return await asyncio.to_thread((settings.bot.inputs_dir / f"{job.request.input_image}.png").read_bytes)


async def assert_input_is_the_cleaned(settings: Settings, job: Job, original: bytes) -> None:
    """The job names its input by the sha256 of the cleaned PNG, which is the file stored: no metadata left."""
    stored = await stored_input(settings, job)
    assert stored == cleaned(original) and hashlib.sha256(stored).hexdigest() == job.request.input_image
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "PNG" and "Author" not in image.info


async def result_image(engine: Engine, job_id: str) -> bytes:
    """The stored result file, parameters in its text chunks and all."""
    path = (await engine.get_job(job_id)).result_path
    assert path is not None
    return await asyncio.to_thread(Path(path).read_bytes)


def the_result(record: Recorded) -> str:
    """The job id under a posted result, from its first button."""
    return str(record.payload["components"][0]["components"][0]["custom_id"].split(":")[2])


async def test_edit_downloads_the_attachment_and_posts_the_edited_image(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = make_settings()
    backends = both_lanes()
    engine = await make_engine(backends, settings)
    app = await front_end(engine)
    original = photo()
    attachment = fake.add_attachment(original, "cat.png", width=48, height=32)
    token = feed(app, edit_command(attachment))
    result = await wait_followup(fake, token)

    assert (await callback_of(fake, token))["type"] == 5  # deferred first, then downloaded
    [download] = fake.cdn_downloads()
    assert download.path == f"/attachments/{CHANNEL_ID}/{attachment['id']}/cat.png"
    job = await only_job(engine)
    assert job.request.task is Task.EDIT and job.request.model == "kontext-pro" and job.backend is BackendKind.API
    assert job.request.prompt == "make it night time" and job.request.aspect_ratio == "3:2"  # the input's own shape
    await assert_input_is_the_cleaned(settings, job, original)
    api = backends[BackendKind.API]
    assert isinstance(api, RecordingBackend) and api.inputs[job.id] == await stored_input(settings, job)
    assert f"<@{ALICE}>" in content(result) and '"make it night time"' in content(result) and result.files
    assert the_result(result) == job.id
    # The signed URL is nowhere in the database: only the image's hash is.
    database = await asyncio.to_thread(settings.bot.database_path.read_bytes)
    assert attachment["url"].encode() not in database and b"/attachments/" not in database
    await wait_delivered(engine)


async def test_imagine_with_an_image_generates_from_it(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = make_settings()
    engine = await make_engine(both_lanes(), settings)
    app = await front_end(engine)
    original = photo()
    attachment = fake.add_attachment(original, "sketch.png")
    options = [*imagine("a castle like this sketch", mode="relax"), attachment_option("image", attachment)]
    token = feed(app, command("imagine", options, resolved={"attachments": {attachment["id"]: attachment}}))
    result = await wait_followup(fake, token)

    job = await only_job(engine)
    assert job.request.task is Task.GENERATE and job.request.model == "schnell" and job.backend is BackendKind.LOCAL
    await assert_input_is_the_cleaned(settings, job, original)
    assert '"a castle like this sketch"' in content(result) and result.files


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-a-restart"])
async def test_edit_with_flux_on_a_message_edits_its_image(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    restart: bool,
) -> None:
    settings = make_settings()
    engine = await make_engine(both_lanes(), settings)
    app = await front_end(engine)
    original = photo((64, 64))
    not_an_image = fake.add_attachment(b"notes", "notes.txt", "text/plain")
    message = fake.add_message("333", [not_an_image, fake.add_attachment(original, "dog.png")])
    image_id = message["attachments"][1]["id"]

    opened = feed(app, message_menu(message))
    modal = await callback_of(fake, opened)
    assert modal["type"] == MODAL
    assert modal["data"]["custom_id"] == f"flux:editmessage:{CHANNEL_ID}:{message['id']}:{image_id}"
    assert fake.cdn_downloads() == []  # nothing is fetched until the user submits
    if restart:
        await app.close()
        await engine.close()
        engine = await make_engine(both_lanes(), settings)
        app = await front_end(engine)
    # The URL the menu was opened with has expired by now: the submit must fetch the message again.
    fake.expire_attachment_urls()

    result = await wait_followup(fake, feed(app, submit_modal(modal, "give it a party hat")))
    assert fake.matching("GET", f"/channels/{CHANNEL_ID}/messages/{message['id']}")
    [download] = fake.cdn_downloads()
    assert download.status == 200 and f"/{image_id}/dog.png" in download.path
    job = await only_job(engine)
    assert job.request.task is Task.EDIT and job.request.prompt == "give it a party hat"
    assert job.requester.user_id == ALICE
    await assert_input_is_the_cleaned(settings, job, original)
    assert '"give it a party hat"' in content(result) and result.files


async def test_edit_with_flux_on_a_message_without_an_image_is_refused_once(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    app = await front_end(await make_engine(both_lanes()))
    message = fake.add_message("333", [fake.add_attachment(b"notes", "notes.txt", "text/plain")], content="hi")
    token = feed(app, message_menu(message))
    answer = await callback_of(fake, token)
    assert answer["type"] == 4 and answer["data"]["flags"] == EPHEMERAL
    assert "that message has no image attached" in answer["data"]["content"]
    assert answer["data"]["allowed_mentions"]["parse"] == []
    await asyncio.sleep(0.05)
    assert len(fake.matching("POST", token, status=None)) == 1 and fake.cdn_downloads() == []


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-a-restart"])
async def test_the_edit_button_asks_for_an_instruction_and_edits_the_result(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    restart: bool,
) -> None:
    settings = make_settings()
    engine = await make_engine(both_lanes(), settings)
    app = await front_end(engine)
    first = the_result(await wait_followup(fake, feed(app, command("imagine", imagine("a red fox")))))
    result_file = await result_image(engine, first)

    opened = feed(app, click(f"flux:edit-image:{first}", "4242"))
    modal = await callback_of(fake, opened)
    assert modal["type"] == MODAL and modal["data"]["custom_id"] == f"flux:editresult:{first}"
    if restart:
        await wait_delivered(engine)
        await app.close()
        await engine.close()
        engine = await make_engine(both_lanes(), settings)
        app = await front_end(engine)

    edited = await wait_followup(fake, feed(app, submit_modal(modal, "make the fox blue")))
    job = await only_job(engine, exclude=(first,))
    assert job.request.task is Task.EDIT and job.request.model == "kontext-pro"
    assert job.request.prompt == "make the fox blue"
    await assert_input_is_the_cleaned(settings, job, result_file)  # the result, without its parameter chunks
    assert '"make the fox blue"' in content(edited) and edited.files


async def test_the_edit_button_of_a_deleted_result_says_so_before_asking(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine(both_lanes())
    app = await front_end(engine)
    job_id = the_result(await wait_followup(fake, feed(app, command("imagine", imagine("a red fox")))))
    feed(app, click(f"flux:delete:{job_id}", "4242"))
    await fake.wait_for(lambda _: bool(fake.matching("DELETE", "/messages/4242", status=204)), "the deletion")

    answer = await callback_of(fake, feed(app, click(f"flux:edit-image:{job_id}", "4242")))
    assert answer["type"] == 4 and answer["data"]["flags"] == EPHEMERAL
    assert f"job {job_id} has no stored image" in answer["data"]["content"]


async def test_the_vary_buttons_submit_variations_at_the_configured_strengths(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = make_settings(images={"vary_subtle_strength": 0.2, "vary_strong_strength": 0.9})
    engine = await make_engine(both_lanes(), settings)
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a red fox", aspect="16:9", steps=3)))
    first = the_result(await wait_followup(fake, token))
    result_file = await result_image(engine, first)

    made: dict[str, float | None] = {}
    # The old single Vary button, on messages posted before there were two, is the subtle variation.
    for custom_id in (f"flux:vary-subtle:{first}", f"flux:vary-strong:{first}", f"flux:vary:{first}"):
        seen = {job.id for job in await engine._store.jobs(states=list(JobState))}
        varied = await wait_followup(fake, feed(app, click(custom_id, "4242", user_id="222")))
        job = await only_job(engine, exclude=tuple(seen))
        assert job.request.task is Task.VARY and job.requester.user_id == "222"
        assert (job.request.prompt, job.request.model, job.request.aspect_ratio, job.request.steps) == (
            "a red fox",
            "schnell",
            "16:9",
            3,
        )
        await assert_input_is_the_cleaned(settings, job, result_file)
        assert '"a red fox"' in content(varied) and the_result(varied) == job.id
        made[custom_id.split(":")[1]] = job.request.strength
    assert made == {"vary-subtle": 0.2, "vary-strong": 0.9, "vary": 0.2}


def png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def truncated_png() -> bytes:
    whole = png(Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)))
    return whole[: len(whole) // 2]


def one_bit_png(side: int) -> bytes:
    """side x side one-bit pixels: kilobytes on the wire, side² pixels once decoded."""
    return png(Image.new("1", (side, side)))


def animated(kind: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    return png(frames[0], format=kind, save_all=True, append_images=frames[1:], duration=100, loop=0)


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
# Past the 20 MB limit; the first bytes of a PNG, so only the size can be what is wrong with it.
HUGE = b"\x89PNG\r\n\x1a\n" + bytes(25_000_000)


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "declared_size", "problem"),
    [
        (b"just some text, no pixels", "notes.txt", "text/plain", None, "that file is not an image flux-bot can read"),
        (truncated_png(), "cut.png", "image/png", None, "the image is damaged or cut short"),
        # Past Pillow's own bomb limit (Image.open refuses it), and past only ours (refused from its header).
        (one_bit_png(20000), "bomb.png", "image/png", None, "the image has far more pixels than the 40 megapixels"),
        (one_bit_png(8000), "big.png", "image/png", None, "the image is 8000x8000 (64 megapixels); at most 40"),
        (HUGE, "huge.png", "image/png", None, "the image is 25.0 MB; at most 20 MB are accepted"),
        # A size Discord under-reports: the download happens, and the engine refuses the bytes in the same words.
        (HUGE, "huge.png", "image/png", 1000, "the image is 25.0 MB; at most 20 MB are accepted"),
        (SVG, "drawing.svg", "image/svg+xml", None, "an SVG drawing is not accepted"),
        (animated("GIF"), "moving.gif", "image/gif", None, "a GIF is not accepted: use a PNG, JPEG or WebP"),
        (animated("PNG"), "moving.png", "image/png", None, "the PNG is animated: use a still image"),
    ],
    ids=[
        "text",
        "truncated-png",
        "decompression-bomb",
        "too-many-pixels",
        "25-mb",
        "25-mb-under-reported",
        "svg",
        "gif",
        "apng",
    ],
)
async def test_a_bad_image_gets_one_clear_message_and_nothing_is_kept(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    data: bytes,
    filename: str,
    content_type: str,
    declared_size: int | None,
    problem: str,
) -> None:
    settings = make_settings()
    engine = await make_engine(both_lanes(), settings)
    app = await front_end(engine)
    attachment = fake.add_attachment(data, filename, content_type, size=declared_size)
    token = feed(app, edit_command(attachment))
    reply = await wait_followup(fake, token)

    assert reply.payload["flags"] == EPHEMERAL and allows(reply) == NOBODY
    text = content(reply)
    assert text.startswith(f"That request can't be made: {problem}") and render.NOT_CHARGED in text
    assert "Traceback" not in text and render.INTERNAL_ERROR not in text
    await asyncio.sleep(0.05)
    assert len(followups(fake, token)) == 1
    assert fake.matching("DELETE", f"{token}/messages/@original", status=None)  # the public placeholder is gone
    # Nothing reserved, nothing stored: no job, no input file; a size Discord reports is refused before downloading.
    assert await engine._store.jobs(states=list(JobState)) == []
    assert not settings.bot.inputs_dir.exists() or not any(settings.bot.inputs_dir.iterdir())
    assert len(fake.cdn_downloads()) == (0 if declared_size is None and len(data) > 20_000_000 else 1)


async def test_an_expired_attachment_url_is_told_not_crashed_on(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine(both_lanes())
    app = await front_end(engine)
    attachment = fake.add_attachment(photo())
    fake.expire_attachment_urls()  # the interaction's URL no longer works by the time the bot fetches it
    reply = await wait_followup(fake, feed(app, edit_command(attachment)))
    assert reply.payload["flags"] == EPHEMERAL
    assert "the image could not be downloaded from Discord: attach it again" in content(reply)
    assert render.NOT_CHARGED in content(reply)
    assert await engine._store.jobs(states=list(JobState)) == []


async def test_edit_with_flux_refuses_an_image_too_large_before_asking(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    app = await front_end(await make_engine(both_lanes()))
    message = fake.add_message("333", [fake.add_attachment(photo(), "huge.png", size=25_000_000)])
    answer = await callback_of(fake, feed(app, message_menu(message)))
    assert answer["type"] == 4 and answer["data"]["flags"] == EPHEMERAL
    assert "the image is 25.0 MB; at most 20 MB are accepted" in answer["data"]["content"]
    assert fake.cdn_downloads() == []


async def test_an_edit_with_flux_submit_naming_another_channel_is_refused(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    """Only ids travel in the modal's custom id; one naming a message elsewhere is not fetched."""
    engine = await make_engine(both_lanes())
    app = await front_end(engine)
    elsewhere = "3999"
    message = fake.add_message("333", [fake.add_attachment(photo(), channel_id=elsewhere)], channel_id=elsewhere)
    forged = {
        "data": {
            "custom_id": f"flux:editmessage:{elsewhere}:{message['id']}:{message['attachments'][0]['id']}",
            "components": [{"type": 1, "components": [{"type": 4, "custom_id": "instruction", "value": "x"}]}],
        }
    }
    answer = await callback_of(fake, feed(app, submit_modal(forged, "make it mine")))
    assert answer["type"] == 4 and answer["data"]["flags"] == EPHEMERAL
    assert "that image is not in this channel" in answer["data"]["content"]
    assert not fake.matching("GET", "/messages/", status=None) and fake.cdn_downloads() == []
    assert await engine._store.jobs(states=list(JobState)) == []
