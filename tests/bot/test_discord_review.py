"""The review step on Discord: a held image goes to the admins' review channel as a spoiler with Approve, Reject
and Reject and ban; its requester is told it is held; the buttons are for admins only and survive a restart.

The real discord.py client against the fake Discord HTTP API, the real engine behind it (as tests/bot/test_discord.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from engine.config import Secrets, Settings
from engine.errors import NotAllowed
from engine.models import BackendKind, ImageRequest, JobDone, JobState, Mode, Platform, Requester, Review
from engine.service import Engine
from tests.bot.test_discord import (
    ALICE,
    BOB,
    EPHEMERAL,
    FrontEndFactory,
    command,
    content,
    fake,
    feed,
    front_end,
    imagine,
    interaction,
    wait_delivered,
    wait_followup,
)
from tests.conftest import EngineFactory, SettingsFactory, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.discord_server import CHANNEL_ID, GUILD_ID, MANAGE_GUILD, FakeDiscord, Recorded, bot_message

__all__ = ["fake", "front_end"]  # the fixtures, used by name

REVIEW_CHANNEL = "3998"
REVIEW_MESSAGE = "4343"


def review_settings(make_settings: SettingsFactory, **review: Any) -> Settings:
    return make_settings(review={"phrases": ["Mario"], "discord_channel_id": REVIEW_CHANNEL, **review})


def press(custom_id: str, *, user_id: str, admin: bool) -> dict[str, Any]:
    """A button press on the review message in the review channel."""
    row = {"type": 1, "components": [{"type": 2, "style": 2, "label": "x", "custom_id": custom_id}]}
    message = bot_message(REVIEW_MESSAGE, REVIEW_CHANNEL, components=[row])
    payload = interaction(
        3,
        {"custom_id": custom_id, "component_type": 2},
        user_id=user_id,
        permissions=MANAGE_GUILD if admin else 0,
        message=message,
    )
    payload["channel_id"] = REVIEW_CHANNEL
    payload["channel"] = {**payload["channel"], "id": REVIEW_CHANNEL, "name": "review"}
    return payload


def posts_to(fake: FakeDiscord, channel_id: str) -> list[Recorded]:
    return fake.matching("POST", f"/channels/{channel_id}/messages")


async def review_post(fake: FakeDiscord) -> Recorded:
    await fake.wait_for(lambda _: bool(posts_to(fake, REVIEW_CHANNEL)), "the review post")
    [post] = posts_to(fake, REVIEW_CHANNEL)
    return post


async def callback(fake: FakeDiscord, token: str) -> Recorded:
    await fake.wait_for(lambda _: bool(fake.matching("POST", f"{token}/callback")), "the answer to the press")
    [answer] = fake.matching("POST", f"{token}/callback")
    return answer


async def review_edit(fake: FakeDiscord, token: str) -> Recorded:
    path = f"{token}/messages/@original"
    await fake.wait_for(lambda _: bool(fake.matching("PATCH", path)), "the review message's edit")
    return fake.matching("PATCH", path)[-1]


async def held_job(fake: FakeDiscord, app: Any, prompt: str = "Super Mario in a hat") -> tuple[str, Recorded]:
    """An /imagine that is held: returns the job id and the requester's notice."""
    token = feed(app, command("imagine", imagine(prompt)))
    notice = await wait_followup(fake, token)
    post = await review_post(fake)
    job_id = post.payload["components"][0]["components"][0]["custom_id"].split(":")[2]
    return job_id, notice


async def test_a_held_image_goes_only_to_the_review_channel_and_its_requester_is_told(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, review_settings(make_settings))
    app = await front_end(engine)
    job_id, notice = await held_job(fake, app, "Super **Mario** @everyone")
    await wait_delivered(engine)

    # The requester: an ephemeral notice that it is held and what it cost, no image.
    assert notice.payload["flags"] == EPHEMERAL and not notice.files
    assert f"Job {job_id} is held for review" in content(notice) and "GPU time" in content(notice)

    post = await review_post(fake)
    [file] = post.files
    assert file.filename is not None and file.filename.startswith("SPOILER_")
    assert file.data == await engine.held_image(Requester(Platform.DISCORD, "x", is_admin=True), job_id)
    text = content(post)
    assert f"job {job_id}" in text and f"discord:{ALICE}" in text and f"<@{ALICE}>" not in text
    assert "\\*\\*Mario\\*\\*" in text and "@\u200beveryone" in text and "phrase 'Mario'" in text
    assert post.payload["allowed_mentions"]["parse"] == []
    [row] = post.payload["components"]
    assert [c["custom_id"] for c in row["components"]] == [
        f"flux:review-{action}:{job_id}" for action in ("approve", "reject", "ban")
    ]
    # Nowhere else gets the image.
    assert not posts_to(fake, CHANNEL_ID)
    assert [r for r in fake.requests if r.files and REVIEW_CHANNEL not in r.path] == []

    # A non-admin's press: one ephemeral refusal, nothing changes.
    for action in ("approve", "reject", "ban"):
        token = feed(app, press(f"flux:review-{action}:{job_id}", user_id=BOB, admin=False))
        answer = await callback(fake, token)
        assert answer.json["type"] == 4 and answer.json["data"]["flags"] == EPHEMERAL
        assert "can't do that" in answer.json["data"]["content"]
        assert not fake.matching("PATCH", token)
    job = await engine.get_job(job_id)
    assert job.review is Review.HELD and job.result_path is not None


async def test_approve_after_a_restart_delivers_to_the_original_channel(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = review_settings(make_settings)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    job_id, _ = await held_job(fake, app)
    await wait_delivered(engine)
    await app.close()
    await engine.close()

    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    token = feed(app, press(f"flux:review-approve:{job_id}", user_id=BOB, admin=True))
    await fake.wait_for(lambda _: bool(posts_to(fake, CHANNEL_ID)), "the approved image in its channel")
    [post] = posts_to(fake, CHANNEL_ID)
    assert content(post).startswith(f"<@{ALICE}> ") and '"Super Mario in a hat"' in content(post)
    [file] = post.files
    assert file.filename is not None and not file.filename.startswith("SPOILER_")
    edit = await review_edit(fake, token)
    assert f"Job {job_id}: approved by" in content(edit) and edit.payload["components"] == []
    await wait_delivered(engine)
    assert (await engine.get_job(job_id)).review is Review.APPROVED

    # Decided already: one ephemeral line, nothing posted again.
    again = feed(app, press(f"flux:review-reject:{job_id}", user_id=BOB, admin=True))
    answer = await wait_followup(fake, again)
    assert answer.payload["flags"] == EPHEMERAL and "nothing to decide" in content(answer)
    assert len(posts_to(fake, CHANNEL_ID)) == 1


@pytest.mark.parametrize("ban", [False, True], ids=["reject", "reject-and-ban"])
async def test_reject_deletes_the_image_and_tells_the_requester(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    ban: bool,
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, review_settings(make_settings))
    app = await front_end(engine)
    job_id, _ = await held_job(fake, app)
    await wait_delivered(engine)

    token = feed(app, press(f"flux:review-{'ban' if ban else 'reject'}:{job_id}", user_id=BOB, admin=True))
    await fake.wait_for(lambda _: bool(posts_to(fake, CHANNEL_ID)), "the requester's notice")
    [told] = posts_to(fake, CHANNEL_ID)
    assert content(told).startswith(f"<@{ALICE}> ") and f"rejected the image of job {job_id}" in content(told)
    assert "rejected by an admin in review" in content(told) and not told.files
    edit = await review_edit(fake, token)
    assert f"Job {job_id}: rejected by" in content(edit) and edit.payload["components"] == []
    assert edit.payload["attachments"] == []
    assert ("is banned" in content(edit)) is ban
    job = await engine.get_job(job_id)
    assert job.review is Review.REJECTED and job.result_path is None and job.state is JobState.DONE
    await wait_delivered(engine)

    alice = Requester(Platform.DISCORD, ALICE, guild_id=GUILD_ID, channel_id=CHANNEL_ID)
    if ban:
        with pytest.raises(NotAllowed):
            await engine.submit(alice, ImageRequest("a cat", "schnell", mode=Mode.RELAX))
    else:
        queued = await engine.submit(alice, ImageRequest("a cat", "schnell", mode=Mode.RELAX))
        assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)


async def test_without_a_review_channel_the_held_image_waits_with_a_warning(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = review_settings(make_settings, discord_channel_id="")
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    with caplog.at_level(logging.WARNING, logger="bot.discord_app"):
        token = feed(app, command("imagine", imagine("Super Mario")))
        notice = await wait_followup(fake, token)
        await wait_delivered(engine)
    assert "is held for review" in content(notice) and not notice.files
    [warning] = [r for r in caplog.records if "held for review" in r.getMessage()]
    assert "/admin review" in warning.getMessage()
    assert [r for r in fake.requests if r.files] == []
    assert not [r for r in fake.requests if "/channels/" in r.path]


class FlagsEverything:
    def scores(self, image: bytes) -> Mapping[str, float]:
        return {"BUTTOCKS_EXPOSED": 0.99}


async def test_the_classifier_holds_an_image_from_an_ordinary_channel(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = review_settings(make_settings, phrases=[])
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings, classifier=FlagsEverything())
    app = await front_end(engine)
    reply = await wait_followup(fake, feed(app, command("imagine", imagine("a beach"))))
    assert not reply.files and "is held for review" in content(reply)
    assert "classifier: BUTTOCKS\\_EXPOSED 0.99" in content(await review_post(fake))
    await wait_delivered(engine)


@pytest.mark.parametrize("nsfw", [False, True], ids=["ordinary-channel", "age-restricted-channel"])
async def test_the_requester_carries_the_channels_age_restricted_flag(
    make_engine: EngineFactory,
    front_end: FrontEndFactory,
    fake: FakeDiscord,
    monkeypatch: pytest.MonkeyPatch,
    nsfw: bool,
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    seen: list[Requester] = []
    submit = engine.submit

    async def spy(requester: Requester, *args: Any, **kwargs: Any) -> Any:
        seen.append(requester)
        return await submit(requester, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", spy)
    payload = command("imagine", imagine("a beach"))
    payload["channel"] = {**payload["channel"], "nsfw": nsfw}
    await wait_followup(fake, feed(app, payload))
    [requester] = seen
    assert requester.age_restricted is nsfw
    await wait_delivered(engine)


async def test_an_image_approved_by_another_process_is_posted_by_the_running_bot(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = review_settings(make_settings)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    job_id, _ = await held_job(fake, app)
    await wait_delivered(engine)
    # `flux-bot admin review approve` runs in its own process: its events never reach this one.
    cli = await Engine.open_admin(settings, Secrets())
    try:
        await cli.approve(Requester(Platform.CONSOLE, "cli-ops", is_admin=True), job_id)
    finally:
        await cli.close()
    sweeping = asyncio.create_task(app._orphans.sweep(every_s=0.01, grace_s=0.0))
    try:
        await fake.wait_for(lambda _: bool(posts_to(fake, CHANNEL_ID)), "the approved image in its channel")
        await wait_delivered(engine)
    finally:
        sweeping.cancel()
    [post] = posts_to(fake, CHANNEL_ID)
    assert content(post).startswith(f"<@{ALICE}> ") and post.files
