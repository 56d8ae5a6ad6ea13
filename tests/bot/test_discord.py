"""The Discord front-end: the real discord.py client against the fake Discord HTTP API, the real engine behind it.

Interactions are fed as the raw payloads Discord sends; what the bot did is read from the fake's request log.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import discord
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from bot.commands import Commands
from bot.delivery import ThrottledEditor
from bot.discord_app import DiscordFrontEnd
from engine.config import Settings
from engine.models import (
    BFL_GUIDANCE_MAX,
    BFL_GUIDANCE_MIN,
    BFL_STEPS_MAX,
    BFL_STEPS_MIN,
    MAX_SEED,
    BackendJob,
    BackendKind,
    FailureReason,
    Finished,
    ImageRequest,
    JobDone,
    JobState,
    Mode,
    Platform,
    Progress,
    Requester,
    Task,
)
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend, fail, tiny_png
from tests.fakes.discord_server import (
    APP_ID,
    CHANNEL_ID,
    GUILD_ID,
    MANAGE_GUILD,
    FakeDiscord,
    Recorded,
    bot_message,
    interaction_payload,
)

ALICE, BOB, ROLE = "111", "222", "555"
EPHEMERAL = 64

FrontEndFactory = Callable[[Engine], Awaitable[DiscordFrontEnd]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def front_end(fake: FakeDiscord) -> AsyncIterator[FrontEndFactory]:
    started: list[DiscordFrontEnd] = []

    async def build(engine: Engine) -> DiscordFrontEnd:
        app = DiscordFrontEnd(engine, edit_interval_s=0.0)
        await app.client.login("token")  # REST only: no gateway, interactions are fed by the test
        started.append(app)
        return app

    yield build
    for app in started:
        await app.close()


def interaction(kind: int, data: dict[str, Any], *, user_id: str = ALICE, **kwargs: Any) -> dict[str, Any]:
    return interaction_payload(kind, data, user_id=user_id, **kwargs)


def command(name: str, options: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "700", "name": name, "type": 1, "options": options}
    if "resolved" in kwargs:
        data["resolved"] = kwargs.pop("resolved")
    return interaction(2, data, **kwargs)


def imagine(prompt: str, **options: Any) -> list[dict[str, Any]]:
    kinds = {str: 3, int: 4, float: 10}
    return [{"name": "prompt", "type": 3, "value": prompt}] + [
        {"name": k, "type": kinds[type(v)], "value": v} for k, v in options.items()
    ]


def click(custom_id: str, message_id: str, **kwargs: Any) -> dict[str, Any]:
    """A button press on a result message carrying our buttons (Discord sends the message with it)."""
    row = {"type": 1, "components": [{"type": 2, "style": 2, "label": "x", "custom_id": custom_id}]}
    message = bot_message(message_id, CHANNEL_ID, components=[row])
    return interaction(3, {"custom_id": custom_id, "component_type": 2}, message=message, **kwargs)


def feed(app: DiscordFrontEnd, payload: dict[str, Any]) -> str:
    app.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
    return str(payload["token"])


def of_token(fake: FakeDiscord, token: str) -> list[Recorded]:
    return [r for r in fake.requests if f"/{token}" in r.path]


def followups(fake: FakeDiscord, token: str) -> list[Recorded]:
    return [r for r in of_token(fake, token) if r.method == "POST" and r.path.endswith(token) and r.status == 200]


async def wait_followup(fake: FakeDiscord, token: str) -> Recorded:
    await fake.wait_for(lambda _: bool(followups(fake, token)), f"a followup on {token}")
    return followups(fake, token)[-1]


def content(record: Recorded) -> str:
    return str(record.payload.get("content") or "")


async def wait_delivered(engine: Engine) -> None:
    """Delivery is recorded after Discord answers the post, so poll (bounded) for it."""
    for _ in range(1000):
        if not await engine.undelivered():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("results were never marked delivered")


def noise_png(size: int = 256) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(out, format="PNG")
    return out.getvalue()


async def test_imagine_defers_then_edits_then_posts_the_image(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(gate=gate)})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a red cat", seed=7, aspect="16:9", mode="relax")))
    await fake.wait_for(lambda _: any("1/3" in content(r) for r in fake.matching("PATCH", token)), "a progress edit")
    gate.set()
    result = await wait_followup(fake, token)

    seen = of_token(fake, token)
    assert seen[0].method == "POST" and seen[0].path.endswith("/callback") and seen[0].json["type"] == 5
    edits = [r for r in seen if r.method == "PATCH" and r.path.endswith("/messages/@original")]
    assert content(edits[0]).startswith("Job j") and "FLUX.1 [schnell] on the local GPU" in content(edits[0])
    assert "[" in content(edits[1]) and "1/3" in content(edits[1])
    assert seen.index(edits[-1]) < seen.index(result)
    assert "done on local" in content(edits[-1])

    assert f"<@{ALICE}>" in content(result) and '"a red cat"' in content(result) and "seed 7" in content(result)
    [file] = result.files
    with Image.open(io.BytesIO(file.data)) as image:
        assert isinstance(image, PngImageFile) and image.text["prompt"] == "a red cat" and image.text["seed"] == "7"
    rows = [[c["custom_id"] for c in row["components"]] for row in result.payload["components"]]
    job_id = rows[0][0].split(":")[2]
    # New images from this one, then the buttons that change or remove it (Discord allows five a row).
    assert rows == [
        [f"flux:{a}:{job_id}" for a in ("reroll", "vary-subtle", "vary-strong")],
        [f"flux:{a}:{job_id}" for a in ("edit-image", "edit", "delete")],
    ]
    job = await engine.get_job(job_id)
    assert (job.request.width, job.request.height) == (1344, 768)
    await wait_delivered(engine)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"steps": 99}, "steps must be between 1 and 8"),
        ({"model": "dev", "guidance": 9.5}, "guidance must be between"),
        ({"model": "flux-9000"}, "unknown model"),
    ],
)
async def test_bad_options_get_an_ephemeral_error_and_store_nothing(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord, options: dict[str, Any], problem: str
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a red cat", **options)))
    reply = await wait_followup(fake, token)
    assert reply.payload["flags"] == EPHEMERAL and problem in content(reply) and "not charged" in content(reply)
    assert fake.matching("DELETE", f"{token}/messages/@original", status=None)  # the public placeholder is gone
    assert await engine._store.jobs(states=list(JobState)) == []


async def test_a_failed_job_is_told_ephemerally_never_as_a_traceback(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    backend = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.MODERATED, retryable=False))
    engine = await make_engine({BackendKind.LOCAL: backend})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a forbidden cat")))
    reply = await wait_followup(fake, token)
    assert reply.payload["flags"] == EPHEMERAL and not reply.files
    assert "safety filter" in content(reply) and "not charged" in content(reply)
    assert fake.matching("DELETE", f"{token}/messages/@original", status=None)
    await wait_delivered(engine)


async def test_progress_edits_carry_the_preview(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    preview = tiny_png((10, 200, 10))
    backend = ScriptedBackend(gate=gate, plan=lambda job, attempt: [Progress(1, 2, preview)])
    engine = await make_engine({BackendKind.LOCAL: backend})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a green cat")))
    await fake.wait_for(lambda _: any(r.files for r in fake.matching("PATCH", token)), "an edit with the preview")
    [edit] = [r for r in fake.matching("PATCH", token) if r.files]
    assert "1/2" in content(edit) and edit.files[0].filename == "preview.png" and edit.files[0].data == preview
    gate.set()  # the script ends without a result: the engine fails the job, and the user is told
    assert "not charged" in content(await wait_followup(fake, token))


async def test_the_queued_note_follows_the_queue(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    local = ScriptedBackend(gate=gate)
    engine = await make_engine({BackendKind.LOCAL: local})
    app = await front_end(engine)
    bob = user("bob")
    running = await engine.submit(bob, ImageRequest("a dog", "schnell", mode=Mode.RELAX))
    while running.job_id not in local.started:
        await asyncio.sleep(0.01)
    ahead = await engine.submit(user("carol"), ImageRequest("a cow", "schnell", mode=Mode.RELAX))
    token = feed(app, command("imagine", imagine("a red cat", mode="relax")))

    def notes() -> list[str]:
        return [content(r) for r in fake.matching("PATCH", f"{token}/messages/@original")]

    await fake.wait_for(lambda _: any("position 2 in the queue" in note for note in notes()), "the queued note")
    assert "Why: local (relax mode)" in notes()[0]
    await engine.cancel(bob, running.job_id)  # the queue moves: Carol's job starts, Alice's is next
    await fake.wait_for(lambda _: any("next in line" in note for note in notes()), "the note's update")
    [moved] = [note for note in notes() if "next in line" in note]
    assert moved.startswith("Job j") and ", ETA " in moved and "Why:" not in moved  # the old wait is not repeated
    gate.set()
    assert isinstance(await wait_terminal(engine, ahead.job_id), JobDone)
    await wait_followup(fake, token)


def _quota_show(user_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    user = {"id": user_id, "username": "bob", "discriminator": "0", "global_name": None, "avatar": None}
    show = {"name": "show", "type": 1, "options": [{"name": "user", "type": 6, "value": user_id}]}
    return [{"name": "quota", "type": 2, "options": [show]}], {"users": {user_id: user}}


@pytest.mark.parametrize(
    ("config", "roles", "permissions", "allowed"),
    [
        ({}, (), 0, False),
        ({"admins": {"user_ids": [ALICE]}}, (), 0, True),
        ({"admins": {"role_ids": [ROLE]}}, (ROLE,), 0, True),
        ({}, (), MANAGE_GUILD, True),
    ],
    ids=["refused", "by-user-id", "by-role-id", "by-manage-server"],
)
async def test_admin_commands_checked_at_run_time(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    config: dict[str, Any],
    roles: tuple[str, ...],
    permissions: int,
    allowed: bool,
) -> None:
    engine = await make_engine({}, make_settings(**config))
    app = await front_end(engine)
    options, resolved = _quota_show(BOB)
    token = feed(app, command("admin", options, resolved=resolved, roles=roles, permissions=permissions))
    reply = await wait_followup(fake, token)
    assert reply.payload["flags"] == EPHEMERAL
    if allowed:
        assert content(reply).startswith(f"Quota for discord:{BOB}")
    else:
        assert content(reply) == "You can't do that: only admins can do this."


async def test_user_commands_answer_ephemerally(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    answers = {}
    for name, options in [
        ("settings", [{"name": "name", "type": 3, "value": "aspect"}, {"name": "value", "type": 3, "value": "3:2"}]),
        ("quota", []),
        ("queue", []),
        ("job", [{"name": "id", "type": 3, "value": "jnope"}]),
        ("cancel", [{"name": "job", "type": 3, "value": "jnope"}]),
    ]:
        token = feed(app, command(name, options))
        reply = await wait_followup(fake, token)
        assert reply.payload["flags"] == EPHEMERAL
        answers[name] = content(reply)
    assert answers["settings"] == "Your defaults: aspect=3:2"
    assert answers["quota"].startswith(f"Quota for discord:{ALICE}")
    assert "You have no jobs waiting or running." in answers["queue"]
    assert answers["job"].startswith("No job 'jnope'") and answers["cancel"].startswith("No job 'jnope'")


async def test_a_result_after_the_token_expired_goes_to_the_channel(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(gate=gate)})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a slow cat")))
    await fake.wait_for(lambda _: bool(fake.matching("PATCH", token)), "the queued edit")
    fake.expired_tokens.add(token)
    gate.set()
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")), "a channel post")
    [post] = fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")
    assert content(post).startswith(f"<@{ALICE}> ") and '"a slow cat"' in content(post)
    assert post.files and post.files[0].data.startswith(b"\x89PNG")
    assert fake.matching("POST", token, status=401) or fake.matching("PATCH", token, status=401)
    await wait_delivered(engine)


async def test_an_interaction_older_than_the_token_is_not_used_for_the_result(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    old = discord.utils.utcnow() - timedelta(minutes=20)
    token = feed(app, command("imagine", imagine("an old cat"), created=old))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")), "a channel post")
    assert followups(fake, token) == []


async def test_a_rate_limited_edit_is_retried_not_lost(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    fake.rate_limit_next.add("PATCH")
    token = feed(app, command("imagine", imagine("a busy cat")))
    await wait_followup(fake, token)
    [limited] = fake.matching("PATCH", token, status=429)
    retried = fake.matching("PATCH", token)
    assert content(retried[0]) == content(limited) and content(limited).startswith("Job j")


async def test_an_oversized_image_is_re_encoded_under_the_limit(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    big = noise_png()
    limit = 20_000
    assert len(big) > limit

    def plan(job: BackendJob, attempt: int) -> list[Any]:
        return [Finished(big, "image/png", job.request.seed)]

    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(plan=plan)})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a noisy cat"), size_limit=limit))
    [file] = (await wait_followup(fake, token)).files
    assert len(file.data) <= limit and file.filename is not None and file.filename.endswith(".jpg")
    with Image.open(io.BytesIO(file.data)) as image:
        assert image.format == "JPEG" and b"prompt: a noisy cat" in image.info["comment"]


async def _first_result(fake: FakeDiscord, app: DiscordFrontEnd, prompt: str) -> tuple[str, str]:
    """Run one /imagine to its result; returns the job id and the result message id."""
    token = feed(app, command("imagine", imagine(prompt)))
    result = await wait_followup(fake, token)
    job_id = result.payload["components"][0]["components"][0]["custom_id"].split(":")[2]
    return job_id, "4242"


async def test_buttons_reroll_vary_and_delete(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    job_id, message_id = await _first_result(fake, app, "a red fox")
    first = await engine.get_job(job_id)

    reroll = await wait_followup(fake, feed(app, click(f"flux:reroll:{job_id}", message_id, user_id=BOB)))
    vary = await wait_followup(fake, feed(app, click(f"flux:vary-subtle:{job_id}", message_id)))
    jobs = {job.id: job for job in await engine._store.jobs(states=[JobState.DONE])}
    assert len(jobs) == 3 and {j.request.prompt for j in jobs.values()} == {"a red fox"}
    rerolled = next(j for j in jobs.values() if j.requester.user_id == BOB)
    assert f"<@{BOB}>" in content(reroll) and rerolled.request.steps == first.request.steps
    assert rerolled.request.task is Task.GENERATE and rerolled.request.input_image is None
    # Vary starts from the result's own image (tests/bot/test_discord_images.py follows that image).
    varied = next(j for j in jobs.values() if j.id not in (job_id, rerolled.id))
    assert varied.request.task is Task.VARY and varied.request.input_image is not None
    assert f"(job {varied.id})" in content(vary)

    refused = feed(app, click(f"flux:delete:{job_id}", message_id, user_id=BOB))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{refused}/callback")), "the refusal")
    [answer] = fake.matching("POST", f"{refused}/callback")
    assert answer.json["type"] == 4 and answer.json["data"]["flags"] == EPHEMERAL
    assert "can't do that" in answer.json["data"]["content"]
    assert not fake.matching("DELETE", f"/channels/{CHANNEL_ID}/messages/{message_id}", status=None)

    feed(app, click(f"flux:delete:{job_id}", message_id))
    path = f"/channels/{CHANNEL_ID}/messages/{message_id}"
    await fake.wait_for(lambda _: bool(fake.matching("DELETE", path, status=204)), "the deletion")


async def test_edit_prompt_opens_a_modal_and_keeps_the_seed(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    job_id, message_id = await _first_result(fake, app, "a red fox")
    result = await _edit_prompt(fake, app, job_id, message_id, "a red fox", "a blue fox")
    seed = (await engine.get_job(job_id)).request.seed
    assert '"a blue fox"' in content(result) and f"seed {seed}," in content(result)


async def _edit_prompt(
    fake: FakeDiscord, app: DiscordFrontEnd, job_id: str, message_id: str, old: str, new: str
) -> Recorded:
    """Press Edit prompt, check the modal shows the old prompt, submit the new one; returns the result followup."""
    opened = feed(app, click(f"flux:edit:{job_id}", message_id))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{opened}/callback")), "the modal")
    [modal] = fake.matching("POST", f"{opened}/callback")
    assert modal.json["type"] == 9
    [[text_input]] = [row["components"] for row in modal.json["data"]["components"]]
    assert text_input["value"] == old
    submitted = {
        "custom_id": modal.json["data"]["custom_id"],
        "components": [{"type": 1, "components": [{**text_input, "value": new}]}],
    }
    return await wait_followup(fake, feed(app, interaction(5, submitted)))


async def test_buttons_and_results_survive_a_restart(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings: Settings = make_settings()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    job_id, message_id = await _first_result(fake, app, "a red fox")
    await wait_delivered(engine)
    # A job that ends while no Discord client is attached is delivered to its channel at the next start.
    await app.close()
    alice = Requester(Platform.DISCORD, ALICE, guild_id=GUILD_ID, channel_id=CHANNEL_ID)
    queued = await Commands(engine).imagine(alice, "a lonely fox", {})
    await wait_terminal(engine, queued.job_id)
    await engine.close()

    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")), "the backlog")
    [post] = fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")
    assert content(post).startswith(f"<@{ALICE}> ") and '"a lonely fox"' in content(post) and post.files
    await wait_delivered(engine)

    # Every button of the old message, handled by the new client from its custom id alone.
    seed = (await engine.get_job(job_id)).request.seed
    reroll = await wait_followup(fake, feed(app, click(f"flux:reroll:{job_id}", message_id)))
    assert '"a red fox"' in content(reroll)
    # The single Vary button of results posted before there were two: the subtle variation.
    vary = await wait_followup(fake, feed(app, click(f"flux:vary:{job_id}", message_id)))
    assert '"a red fox"' in content(vary)
    [varied] = [job for job in await engine._store.jobs(states=list(JobState)) if job.request.task is Task.VARY]
    assert varied.request.strength == settings.images.vary_subtle_strength
    edited = await _edit_prompt(fake, app, job_id, message_id, "a red fox", "a red wolf")
    assert '"a red wolf"' in content(edited) and f"seed {seed}," in content(edited)
    refused = feed(app, click(f"flux:delete:{job_id}", message_id, user_id=BOB))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{refused}/callback")), "the refusal")
    assert "can't do that" in fake.matching("POST", f"{refused}/callback")[0].json["data"]["content"]
    feed(app, click(f"flux:delete:{job_id}", message_id))
    path = f"/channels/{CHANNEL_ID}/messages/{message_id}"
    await fake.wait_for(lambda _: bool(fake.matching("DELETE", path, status=204)), "the deletion")


@pytest.mark.parametrize("guild", [int(GUILD_ID), None])
async def test_sync_commands_guild_or_global(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord, guild: int | None
) -> None:
    app = await front_end(await make_engine({}))
    synced = await app.sync_commands(guild)
    path = f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands" if guild else f"/applications/{APP_ID}/commands"
    [put] = [r for r in fake.requests if r.method == "PUT"]
    assert put.path.endswith(path)
    assert {c.name for c in synced} == {
        "imagine",
        "edit",
        "Edit with FLUX",
        "quota",
        "queue",
        "cancel",
        "job",
        "settings",
        "styles",
        "admin",
    }
    commands = {c["name"]: c for c in put.json}
    assert commands["Edit with FLUX"]["type"] == 3  # a message context menu: no description, no options
    edit_options = {o["name"]: o for o in commands["edit"]["options"]}
    assert (edit_options["image"]["type"], edit_options["image"]["required"]) == (11, True)
    assert (edit_options["instruction"]["type"], edit_options["instruction"]["required"]) == (3, True)
    options = {o["name"]: o for o in commands["imagine"]["options"]}
    assert all(o["description"] for o in options.values())
    assert options["image"]["type"] == 11 and not options["image"].get("required")
    assert options["style"]["autocomplete"] is True and not options["style"].get("required")
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (BFL_STEPS_MIN, BFL_STEPS_MAX)
    assert (options["guidance"]["min_value"], options["guidance"]["max_value"]) == (BFL_GUIDANCE_MIN, BFL_GUIDANCE_MAX)
    assert (options["seed"]["min_value"], options["seed"]["max_value"]) == (0, MAX_SEED)
    # The edit models too: /imagine with an image and an edit model edits that image.
    assert [c["value"] for c in options["model"]["choices"]] == [
        "schnell",
        "dev",
        "pro",
        "ultra",
        "kontext-pro",
        "kontext-max",
        "kontext-dev",
    ]
    assert len(options["aspect"]["choices"]) == 8


async def test_progress_edits_are_throttled_but_the_latest_is_always_sent() -> None:
    sent: list[str] = []

    async def send(text: str, preview: bytes | None) -> None:
        sent.append(text)

    editor = ThrottledEditor(send, interval_s=0.05)
    editor.update("1/4", None)
    for _ in range(1000):
        if sent:
            break
        await asyncio.sleep(0.001)
    editor.update("2/4", None)
    editor.update("3/4", None)
    for _ in range(1000):
        if len(sent) == 2:
            break
        await asyncio.sleep(0.01)
    await editor.close()
    assert sent == ["1/4", "3/4"]


async def test_admin_report_arrives_as_an_ephemeral_chart(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    app = await front_end(await make_engine({}))
    report = [{"name": "report", "type": 1, "options": []}]
    refused = await wait_followup(fake, feed(app, command("admin", report)))
    assert content(refused) == "You can't do that: only admins can do this." and not refused.files

    reply = await wait_followup(fake, feed(app, command("admin", report, permissions=MANAGE_GUILD)))
    assert reply.payload["flags"] == EPHEMERAL and content(reply).startswith("flux-bot, last 30 days:")
    [chart] = reply.files
    assert chart.filename is not None and chart.filename.startswith("flux-bot-report-")
    with Image.open(io.BytesIO(chart.data)) as image:
        assert image.format == "PNG" and image.size == (1200, 800)


async def test_alerts_are_posted_to_the_admin_channel(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    admin_channel = "3999"
    settings = make_settings(
        ops={"alert_discord_channel_id": admin_channel, "failure_alert_rate": 0.5, "failure_alert_min_jobs": 1}
    )
    backend = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.BAD_REQUEST, retryable=False))
    engine = await make_engine({BackendKind.LOCAL: backend}, settings)
    await front_end(engine)
    alice = Requester(Platform.DISCORD, ALICE, guild_id=GUILD_ID, channel_id=CHANNEL_ID)
    await Commands(engine).imagine(alice, "a doomed cat", {})
    path = f"/channels/{admin_channel}/messages"
    await fake.wait_for(lambda _: bool(fake.matching("POST", path)), "the alert")
    [alert] = fake.matching("POST", path)
    assert content(alert).startswith("flux-bot alert: 1 of the 1 jobs that ended in the last hour failed (100%")
    assert alert.payload["allowed_mentions"]["parse"] == []


# A prompt full of what would ping people or format the message if it were sent as markup.
REAL_ID = "123456789012345678"
NOISY = f"@everyone @here <@{REAL_ID}> <@&{REAL_ID}> <@123> **bold** __u__ `code` ||spoiler|| <!channel> a & b <c>"
NOBODY: tuple[str, ...] = ()


def allows(record: Recorded) -> tuple[str, ...] | None:
    """Whom the message may notify: the user ids allowed, or None when the message sets no allowed_mentions
    (then Discord notifies everyone it mentions). 'everyone' or 'roles' in the answer means a group may be pinged."""
    allowed = (record.json or {}).get("data", record.payload).get("allowed_mentions")
    if allowed is None:
        return None
    groups = tuple(kind for kind in allowed.get("parse", []) if kind in ("everyone", "roles", "users"))
    return groups + tuple(str(user) for user in allowed.get("users", [])) + tuple(allowed.get("roles", []))


def only(user_id: str) -> tuple[str, ...]:
    return (user_id,)


def shown_literally(text: str) -> bool:
    """The noisy prompt as Discord shows it: every markdown character escaped, no mention left whole."""
    return (
        "\\*\\*bold\\*\\*" in text
        and "\\_\\_u\\_\\_" in text
        and "\\`code\\`" in text
        and "\\|\\|spoiler\\|\\|" in text
        and "@\u200beveryone" in text
        and "@\u200bhere" in text
        and f"<@\u200b{REAL_ID}>" in text
        and f"<@\u200b&{REAL_ID}>" in text
    )


async def test_a_prompt_pings_nobody_and_formats_nothing_on_any_path(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(gate=gate)})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine(NOISY)))
    await fake.wait_for(lambda _: any("1/3" in content(r) for r in fake.matching("PATCH", token)), "a progress edit")

    # /queue and /job while it runs: the prompt is shown literally, nobody may be pinged.
    queue = await wait_followup(fake, feed(app, command("queue", [])))
    [job] = await engine._store.jobs(states=[JobState.RUNNING])
    assert job.request.prompt == NOISY
    job_answer = await wait_followup(fake, feed(app, command("job", [{"name": "id", "type": 3, "value": job.id}])))
    for answer in (queue, job_answer):
        assert allows(answer) == NOBODY and answer.payload["flags"] == EPHEMERAL
    assert shown_literally(content(job_answer))
    assert f"@\u200beveryone @\u200bhere <@\u200b{REAL_ID}>" in content(queue)  # its first 60 characters

    gate.set()
    result = await wait_followup(fake, token)
    edits = [r for r in fake.matching("PATCH", f"{token}/messages/@original")]
    assert edits and all(allows(edit) == NOBODY for edit in edits)
    assert allows(result) == only(ALICE) and content(result).startswith(f"<@{ALICE}> ")
    assert shown_literally(content(result))
    with Image.open(io.BytesIO(result.files[0].data)) as image:
        assert image.text["prompt"] == NOISY  # the file keeps the words as typed

    # An error that echoes what the user typed.
    refused = await wait_followup(fake, feed(app, command("imagine", imagine("a cat", model="**x** @everyone"))))
    assert allows(refused) == NOBODY
    assert "unknown model '\\*\\*x\\*\\* @\u200beveryone'" in content(refused)


async def test_channel_deliveries_allow_only_the_requester(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    gate = asyncio.Event()
    backend = ScriptedBackend(gate=gate)
    engine = await make_engine({BackendKind.LOCAL: backend})
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine(NOISY)))
    await fake.wait_for(lambda _: bool(fake.matching("PATCH", token)), "the queued edit")
    fake.expired_tokens.add(token)  # past the token's 14 minutes: the result goes to the channel
    gate.set()
    path = f"/channels/{CHANNEL_ID}/messages"
    await fake.wait_for(lambda _: bool(fake.matching("POST", path)), "a channel post")
    [post] = fake.matching("POST", path)
    assert allows(post) == only(ALICE) and content(post).startswith(f"<@{ALICE}> ") and shown_literally(content(post))

    # A failure that ends while no client is attached (a restart): told in the channel, the same way.
    await wait_delivered(engine)
    await app.close()
    backend.plan = lambda job, attempt: fail(FailureReason.BAD_REQUEST, retryable=False)
    alice = Requester(Platform.DISCORD, ALICE, guild_id=GUILD_ID, channel_id=CHANNEL_ID)
    queued = await Commands(engine).imagine(alice, NOISY, {})
    await wait_terminal(engine, queued.job_id)
    await front_end(engine)
    await fake.wait_for(lambda _: len(fake.matching("POST", path)) == 2, "the backlog's channel post")
    failed = fake.matching("POST", path)[1]
    assert allows(failed) == only(ALICE) and f"Job {queued.job_id} failed" in content(failed)


async def test_a_refused_delete_pings_nobody(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    job_id, message_id = await _first_result(fake, app, "a red fox")
    refused = feed(app, click(f"flux:delete:{job_id}", message_id, user_id=BOB))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{refused}/callback")), "the refusal")
    [answer] = fake.matching("POST", f"{refused}/callback")
    assert allows(answer) == NOBODY


async def test_an_edit_prompt_modal_opened_before_a_restart_is_handled_after_it(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings: Settings = make_settings()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a red fox", seed=7, aspect="16:9", steps=3)))
    result = await wait_followup(fake, token)
    job_id = result.payload["components"][0]["components"][0]["custom_id"].split(":")[2]
    opened = feed(app, click(f"flux:edit:{job_id}", "4242"))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{opened}/callback")), "the modal")
    [modal] = fake.matching("POST", f"{opened}/callback")
    await wait_delivered(engine)
    await app.close()
    await engine.close()

    # The user submits the modal to a new process: nothing of the first one remains but the database.
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    [[text_input]] = [row["components"] for row in modal.json["data"]["components"]]
    submitted = {
        "custom_id": modal.json["data"]["custom_id"],
        "components": [
            {"type": 1, "components": [{"type": 4, "custom_id": text_input["custom_id"], "value": "a red wolf"}]}
        ],
    }
    edited = await wait_followup(fake, feed(app, interaction(5, submitted)))
    assert '"a red wolf"' in content(edited) and "seed 7," in content(edited)
    old = await engine.get_job(job_id)
    [new] = [job for job in await engine._store.jobs(states=list(JobState)) if job.id != job_id]
    assert new.request.prompt == "a red wolf"
    assert new.request == replace(old.request, prompt="a red wolf")


async def test_delete_removes_the_stored_image_too(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    job_id, message_id = await _first_result(fake, app, "a red fox")
    stored = str((await engine.get_job(job_id)).result_path)
    assert await asyncio.to_thread(os.path.isfile, stored)

    refused = feed(app, click(f"flux:delete:{job_id}", message_id, user_id=BOB))
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{refused}/callback")), "the refusal")
    assert await asyncio.to_thread(os.path.isfile, stored)  # someone else's Delete changes nothing

    feed(app, click(f"flux:delete:{job_id}", message_id))
    path = f"/channels/{CHANNEL_ID}/messages/{message_id}"
    await fake.wait_for(lambda _: bool(fake.matching("DELETE", path, status=204)), "the deletion")
    assert not await asyncio.to_thread(os.path.isfile, stored)
    job = await engine.get_job(job_id)
    assert job.state is JobState.DONE and job.result_path is None
    [audit] = await engine._store.audit_log("image.removed")
    assert audit["job_id"] == job_id and audit["actor"] == f"discord:{ALICE}"


async def test_guidance_is_refused_for_schnell_and_stored_as_used_for_dev(
    make_engine: EngineFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    reply = await wait_followup(fake, feed(app, command("imagine", imagine("a red cat", guidance=3.0))))
    assert reply.payload["flags"] == EPHEMERAL and "FLUX.1 [schnell] takes no guidance value" in content(reply)
    assert await engine._store.jobs(states=list(JobState)) == []
    await wait_followup(fake, feed(app, command("imagine", imagine("a red cat", model="dev", guidance=4.5))))
    [job] = await engine._store.jobs(states=list(JobState))
    assert job.request.guidance == 4.5 and "guidance 4.5" in await Commands(engine).job(job.requester, job.id)
