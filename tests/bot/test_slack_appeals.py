"""Appeals on Slack: a prompt refused for a blocked word is answered with an Appeal button; the appeal reaches the
review channel with the prompt as text; an admin's Allow runs it once for the requester (charged as usual), Keep
refused tells them. Through the real AsyncApp in HTTP mode against the fake Slack Web API and the real engine."""

from __future__ import annotations

import json
import re
from typing import Any

from bot.slack_app import SlackFrontEnd
from engine.config import Settings
from engine.models import AppealState, BackendKind, JobState, Platform, Requester
from tests.bot.test_slack import (
    ADMIN,
    ALICE,
    BOB,
    CHANNEL,
    TEAM_ID,
    FrontEndFactory,
    command_body,
    front_end,
    post,
    press_button,
    signed,
    slack,
    until,
)
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.slack_server import Call, FakeSlack

__all__ = ["front_end", "slack"]  # the fixtures, used by name

REVIEW_CHANNEL = "CREVIEW"
CONSOLE_ADMIN = Requester(Platform.CONSOLE, "ops", is_admin=True)


def appeal_settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        admins={"user_ids": [ADMIN]},
        policy={"blocked_words": ["gun"]},
        review={"slack_channel_id": REVIEW_CHANNEL},
    )


async def refused(app: SlackFrontEnd, prompt: str) -> tuple[str, dict[str, Any]]:
    """/imagine with a blocked word: the appeal id on the answer's button, and the answer."""
    body = command_body("/imagine", prompt)
    status, answer = await post(app, body, signed(body))
    assert status == 200, answer
    reply = json.loads(answer)
    assert reply["response_type"] == "ephemeral"
    [button] = reply["blocks"][1]["elements"]
    assert button["action_id"] == "flux_appeal" and button["text"]["text"] == "Appeal"
    return str(button["value"]), reply


async def press(app: SlackFrontEnd, action_id: str, appeal_id: str, *, user: str, channel: str) -> None:
    button = {"type": "button", "action_id": action_id, "value": appeal_id, "text": {"type": "plain_text", "text": "x"}}
    message = {"type": "message", "ts": "1700000000.000100", "text": "appeal"}
    await press_button(app, user, {"id": channel, "name": "c"}, message, f"flux_appeal_{appeal_id}", button)


def ephemerals_to(slack: FakeSlack, user: str) -> list[Call]:
    return [call for call in slack.named("chat.postEphemeral") if call.fields.get("user") == user]


async def test_an_appeal_reaches_the_review_channel_and_an_admin_allows_it_once(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, appeal_settings(make_settings)))
    appeal_id, reply = await refused(app, "a water gun &lt;!channel&gt;")
    assert "blocked word 'gun'" in reply["text"] and "not charged" in reply["text"] and "appeal" in reply["text"]

    # Bob cannot appeal Alice's refusal; Alice can, once.
    await press(app, "flux_appeal", appeal_id, user=BOB, channel=CHANNEL)
    await until(lambda: bool(ephemerals_to(slack, BOB)))
    assert "only the person" in ephemerals_to(slack, BOB)[0].fields["text"]
    await press(app, "flux_appeal", appeal_id, user=ALICE, channel=CHANNEL)
    await until(lambda: any(c.fields.get("channel") == REVIEW_CHANNEL for c in slack.named("chat.postMessage")))
    assert "went to the admins" in ephemerals_to(slack, ALICE)[-1].fields["text"]
    [posted] = [c for c in slack.named("chat.postMessage") if c.fields.get("channel") == REVIEW_CHANNEL]
    text = posted.fields["text"]
    assert f"Appeal {appeal_id}" in text and "a water gun &lt;!channel&gt;" in text
    assert re.findall(r"<[^<>]*>", text) == []  # the prompt shows as typed, pings nobody
    assert [(b["action_id"], b["value"]) for b in posted.blocks[1]["elements"]] == [
        ("flux_appeal_allow", appeal_id),
        ("flux_appeal_deny", appeal_id),
    ]

    # A non-admin in the review channel is refused; the admin's Allow runs the job for Alice.
    await press(app, "flux_appeal_allow", appeal_id, user=BOB, channel=REVIEW_CHANNEL)
    await until(lambda: len(ephemerals_to(slack, BOB)) == 2)
    assert "Only admins" in ephemerals_to(slack, BOB)[-1].fields["text"]
    await press(app, "flux_appeal_allow", appeal_id, user=ADMIN, channel=REVIEW_CHANNEL)
    await until(lambda: bool(slack.named("files.completeUploadExternal")))
    [upload] = slack.named("files.completeUploadExternal")
    assert upload.fields["channel_id"] == CHANNEL
    await until(lambda: any("allowed the appeal" in c.fields["text"] for c in ephemerals_to(slack, ALICE)))
    appeal = await app.engine._store.get_appeal(appeal_id)
    assert appeal is not None and appeal.state is AppealState.ALLOWED
    # A second Allow decides nothing.
    await press(app, "flux_appeal_allow", appeal_id, user=ADMIN, channel=REVIEW_CHANNEL)
    await until(lambda: any("nothing to decide" in c.fields["text"] for c in ephemerals_to(slack, ADMIN)))
    done = await app.engine.admin_jobs(CONSOLE_ADMIN, [JobState.QUEUED, JobState.RUNNING, JobState.DONE])
    assert [job.id for job in done] == [appeal.job_id]


async def test_an_appeal_kept_refused_tells_the_requester(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, appeal_settings(make_settings)))
    appeal_id, _ = await refused(app, "a gun on a table")
    await press(app, "flux_appeal", appeal_id, user=ALICE, channel=CHANNEL)
    await until(lambda: any(c.fields.get("channel") == REVIEW_CHANNEL for c in slack.named("chat.postMessage")))
    await press(app, "flux_appeal_deny", appeal_id, user=ADMIN, channel=REVIEW_CHANNEL)
    await until(lambda: any("kept the prompt refused" in c.fields["text"] for c in ephemerals_to(slack, ALICE)))
    assert not slack.named("files.completeUploadExternal")
    [line] = await app.engine.audit_log(CONSOLE_ADMIN, action="appeal.deny")
    assert line.actor == f"slack:{TEAM_ID}:{ADMIN}" and line.subject == f"slack:{TEAM_ID}:{ALICE}"
