"""Held images on Slack: the review channel, its Approve / Reject / Reject and ban buttons, and what the requester
sees, through the real AsyncApp in HTTP mode (signed requests) against the fake Slack Web API and the real engine."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from bot.slack_app import SlackFrontEnd
from bot.slack_blocks import NOT_AN_ADMIN_FOR_REVIEW
from engine.config import Settings
from engine.models import BackendKind, JobDone, JobHeld, JobQueued, Requester, Review
from engine.service import Engine
from tests.bot.test_slack import (
    ADMIN,
    ALICE,
    BOB,
    CHANNEL,
    FrontEndFactory,
    front_end,
    job_id_of,
    press_button,
    slack,
    slash,
    until,
)
from tests.conftest import EngineFactory, SettingsFactory, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.slack_server import Call, FakeSlack

# The Slack fakes' fixtures, shared with the other Slack tests.
__all__ = ["front_end", "slack"]

REVIEW_CHANNEL = "CREVIEW"
NOISY_PROMPT = "Mario &lt;!channel&gt; &amp; friends"  # as Slack sends what was typed: "Mario <!channel> & friends"


def review_settings(make_settings: SettingsFactory, **review: Any) -> Settings:
    return make_settings(
        admins={"user_ids": [ADMIN]}, review={"phrases": ["Mario"], "slack_channel_id": REVIEW_CHANNEL, **review}
    )


async def reviewed(engine: Engine, job_id: str, review: Review) -> None:
    """Bounded polling until the decision is stored and its event delivered (the button's ack comes first)."""
    async with asyncio.timeout(10):
        while True:
            job = await engine.get_job(job_id)
            if job.review is review and job.delivered:
                return
            await asyncio.sleep(0.01)


async def held(app: SlackFrontEnd, slack: FakeSlack, prompt: str = NOISY_PROMPT) -> tuple[str, Call]:
    """Submit a prompt that is held; its job id and the review message with the buttons, once all is posted."""
    job_id = job_id_of(await slash(app, "/imagine", prompt))
    assert isinstance(await wait_terminal(app.engine, job_id), JobHeld)
    await reviewed(app.engine, job_id, Review.HELD)  # delivered: the notice and the review posts are done
    [message] = [call for call in slack.named("chat.postMessage") if call.fields["channel"] == REVIEW_CHANNEL]
    return job_id, message


async def press(app: SlackFrontEnd, message: Call, action: str, *, user: str = ADMIN) -> None:
    """Press a button of the review message as Slack sends it (action_id and value as posted)."""
    button = next(b for b in message.blocks[1]["elements"] if b["action_id"] == f"flux_review_{action}")
    posted = {"type": "message", "ts": message.answer["ts"], "text": message.fields["text"]}
    channel = {"id": REVIEW_CHANNEL, "name": "review"}
    await press_button(app, user, channel, posted, message.blocks[1]["block_id"], button)


def in_channel(slack: FakeSlack, method: str, channel: str) -> list[Call]:
    return [call for call in slack.named(method) if call.fields.get("channel") == channel]


def live_markup(text: str) -> list[str]:
    return re.findall(r"<[^<>]*>", text)


async def test_a_held_image_goes_to_the_review_channel_and_nowhere_else(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, review_settings(make_settings)))
    job_id, message = await held(app, slack)

    # The requester's channel: the held notice on the progress message, no image.
    [notice] = in_channel(slack, "chat.postMessage", CHANNEL)
    final = in_channel(slack, "chat.update", CHANNEL)[-1]
    assert final.fields["ts"] == notice.answer["ts"] and "held for review" in final.fields["text"]
    assert f"<@{ALICE}>" in final.fields["text"] and not final.blocks
    # The image: one upload, to the review channel, with a comment that says it is held and pings nobody.
    [upload] = slack.named("files.completeUploadExternal")
    assert upload.fields["channel_id"] == REVIEW_CHANNEL
    [sent] = [call.data for call in slack.calls if call.method == "upload"]
    stored = (await app.engine.get_job(job_id)).result_path
    assert stored is not None and sent == await asyncio.to_thread(Path(stored).read_bytes)
    comment = upload.fields["initial_comment"]
    assert "HELD FOR REVIEW" in comment and job_id in comment and "u0alice (U0ALICE)" in comment
    assert "Prompt: Mario &lt;!channel&gt; &amp; friends\n" in comment and "phrase 'Mario'" in comment
    assert live_markup(comment) == []
    # The buttons, each valued with the job id.
    assert message.fields["channel"] == REVIEW_CHANNEL and live_markup(message.fields["text"]) == []
    blocks = message.blocks
    assert [(b["action_id"], b["text"]["text"], b["value"]) for b in blocks[1]["elements"]] == [
        ("flux_review_approve", "Approve", job_id),
        ("flux_review_reject", "Reject", job_id),
        ("flux_review_ban", "Reject and ban", job_id),
    ]


async def test_approve_after_a_restart_delivers_it_to_the_original_channel(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    settings = review_settings(make_settings)
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    job_id, message = await held(app, slack)
    await app.close()
    await app.engine.close()

    # A new process: only the database and the message Slack kept are left.
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    await press(app, message, "approve")
    await reviewed(app.engine, job_id, Review.APPROVED)
    assert isinstance(await app.engine.terminal_event(await app.engine.get_job(job_id)), JobDone)
    uploads = slack.named("files.completeUploadExternal")
    assert [call.fields["channel_id"] for call in uploads] == [REVIEW_CHANNEL, CHANNEL]
    result = next(call for call in in_channel(slack, "chat.update", CHANNEL) if call.blocks)
    assert f"<@{ALICE}>" in result.fields["text"] and result.blocks[1]["elements"][0]["action_id"] == "flux_reroll"
    assert uploads[1].fields["thread_ts"] == result.fields["ts"]
    await until(lambda: bool(in_channel(slack, "chat.update", REVIEW_CHANNEL)))
    [decided] = in_channel(slack, "chat.update", REVIEW_CHANNEL)
    assert decided.fields["ts"] == message.answer["ts"] and "approved by u0admin (U0ADMIN)" in decided.fields["text"]
    assert [block["type"] for block in decided.blocks] == ["section"]  # the buttons are gone

    # Pressed again: said so, nothing changes.
    await press(app, message, "reject")
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [again] = slack.named("chat.postEphemeral")
    assert again.fields["user"] == ADMIN and "already approved" in again.fields["text"]
    assert (await app.engine.get_job(job_id)).review is Review.APPROVED


@pytest.mark.parametrize("ban", [False, True], ids=["reject", "reject-and-ban"])
async def test_reject_deletes_the_image_and_tells_the_requester(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    ban: bool,
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, review_settings(make_settings)))
    job_id, message = await held(app, slack)
    await press(app, message, "ban" if ban else "reject")
    await reviewed(app.engine, job_id, Review.REJECTED)
    assert (await app.engine.get_job(job_id)).result_path is None
    told = in_channel(slack, "chat.update", CHANNEL)[-1]
    assert f"<@{ALICE}>" in told.fields["text"] and "rejected the image" in told.fields["text"]
    assert "rejected by an admin in review" in told.fields["text"] and not told.blocks
    assert len(slack.named("files.completeUploadExternal")) == 1  # the review channel's only
    await until(lambda: bool(in_channel(slack, "chat.update", REVIEW_CHANNEL)))
    [decided] = in_channel(slack, "chat.update", REVIEW_CHANNEL)
    assert "rejected by u0admin (U0ADMIN)" in decided.fields["text"]
    assert ("banned" in decided.fields["text"]) is ban
    again = await slash(app, "/imagine", "a plain landscape")
    assert ("banned" in again) is ban


async def test_a_non_admin_is_refused_and_nothing_changes(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, review_settings(make_settings)))
    job_id, message = await held(app, slack)
    for action in ("approve", "reject", "ban"):
        await press(app, message, action, user=BOB)
    await until(lambda: len(slack.named("chat.postEphemeral")) == 3)
    refusals = slack.named("chat.postEphemeral")
    assert {(call.fields["user"], call.fields["text"]) for call in refusals} == {(BOB, NOT_AN_ADMIN_FOR_REVIEW)}
    job = await app.engine.get_job(job_id)
    assert job.review is Review.HELD and job.result_path is not None
    assert in_channel(slack, "chat.update", REVIEW_CHANNEL) == []


async def test_without_a_review_channel_the_image_waits_with_a_warning(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = review_settings(make_settings, slack_channel_id="")
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    job_id = job_id_of(await slash(app, "/imagine", "Mario on the moon"))
    await wait_terminal(app.engine, job_id)
    await reviewed(app.engine, job_id, Review.HELD)
    assert slack.named("files.completeUploadExternal") == []
    assert any("/imagine-admin review" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("restricted", [True, False], ids=["age-restricted", "ordinary"])
async def test_a_listed_channel_makes_the_requester_age_restricted(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    monkeypatch: pytest.MonkeyPatch,
    restricted: bool,
) -> None:
    settings = review_settings(make_settings, age_restricted_slack_channels=[CHANNEL] if restricted else ["C0THER"])
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    seen: list[Requester] = []
    submit = app.engine.submit

    async def spy(requester: Requester, *args: Any, **kwargs: Any) -> JobQueued:
        seen.append(requester)
        return await submit(requester, *args, **kwargs)

    monkeypatch.setattr(app.engine, "submit", spy)
    job_id_of(await slash(app, "/imagine", "a portrait"))
    assert [requester.age_restricted for requester in seen] == [restricted]
