"""Take-down through the real front-ends: a result is posted (and its posting recorded) on Discord or Slack, then
bot.takedown.take_down removes it there through the platform's REST API (the fakes), and from the state folder."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bot.discord_app import DiscordFrontEnd
from bot.takedown import take_down
from engine.models import BackendKind, Platform, Posting, Requester
from engine.service import Engine
from tests.bot.test_discord import command, feed, imagine, wait_delivered, wait_followup
from tests.bot.test_slack import finished, front_end, job_id_of, slack, slash

# The Slack fakes' fixtures, shared with the other Slack tests.
__all__ = ["front_end", "slack"]
from tests.conftest import EngineFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.discord_server import CHANNEL_ID, FakeDiscord
from tests.fakes.slack_server import BOT_TOKEN, FakeSlack

ADMIN = Requester(Platform.CONSOLE, "ops", display_name="ops", is_admin=True)
DISCORD_TOKEN = "token"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def discord_app(fake: FakeDiscord) -> AsyncIterator[Callable[[Engine], Awaitable[DiscordFrontEnd]]]:
    started: list[DiscordFrontEnd] = []

    async def build(engine: Engine) -> DiscordFrontEnd:
        app = DiscordFrontEnd(engine, edit_interval_s=0.0)
        await app.client.login(DISCORD_TOKEN)  # REST only: interactions are fed by the test
        started.append(app)
        return app

    yield build
    for app in started:
        await app.close()


async def _discord_result(fake: FakeDiscord, app: DiscordFrontEnd, prompt: str) -> tuple[str, Posting]:
    """One /imagine to its result; the job id and the posting recorded for the result message."""
    before = len(fake.sent)
    result = await wait_followup(fake, feed(app, command("imagine", imagine(prompt))))
    job_id = str(result.payload["components"][0]["components"][0]["custom_id"].split(":")[2])
    await wait_delivered(app.engine)
    [posting] = await app.engine._store.postings(job_id)
    assert posting.platform is Platform.DISCORD and posting.channel_id == CHANNEL_ID
    assert (posting.channel_id, posting.message_id) in fake.sent[before:]  # the followup that carries the image
    return job_id, posting


async def _assert_taken_down(engine: Engine, job_id: str, stored: str, reason: str) -> None:
    job = await engine.get_job(job_id)
    assert job.result_path is None and job.taken_down == reason
    assert not await asyncio.to_thread(os.path.isfile, stored)
    audit = await engine.audit_log(ADMIN, action="takedown")
    assert [line.job_id for line in audit] == [job_id]


async def test_a_discord_result_is_taken_down_and_a_message_deleted_by_hand_is_already_gone(
    make_engine: EngineFactory, fake: FakeDiscord, discord_app: Any
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await discord_app(engine)
    job_id, posting = await _discord_result(fake, app, "a red fox")
    stored = str((await engine.get_job(job_id)).result_path)
    assert await asyncio.to_thread(os.path.isfile, stored)

    report = await take_down(
        engine, ADMIN, job_id, "posted without consent", discord_token=DISCORD_TOKEN, slack_token=None
    )
    path = f"/channels/{CHANNEL_ID}/messages/{posting.message_id}"
    assert fake.matching("DELETE", path, status=204)
    assert f"Discord message {posting.message_id} in channel {CHANNEL_ID}: removed" in report
    assert "stored image: deleted" in report
    await _assert_taken_down(engine, job_id, stored, "posted without consent")

    other, gone = await _discord_result(fake, app, "a blue fox")
    fake.delete_by_hand(gone.channel_id, str(gone.message_id))
    report = await take_down(engine, ADMIN, other, "a duplicate", discord_token=DISCORD_TOKEN, slack_token=None)
    assert fake.matching("DELETE", f"/messages/{gone.message_id}", status=404)
    assert f"Discord message {gone.message_id} in channel {CHANNEL_ID}: not removed: already gone" in report


async def test_a_slack_result_loses_its_file_and_message_and_one_deleted_by_hand_is_already_gone(
    make_engine: EngineFactory, slack: FakeSlack, front_end: Any
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    result = await finished(app, slack, job_id)
    [posting] = await engine._store.postings(job_id)
    uploaded = slack.named("files.completeUploadExternal")[0].answer["files"][0]["id"]
    assert posting.platform is Platform.SLACK and posting.channel_id == result.fields["channel"]
    assert posting.message_id == result.fields["ts"] and posting.file_id == uploaded
    stored = str((await engine.get_job(job_id)).result_path)

    report = await take_down(
        engine, ADMIN, job_id, "a likeness", discord_token=None, slack_token=BOT_TOKEN, slack_api_url=slack.base_url
    )
    assert [call.fields["file"] for call in slack.named("files.delete")] == [uploaded]
    assert [call.fields["ts"] for call in slack.named("chat.delete")] == [posting.message_id]
    assert all(call.answer["ok"] for call in slack.named("files.delete") + slack.named("chat.delete"))
    assert f"Slack message {posting.message_id} and file {uploaded} in {posting.channel_id}: removed" in report
    await _assert_taken_down(engine, job_id, stored, "a likeness")

    other = job_id_of(await slash(app, "/imagine", "a blue cat"))
    await finished(app, slack, other)
    [gone] = await engine._store.postings(other)
    slack.delete_by_hand(ts=gone.message_id, file_id=gone.file_id)
    report = await take_down(
        engine, ADMIN, other, "a duplicate", discord_token=None, slack_token=BOT_TOKEN, slack_api_url=slack.base_url
    )
    errors = [call.answer.get("error") for call in slack.named("files.delete") + slack.named("chat.delete")]
    assert sorted(str(e) for e in errors if e) == ["file_not_found", "message_not_found"]
    assert f"file {gone.file_id} in {gone.channel_id}: not removed: already gone" in report
