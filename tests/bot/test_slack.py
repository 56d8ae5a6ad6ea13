"""The Slack front-end: the real AsyncApp and AsyncWebClient against the fake Slack Web API, the real engine behind it.

Slash commands, button clicks, message shortcuts and modal submits are POSTed, signed as Slack signs them, to the
front-end's HTTP mode server on loopback; what the bot did is read from the fake's call log.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile
from slack_sdk.signature import SignatureVerifier

import bot.slack_app
from bot.commands import Commands, ImagineArgs
from bot.slack_app import CommandNames, SlackFrontEnd
from bot.slack_blocks import parse_imagine, plain_text
from engine.config import Settings
from engine.errors import ConfigError, InvalidRequest
from engine.models import BackendKind, FailureReason, JobState, Platform, Requester, Task
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, wait_terminal
from tests.fakes.backends import ScriptedBackend, fail, tiny_png
from tests.fakes.slack_server import BOT_TOKEN, TEAM_ID, Call, FakeSlack

SECRET = "test-signing-secret"
CHANNEL = "C0001"
ALICE, BOB, ADMIN = "U0ALICE", "U0BOB", "U0ADMIN"

FrontEndFactory = Callable[..., Awaitable[SlackFrontEnd]]


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as server:
        yield server


@pytest.fixture
async def front_end(slack: FakeSlack) -> AsyncIterator[FrontEndFactory]:
    started: list[SlackFrontEnd] = []

    async def build(engine: Engine, **options: Any) -> SlackFrontEnd:
        app = SlackFrontEnd(
            engine,
            bot_token=BOT_TOKEN,
            signing_secret=SECRET,
            client_base_url=slack.base_url,
            edit_interval_s=0.0,
            **options,
        )
        await app.start(port=0)
        started.append(app)
        return app

    yield build
    for app in started:
        await app.close()


def signed(body: str, *, timestamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": SignatureVerifier(secret).generate_signature(timestamp=ts, body=body),
        "Content-Type": "application/x-www-form-urlencoded",
    }


async def post(app: SlackFrontEnd, body: str, headers: dict[str, str]) -> tuple[int, str]:
    host, port = app.http_address
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{host}:{port}/slack/events", data=body.encode(), headers=headers) as response,
    ):
        return response.status, await response.text()


def command_body(command: str, text: str, *, user: str = ALICE, team: str = TEAM_ID) -> str:
    return urlencode(
        {
            "token": "legacy",
            "team_id": team,
            "team_domain": "test",
            "channel_id": CHANNEL,
            "channel_name": "art",
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": "A1",
            "response_url": "https://hooks.invalid/response",
            "trigger_id": "1.2.3",
        }
    )


async def slash(app: SlackFrontEnd, command: str, text: str = "", **who: str) -> str:
    """The ephemeral text the command was acknowledged with."""
    body = command_body(command, text, **who)
    status, answer = await post(app, body, signed(body))
    assert status == 200, answer
    reply = json.loads(answer)
    assert reply["response_type"] == "ephemeral"
    return str(reply["text"])


async def click(app: SlackFrontEnd, result: Call, action: str, *, user: str = ALICE, old_action_id: str = "") -> None:
    """Click a button of the result message, sending back its action_id and value as Slack does.

    old_action_id: the click comes from a message posted by an earlier version, whose button had that action_id.
    """
    button = next(b for b in result.blocks[1]["elements"] if b["action_id"] == f"flux_{action}")
    button = {**button, "action_id": old_action_id} if old_action_id else button
    message = {"type": "message", "ts": result.fields["ts"], "text": "result"}
    await press_button(app, user, {"id": CHANNEL, "name": "art"}, message, result.blocks[1]["block_id"], button)


async def press_button(
    app: SlackFrontEnd,
    user: str,
    channel: dict[str, str],
    message: dict[str, Any],
    block_id: str,
    button: dict[str, Any],
) -> None:
    """A button press on a message, as Slack posts the block_actions payload (signed)."""
    payload = {
        "type": "block_actions",
        "team": {"id": TEAM_ID, "domain": "test"},
        "user": {"id": user, "username": user.lower(), "team_id": TEAM_ID},
        "api_app_id": "A1",
        "token": "legacy",
        "container": {
            "type": "message",
            "message_ts": message["ts"],
            "channel_id": channel["id"],
            "is_ephemeral": False,
        },
        "trigger_id": "1.2.3",
        "channel": channel,
        "message": message,
        "response_url": "https://hooks.invalid/response",
        "actions": [
            {
                "type": "button",
                "action_id": button["action_id"],
                "block_id": block_id,
                "value": button["value"],
                "action_ts": "1700000001.000001",
            }
        ],
    }
    body = urlencode({"payload": json.dumps(payload)})
    status, answer = await post(app, body, signed(body))
    assert status == 200, answer


async def until(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Bounded polling on the fake's log: the bound guards against a hung test, it is never the expected path."""
    async with asyncio.timeout(limit_s):
        while not check():
            await asyncio.sleep(0.01)


def job_id_of(note: str) -> str:
    assert note.startswith("Job "), note
    return note.split()[1].rstrip(":")


async def delivered(app: SlackFrontEnd, job_id: str) -> None:
    """Delivery is recorded after Slack answers the terminal message, so poll (bounded) for it."""
    await wait_terminal(app.engine, job_id)
    async with asyncio.timeout(10):
        while not (await app.engine.get_job(job_id)).delivered:
            await asyncio.sleep(0.01)


async def finished(app: SlackFrontEnd, slack: FakeSlack, job_id: str) -> Call:
    """The chat.update that carries the result buttons, once delivery is recorded."""
    await delivered(app, job_id)
    return next(call for call in slack.named("chat.update") if call.blocks and job_id in json.dumps(call.blocks))


async def test_imagine_end_to_end(make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory) -> None:
    gate = asyncio.Event()  # holds the job after its first step, so the progress message is seen updating
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend(steps=3, gate=gate)}))
    note = await slash(app, "/imagine", "a red cat --aspect 16:9 --steps 3 --seed 7")
    job_id = job_id_of(note)
    assert "local GPU" in note and "ETA" in note and "Why:" in note and "free" in note
    await until(lambda: any("/3" in call.fields["text"] for call in slack.named("chat.update")))
    gate.set()

    result = await finished(app, slack, job_id)
    posted = slack.named("chat.postMessage")[0]
    assert posted.fields["channel"] == CHANNEL and job_id in posted.fields["text"]
    ts = posted.answer["ts"]
    updates = [call for call in slack.named("chat.update") if call.fields["ts"] == ts]
    progress = " ".join(call.fields["text"] for call in updates[:-1])
    assert "started on the local GPU" in progress or "/3" in progress, progress
    assert result is updates[-1] and f"<@{ALICE}>" in result.fields["text"] and "seed 7" in result.fields["text"]
    assert [(b["action_id"], b["text"]["text"]) for b in result.blocks[1]["elements"]] == [
        ("flux_reroll", "Reroll"),
        ("flux_vary_subtle", "Vary (subtle)"),
        ("flux_vary_strong", "Vary (strong)"),
        ("flux_edit_image", "Edit"),
        ("flux_edit", "Edit prompt"),
        ("flux_delete", "Delete"),
    ]

    # The three steps of files_upload_v2, in order, landing in the progress message's thread.
    methods = [call.method for call in slack.calls]
    first = methods.index("files.getUploadURLExternal")
    assert methods[first : first + 3] == ["files.getUploadURLExternal", "upload", "files.completeUploadExternal"]
    upload, complete = slack.named("upload")[0], slack.named("files.completeUploadExternal")[0]
    assert complete.fields["channel_id"] == CHANNEL and complete.fields["thread_ts"] == ts
    assert "a red cat" in complete.fields["initial_comment"]
    with Image.open(io.BytesIO(upload.data)) as image:
        assert isinstance(image, PngImageFile) and image.text["seed"] == "7" and image.text["job"] == job_id


async def test_malformed_flags_get_a_clear_error_and_store_nothing(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    for text, expected in (
        ("a cat --steps", "--steps needs a value"),
        ("a cat --steps many", "steps must be a whole number, not 'many'"),
        ("a cat --guidance high", "guidance must be a number, not 'high'"),
        ("a cat --ar 16:9 --aspect 1:1", "aspect is given twice ('--ar 16:9' and '--aspect 1:1')"),
        ("a cat --width 1024 --height 768 --ar 16:9", "give an aspect ratio or a width and height, not both"),
        ("a cat --seed 1 --seed 2", "seed is given twice"),
    ):
        answer = await slash(app, "/imagine", text)
        assert expected in answer and "not charged" in answer
    assert await engine._store.jobs() == []
    assert slack.named("chat.postMessage") == []


def test_parse_imagine() -> None:
    assert parse_imagine('"a cat" on a mat --MODEL dev --mode relax --ar 3:2') == ImagineArgs(
        '"a cat" on a mat', {"model": "dev", "mode": "relax", "aspect": "3:2"}
    )
    assert parse_imagine("a cat's hat --width 1024 --height=768") == ImagineArgs(
        "a cat's hat", {"width": "1024", "height": "768"}
    )
    with pytest.raises(InvalidRequest):
        parse_imagine("a cat --seed")


@pytest.mark.parametrize(
    ("sent", "typed"),
    [
        ("a &amp; b &lt;c&gt;", "a & b <c>"),
        ("&amp;lt; stays", "&lt; stays"),  # the user typed "&lt;" itself
        ("a portrait of <@U123|alice> and <@U456>", "a portrait of @alice and @U456"),
        ("posted in <#C123|art> and <#C456>", "posted in #art and #C456"),
        ("hi <!here> <!channel> <!everyone> <!here|here>", "hi @here @channel @everyone @here"),
        ("for <!subteam^S123|@designers> and <!subteam^S456>", "for @designers and @S456"),
        (
            "a sign: <https://example.com|example.com> <https://x.io/a?b=1&amp;c=2>",
            "a sign: example.com https://x.io/a?b=1&c=2",
        ),
        ("<mailto:a@b.c|a@b.c> on <!date^1392734382^{date}|Feb 18th>", "a@b.c on Feb 18th"),
        ('a cat\'s "hat" -- x=1 E=mc² 🐱', 'a cat\'s "hat" -- x=1 E=mc² 🐱'),
    ],
)
def test_slack_markup_is_read_as_the_words_the_user_saw(sent: str, typed: str) -> None:
    assert plain_text(sent) == typed


async def test_ordinary_english_reaches_the_model_unchanged(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    cases = {
        "a cat's hat --ar 16:9": ("a cat's hat", "16:9"),
        'a neon sign reading "EAT -- DRINK" --steps 2': ('a neon sign reading "EAT -- DRINK"', "1:1"),
        "E=mc² on a  chalkboard, 🧑‍🚀 --no people": ("E=mc² on a  chalkboard, 🧑‍🚀 --no people", "1:1"),
        "--aspect=3:2 tom &amp; jerry &lt;3 for <@U9|bob>": ("tom & jerry <3 for @bob", "3:2"),
    }
    for text, (prompt, aspect) in cases.items():
        job = await app.engine.get_job(job_id_of(await slash(app, "/imagine", text)))
        assert (job.request.prompt, job.request.aspect_ratio) == (prompt, aspect)


async def test_width_and_height_flags(make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a wide cat --width 1024 --height 768"))
    job = await app.engine.get_job(job_id)
    assert (job.request.width, job.request.height) == (1024, 768)
    assert "width must be a multiple of 32" in await slash(app, "/imagine", "a cat --width 1000 --height 768")
    result = await finished(app, slack, job_id)
    await click(app, result, "reroll")
    await until(lambda: len(slack.named("chat.postEphemeral")) == 1)
    rerolled = await app.engine.get_job(job_id_of(slack.named("chat.postEphemeral")[0].fields["text"]))
    assert (rerolled.request.width, rerolled.request.height) == (1024, 768)


# Typed by the user in Slack, which escapes &, < and > itself: so these are words, never markup.
NOISY = "<!channel> <!here> <@U0BOB> <!subteam^S1> <#C9> a & b <c>"
NOISY_AS_SENT = NOISY.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
LIVE_MARKUP = re.compile(r"<[^>]*>")


def live_markup(text: str) -> list[str]:
    """The `<...>` markup Slack would act on in a text the bot sent."""
    return LIVE_MARKUP.findall(text)


async def test_a_prompt_pings_nobody_on_any_path(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend(steps=2)}))
    note = await slash(app, "/imagine", f"{NOISY_AS_SENT} --seed 5")
    job_id = job_id_of(note)
    assert (await app.engine.get_job(job_id)).request.prompt == NOISY
    result = await finished(app, slack, job_id)

    [header] = slack.named("chat.postMessage")
    assert live_markup(header.fields["text"]) == [f"<@{ALICE}>"]
    updates = [call for call in slack.named("chat.update")]
    assert updates and all(live_markup(call.fields["text"]) == [f"<@{ALICE}>"] for call in updates)
    shown = result.blocks[0]["text"]
    assert shown["type"] == "mrkdwn" and live_markup(shown["text"]) == [f"<@{ALICE}>"]
    assert NOISY_AS_SENT in shown["text"] and NOISY_AS_SENT in result.fields["text"]
    [complete] = slack.named("files.completeUploadExternal")
    assert NOISY_AS_SENT in complete.fields["initial_comment"] and not live_markup(complete.fields["initial_comment"])

    # The ack: an error that echoes the user's words, and a note.
    answer = await slash(app, "/imagine", "a cat --model &lt;!channel&gt;&amp;")
    assert "unknown model '&lt;!channel&gt;&amp;'" in answer and not live_markup(answer)
    assert not live_markup(note)
    # An ephemeral message (button answers use it) is escaped the same way.
    await app._ephemeral(Requester(Platform.SLACK, ALICE, guild_id=TEAM_ID, channel_id=CHANNEL), NOISY)
    [ephemeral] = slack.named("chat.postEphemeral")
    assert ephemeral.fields["text"] == NOISY_AS_SENT


async def test_a_failure_after_a_restart_is_escaped_with_the_mention_live(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    requester = Requester(Platform.SLACK, ALICE, guild_id=TEAM_ID, channel_id=CHANNEL)
    queued = await Commands(engine).imagine(requester, NOISY, {})
    await wait_terminal(engine, queued.job_id)
    app = await front_end(engine)
    result = await finished(app, slack, queued.job_id)
    assert live_markup(slack.named("chat.postMessage")[0].fields["text"]) == [f"<@{ALICE}>"]
    assert live_markup(result.fields["text"]) == [f"<@{ALICE}>"] and NOISY_AS_SENT in result.fields["text"]


SEND_METHODS = {"chat_postMessage", "chat_update", "chat_postEphemeral", "chat_scheduleMessage", "files_upload_v2"}
SENDERS = {"_post", "_chat_update", "_upload", "_ephemeral", "_ack"}


def test_every_slack_send_goes_through_the_escaping_helpers() -> None:
    """A new path that called the Web API directly could post a prompt as markup: only the helpers may."""
    tree = ast.parse(Path(bot.slack_app.__file__).read_text())
    offenders = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) or function.name in SENDERS:
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            texty = name in ("ack", "say", "respond") and any(k.arg in ("text", "blocks") for k in node.keywords)
            if name in SEND_METHODS or texty:
                offenders.append(f"{function.name}:{node.lineno} {name}")
    assert not offenders, f"send through _post/_chat_update/_upload/_ephemeral/_ack instead: {offenders}"


async def test_reroll_makes_a_new_job_with_the_same_prompt(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat --seed 41"))
    result = await finished(app, slack, job_id)

    await click(app, result, "reroll", user=BOB)
    await until(lambda: len(slack.named("chat.postEphemeral")) == 1)
    rerolled = job_id_of(slack.named("chat.postEphemeral")[0].fields["text"])

    store = app.engine._store
    original, reroll_job = [await store.get_job(j) for j in (job_id, rerolled)]
    assert rerolled != job_id and reroll_job.request.task is Task.GENERATE
    assert reroll_job.request.prompt == original.request.prompt and reroll_job.requester.user_id == BOB
    await finished(app, slack, rerolled)


async def test_delete_refused_for_another_user_and_done_for_the_requester(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    result = await finished(app, slack, job_id)
    ts = result.fields["ts"]

    await click(app, result, "delete", user=BOB)
    await until(lambda: len(slack.named("chat.postEphemeral")) == 1)
    refusal = slack.named("chat.postEphemeral")[0].fields
    assert refusal["user"] == BOB and "only the person who asked" in refusal["text"]
    assert slack.named("chat.delete") == []

    await click(app, result, "delete", user=ALICE)
    await until(lambda: len(slack.named("files.delete")) == 1)
    assert slack.named("chat.delete")[0].fields == {"channel": CHANNEL, "ts": ts}
    uploaded = slack.named("files.completeUploadExternal")[0].answer["files"][0]["id"]
    assert slack.named("files.delete")[0].fields["file"] == uploaded


async def test_admin_commands_refused_for_a_non_admin_and_working_for_an_admin(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(admins={"user_ids": [ADMIN]}))
    app = await front_end(engine)
    assert "only admins" in await slash(app, "/imagine-admin", "pause local", user=BOB)
    assert "Routing to the local GPU paused." in await slash(app, "/imagine-admin", "pause local", user=ADMIN)
    assert "resumed" in await slash(app, "/imagine-admin", "resume local", user=ADMIN)
    assert "only admins" in await slash(app, "/imagine-admin", f"quota show {ALICE}", user=BOB)
    # The user named without a platform is taken from the admin's own workspace.
    assert f"slack:{TEAM_ID}:{BOB}" in await slash(app, "/imagine-admin", f"quota show {BOB}", user=ADMIN)
    assert "No jobs waiting or running." in await slash(app, "/imagine-admin", "jobs", user=ADMIN)


async def test_workspace_admins_via_users_info(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    slack.admins.add(ADMIN)
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}), admin_via_users_info=True)
    assert "only admins" in await slash(app, "/imagine-admin", "credits", user=BOB)
    assert "No jobs waiting or running." in await slash(app, "/imagine-admin", "jobs", user=ADMIN)
    assert [call.fields["user"] for call in slack.named("users.info")] == [BOB, ADMIN]


async def test_a_failure_is_told_in_the_progress_message_without_a_traceback(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    backend = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.BAD_REQUEST, retryable=False))
    app = await front_end(await make_engine({BackendKind.LOCAL: backend}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    await delivered(app, job_id)
    text = slack.named("chat.update")[-1].fields["text"]
    assert f"Job {job_id} failed" in text and "not charged" in text and "Traceback" not in text
    assert slack.named("files.completeUploadExternal") == []


async def test_socket_mode_is_chosen_by_the_app_token(make_engine: EngineFactory) -> None:
    """Only construction: connecting needs Slack's websocket endpoint, which no offline test can reach."""
    app = SlackFrontEnd(await make_engine({}), bot_token=BOT_TOKEN, app_token="xapp-test")
    assert app.socket_mode is not None and app.socket_mode.client.web_client is app.client
    with pytest.raises(ConfigError, match="signing secret"):
        SlackFrontEnd(app.engine, bot_token=BOT_TOKEN)
    await app.close()


async def test_quota_and_cancel(make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory) -> None:
    gate = asyncio.Event()
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend(gate=gate)}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    assert "cancelled" in await slash(app, "/imagine-cancel", job_id)
    await delivered(app, job_id)
    assert f"Job {job_id} cancelled" in slack.named("chat.update")[-1].fields["text"]
    assert (await app.engine.get_job(job_id)).state is JobState.CANCELLED
    assert f"slack:{TEAM_ID}:{ALICE}" in await slash(app, "/imagine-quota")
    gate.set()


async def test_two_workspaces_with_the_same_user_id_do_not_share_a_quota(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    settings = make_settings(tiers={"default": {"images_per_day": 1}})
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    first = job_id_of(await slash(app, "/imagine", "a red cat", team="T0001"))
    await finished(app, slack, first)
    assert not (await slash(app, "/imagine", "a red cat", team="T0001")).startswith("Job ")
    other = job_id_of(await slash(app, "/imagine", "a red cat", team="T0002"))
    assert (await app.engine.get_job(other)).requester.user_key == f"slack:T0002:{ALICE}"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Content-Type": "application/x-www-form-urlencoded"}, id="unsigned"),
        pytest.param("bad", id="bad-signature"),
        pytest.param("stale", id="older-than-5-minutes"),
    ],
)
async def test_http_mode_rejects_unverified_requests(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory, headers: Any
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    body = command_body("/imagine", "a red cat")
    if headers == "bad":
        headers = signed(body, secret="not-the-secret")
    elif headers == "stale":
        headers = signed(body, timestamp=int(time.time()) - 6 * 60)
    status, _ = await post(app, body, headers)
    assert status == 401
    assert await engine._store.jobs() == []


async def test_a_429_with_retry_after_is_retried(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    slack.rate_limit_once.add("chat.postMessage")
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    await finished(app, slack, job_id)
    tries = [call.status for call in slack.calls if call.method == "chat.postMessage"]
    assert tries == [429, 200]


async def test_results_that_ended_while_away_are_delivered_on_start(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    requester = Requester(Platform.SLACK, ALICE, guild_id=TEAM_ID, channel_id=CHANNEL)
    queued = await Commands(engine).imagine(requester, "a red cat", {})
    await wait_terminal(engine, queued.job_id)
    app = await front_end(engine)
    result = await finished(app, slack, queued.job_id)
    assert result.fields["channel"] == CHANNEL
    assert slack.named("files.completeUploadExternal")[0].fields["thread_ts"] == result.fields["ts"]


@pytest.mark.parametrize("admin_channel", ["CADMIN", ""], ids=["admin-channel", "the-command-channel"])
async def test_admin_report_is_acked_at_once_then_posted_as_a_file(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    admin_channel: str,
) -> None:
    settings = make_settings(admins={"user_ids": [ADMIN]}, ops={"alert_slack_channel_id": admin_channel})
    app = await front_end(await make_engine({}, settings))
    assert "only admins" in await slash(app, "/imagine-admin", "report", user=BOB)
    where = admin_channel or CHANNEL
    note = await slash(app, "/imagine-admin", "report", user=ADMIN)
    assert note == f"Building the report; the chart and its summary will be posted in <#{where}>."
    await until(lambda: bool(slack.named("files.completeUploadExternal")))
    [complete] = slack.named("files.completeUploadExternal")
    assert complete.fields["channel_id"] == where
    assert complete.fields["initial_comment"].startswith("flux-bot, last 30 days:")
    [upload] = slack.named("upload")
    with Image.open(io.BytesIO(upload.data)) as image:
        assert image.format == "PNG" and image.size == (1200, 800)


async def test_alerts_are_posted_to_the_admin_channel(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    settings = make_settings(
        ops={"alert_slack_channel_id": "CADMIN", "failure_alert_rate": 0.5, "failure_alert_min_jobs": 1}
    )
    backend = ScriptedBackend(plan=lambda job, attempt: fail(FailureReason.BAD_REQUEST, retryable=False))
    app = await front_end(await make_engine({BackendKind.LOCAL: backend}, settings))
    await slash(app, "/imagine", "a doomed cat")
    await until(lambda: any(call.fields["channel"] == "CADMIN" for call in slack.named("chat.postMessage")))
    [alert] = [call for call in slack.named("chat.postMessage") if call.fields["channel"] == "CADMIN"]
    assert alert.fields["text"].startswith("flux-bot alert: 1 of the 1 jobs that ended in the last hour failed")
    assert not live_markup(alert.fields["text"])


async def test_queue_job_and_settings_under_configurable_names(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    gate = asyncio.Event()
    names = CommandNames(queue="/fx-queue", job="/fx-job", settings="/fx-settings")
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend(gate=gate)}), command_names=names)
    assert await slash(app, "/fx-settings", "aspect 3:2") == "Your defaults: aspect=3:2"
    assert await slash(app, "/fx-settings") == "Your defaults: aspect=3:2"
    assert "use /settings NAME VALUE" in await slash(app, "/fx-settings", "aspect")
    assert "You have no jobs waiting or running." in await slash(app, "/fx-queue")

    job_id = job_id_of(await slash(app, "/imagine", "a red cat --seed 7"))
    queue = await slash(app, "/fx-queue")
    assert "Your jobs:" in queue and job_id in queue and "a red cat" in queue
    shown = await slash(app, "/fx-job", job_id)
    assert shown.startswith(f"Job {job_id}:") and "prompt: a red cat" in shown and "seed 7" in shown
    assert "(3:2)" in shown  # the default set above
    assert (await slash(app, "/fx-job", "jnope")).startswith("No job 'jnope'")
    gate.set()
    await finished(app, slack, job_id)


async def submit_view(
    app: SlackFrontEnd, view: dict[str, Any], typed: str, *, user: str = ALICE, field: str = "prompt"
) -> dict[str, Any]:
    """Submit a modal as Slack does (the view with the text typed into its `field` input in its state); returns the
    ack's body."""
    state = {"values": {field: {field: {"type": "plain_text_input", "value": typed}}}}
    payload = {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": "test"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": "A1",
        "token": "legacy",
        "trigger_id": "1.2.4",
        "view": {**view, "state": state},
    }
    body = urlencode({"payload": json.dumps(payload)})
    status, answer = await post(app, body, signed(body))
    assert status == 200, answer
    return json.loads(answer) if answer else {}


async def test_edit_prompt_opens_a_modal_that_works_after_a_restart(
    make_engine: EngineFactory, make_settings: SettingsFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    settings: Settings = make_settings()
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    job_id = job_id_of(await slash(app, "/imagine", "a red fox --aspect 16:9 --steps 3 --seed 41"))
    result = await finished(app, slack, job_id)
    await click(app, result, "edit", user=BOB)
    await until(lambda: bool(slack.opened_views))
    [opened] = slack.named("views.open")
    assert opened.fields["trigger_id"] == "1.2.3"
    [view] = slack.opened_views
    [block] = view["blocks"]
    assert block["element"]["type"] == "plain_text_input" and block["element"]["initial_value"] == "a red fox"
    await app.close()
    await app.engine.close()

    # Submitted to a new process: only the database and the view Slack kept are left.
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings))
    assert await submit_view(app, view, "a red wolf", user=BOB) == {}
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [note] = slack.named("chat.postEphemeral")
    assert note.fields["user"] == BOB and note.fields["channel"] == CHANNEL
    new_id = job_id_of(note.fields["text"])
    old, new = [await app.engine.get_job(j) for j in (job_id, new_id)]
    assert new.request == replace(old.request, prompt="a red wolf") and new.requester.user_id == BOB
    result = await finished(app, slack, new_id)
    assert result.fields["channel"] == CHANNEL and "seed 41" in result.fields["text"]


async def test_a_refused_edit_is_shown_in_the_modal(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red fox"))
    await click(app, await finished(app, slack, job_id), "edit")
    await until(lambda: bool(slack.opened_views))
    answer = await submit_view(app, slack.opened_views[0], "   ")
    assert answer["response_action"] == "errors"
    assert "not charged" in answer["errors"]["prompt"] and "Traceback" not in answer["errors"]["prompt"]
    assert len(await app.engine._store.jobs(states=list(JobState))) == 1
    assert slack.named("chat.postEphemeral") == []


async def test_the_posted_image_is_the_stored_file_with_its_parameters(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    """The engine writes one annotated PNG; Slack gets those bytes, not a second encoding of them."""
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat --seed 7"))
    await finished(app, slack, job_id)
    job = await app.engine.get_job(job_id)
    assert job.result_path is not None
    stored = await asyncio.to_thread(Path(job.result_path).read_bytes)
    [upload] = slack.named("upload")
    assert upload.data == stored
    with Image.open(io.BytesIO(stored)) as image:
        assert image.text["prompt"] == "a red cat" and image.text["model"] == "FLUX.1 [schnell]"


async def test_delete_removes_the_stored_image_too(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    result = await finished(app, slack, job_id)
    stored = str((await app.engine.get_job(job_id)).result_path)
    assert await asyncio.to_thread(os.path.isfile, stored)

    await click(app, result, "delete", user=BOB)
    await until(lambda: len(slack.named("chat.postEphemeral")) == 1)
    assert await asyncio.to_thread(os.path.isfile, stored)  # someone else's Delete changes nothing

    await click(app, result, "delete", user=ALICE)
    await until(lambda: len(slack.named("files.delete")) == 1)
    assert not await asyncio.to_thread(os.path.isfile, stored)
    job = await app.engine.get_job(job_id)
    assert job.state is JobState.DONE and job.result_path is None
    [audit] = await app.engine._store.audit_log("image.removed")
    assert audit["job_id"] == job_id and audit["actor"] == f"slack:{TEAM_ID}:{ALICE}"


async def test_guidance_is_refused_for_schnell_and_shown_as_used_for_dev(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    app = await front_end(engine)
    refusal = await slash(app, "/imagine", "a red cat --guidance 3")
    assert "FLUX.1 [schnell] takes no guidance value" in refusal and "not charged" in refusal
    assert await engine._store.jobs() == []
    job_id = job_id_of(await slash(app, "/imagine", "a red cat --model dev"))
    await finished(app, slack, job_id)
    with Image.open(io.BytesIO(slack.named("upload")[0].data)) as image:
        assert isinstance(image, PngImageFile) and image.text["guidance"] == "3.0"  # dev's default, as used


# ---- images in: the "Edit with FLUX" message shortcut, and the Vary and Edit buttons under a result ----


async def edit_engine(make_engine: EngineFactory, settings: Settings | None = None) -> Engine:
    """The GPU lane for /imagine and variations, the API for the default edit model (Kontext [pro])."""
    backends = {BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: ScriptedBackend(BackendKind.API)}
    return await make_engine(backends, settings)


async def message_shortcut(app: SlackFrontEnd, message: dict[str, Any], *, user: str = ALICE) -> None:
    """Use "Edit with FLUX" on a message, sending the message_action payload as Slack does."""
    payload = {
        "type": "message_action",
        "token": "legacy",
        "action_ts": "1700000002.000001",
        "team": {"id": TEAM_ID, "domain": "test"},
        "user": {"id": user, "name": user.lower(), "team_id": TEAM_ID},
        "channel": {"id": CHANNEL, "name": "art"},
        "is_enterprise_install": False,
        "callback_id": "flux_edit_image",
        "trigger_id": "1.2.5",
        "response_url": "https://hooks.invalid/response",
        "message_ts": message["ts"],
        "message": message,
    }
    body = urlencode({"payload": json.dumps(payload)})
    status, answer = await post(app, body, signed(body))
    assert status == 200, answer


def shared_message(*files: dict[str, Any], text: str = "look at this") -> dict[str, Any]:
    """A message Bob posted with these files (objects from FakeSlack.add_file)."""
    return {"type": "message", "user": BOB, "ts": "1699999999.000100", "text": text, "files": list(files)}


def stored_inputs(engine: Engine) -> list[Path]:
    folder = engine.settings.bot.inputs_dir
    return sorted(folder.iterdir()) if folder.is_dir() else []


async def test_edit_with_flux_on_a_shared_image_edits_it(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await edit_engine(make_engine))
    photo = tiny_png((20, 90, 200), size=(96, 64))
    shared = slack.add_file("sky.png", photo)
    await message_shortcut(app, shared_message(shared))
    await until(lambda: bool(slack.opened_views))
    [opened] = slack.named("views.open")
    assert opened.fields["trigger_id"] == "1.2.5"
    [view] = slack.opened_views
    # The modal remembers which file, never where it lives: that address only works with the bot token.
    assert json.loads(view["private_metadata"]) == {"channel": CHANNEL, "file": shared["id"], "ts": "1699999999.000100"}
    [block] = view["blocks"]
    assert block["element"]["type"] == "plain_text_input" and "initial_value" not in block["element"]

    # A modal's input comes as typed, unescaped: the words reach the model, the posts show them as text.
    instruction = "make the sky stormy <!channel>"
    assert await submit_view(app, view, instruction, field="instruction") == {}
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [note] = slack.named("chat.postEphemeral")
    assert note.fields["user"] == ALICE and note.fields["channel"] == CHANNEL and not live_markup(note.fields["text"])
    [download] = slack.named("download")
    assert download.fields == {"file_id": shared["id"], "authorized": True}

    job = await app.engine.get_job(job_id_of(note.fields["text"]))
    assert (job.request.task, job.request.model, job.request.prompt) == (Task.EDIT, "kontext-pro", instruction)
    assert job.request.input_image is not None and job.request.aspect_ratio == "3:2"  # the photo's own shape
    [stored] = stored_inputs(app.engine)
    assert stored.name == f"{job.request.input_image}.png"
    with Image.open(stored) as kept, Image.open(io.BytesIO(photo)) as sent:
        assert kept.size == sent.size and kept.tobytes() == sent.convert(kept.mode).tobytes()

    # Posted as /imagine's results are: a progress message, then the image in its thread with the buttons.
    result = await finished(app, slack, job.id)
    assert result.fields["channel"] == CHANNEL and live_markup(result.fields["text"]) == [f"<@{ALICE}>"]
    [complete] = slack.named("files.completeUploadExternal")
    assert complete.fields["thread_ts"] == result.fields["ts"]
    assert "make the sky stormy &lt;!channel&gt;" in complete.fields["initial_comment"]


@pytest.mark.parametrize(
    "files",
    [
        pytest.param([], id="no-file"),
        pytest.param([("notes.pdf", b"%PDF-1.7", "application/pdf")], id="a-pdf"),
    ],
)
async def test_edit_with_flux_on_a_message_without_an_image_is_refused_once(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory, files: list[tuple[str, bytes, str]]
) -> None:
    app = await front_end(await edit_engine(make_engine))
    message = shared_message(*(slack.add_file(name, data, kind) for name, data, kind in files))
    await message_shortcut(app, message)
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [refusal] = slack.named("chat.postEphemeral")
    assert refusal.fields["user"] == ALICE and refusal.fields["text"].startswith("That message has no image to edit.")
    assert slack.named("views.open") == [] and slack.named("files.info") == []


async def open_and_submit_an_edit(app: SlackFrontEnd, slack: FakeSlack, shared: dict[str, Any]) -> str:
    """The shortcut on a message with this file, the modal submitted; the one ephemeral answer."""
    await message_shortcut(app, shared_message(shared))
    await until(lambda: bool(slack.opened_views))
    await submit_view(app, slack.opened_views[-1], "make it blue", field="instruction")
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [answer] = slack.named("chat.postEphemeral")
    return str(answer.fields["text"])


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        # Slack's answer to an app installed without files:read: files.info says so, downloads get the login page.
        pytest.param({"files_read_scope": False}, "the app lacks the files:read scope", id="missing-scope"),
        # The download does not take the token: Slack answers a 200 with its login page, not an error.
        pytest.param(
            {"download_token": "xoxb-another"}, "Slack answered with a login page, which means", id="login-page"
        ),
        pytest.param({"download_status": 403}, "Slack refused the bot (HTTP 403)", id="http-403"),
    ],
)
async def test_a_download_slack_refuses_names_files_read_and_keeps_nothing(
    make_engine: EngineFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    refusal: dict[str, Any],
    expected: str,
) -> None:
    engine = await edit_engine(make_engine)
    app = await front_end(engine)
    shared = slack.add_file("sky.png", tiny_png())
    for name, value in refusal.items():
        setattr(slack, name, value)
    answer = await open_and_submit_an_edit(app, slack, shared)
    assert expected in answer and "files:read" in answer and "ask an admin" in answer, answer
    assert "not charged" in answer and "Traceback" not in answer and "<html" not in answer.lower()
    # The bot always sends its token as a Bearer header; only in the login-page case does the fake take another.
    sent_the_accepted_token = [download.fields["authorized"] for download in slack.named("download")]
    assert sent_the_accepted_token == (
        [False] if "download_token" in refusal else [True] * len(sent_the_accepted_token)
    )
    assert await engine._store.jobs(states=list(JobState)) == []
    assert stored_inputs(engine) == []
    assert slack.named("chat.postMessage") == []


async def test_the_bot_token_goes_only_to_slack(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    """A file whose address files.info gives outside Slack (here the fake under another host name, which would
    record the request) is not fetched: the request would carry the bot token there."""
    engine = await edit_engine(make_engine)
    app = await front_end(engine)
    shared = slack.add_file("sky.png", tiny_png())
    outside = shared["url_private_download"].replace("127.0.0.1", "localhost")
    slack.files[shared["id"]].extra.update(url_private=outside, url_private_download=outside)
    answer = await open_and_submit_an_edit(app, slack, shared)
    assert answer.startswith("flux-bot could not download the image: Slack gave an address outside Slack")
    assert "not charged" in answer and slack.named("download") == []
    assert await engine._store.jobs(states=list(JobState)) == []


async def test_a_file_gone_by_the_submit_is_told(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    """files.info answers file_not_found for a deleted file, and for one shared where the bot is not a member."""
    app = await front_end(await edit_engine(make_engine))
    shared = slack.add_file("sky.png", tiny_png())
    await message_shortcut(app, shared_message(shared))
    await until(lambda: bool(slack.opened_views))
    del slack.files[shared["id"]]
    await submit_view(app, slack.opened_views[0], "make it blue", field="instruction")
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [answer] = slack.named("chat.postEphemeral")
    assert "could not find the image on Slack" in answer.fields["text"] and "add the app" in answer.fields["text"]
    assert slack.named("download") == [] and await app.engine._store.jobs(states=list(JobState)) == []


async def test_a_file_stored_outside_slack_is_refused_without_a_download(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await edit_engine(make_engine))
    shared = slack.add_file("sky.png", tiny_png(), is_external=True, external_type="gdrive")
    answer = await open_and_submit_an_edit(app, slack, shared)
    assert "it is stored outside Slack (gdrive)" in answer and slack.named("download") == []


@pytest.mark.parametrize("size_known", [True, False], ids=["size-from-files-info", "size-found-downloading"])
async def test_an_image_over_the_size_limit_is_refused_without_reading_it_all(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    slack: FakeSlack,
    front_end: FrontEndFactory,
    size_known: bool,
) -> None:
    engine = await edit_engine(make_engine, make_settings(images={"max_input_mb": 0.001}))
    app = await front_end(engine)
    shared = slack.add_file(
        "big.png", tiny_png(size=(64, 64)) + bytes(200_000), **({} if size_known else {"size": None})
    )
    answer = await open_and_submit_an_edit(app, slack, shared)
    assert "at most 0.001 MB are accepted" in answer and "not charged" in answer, answer
    assert len(slack.named("download")) == (0 if size_known else 1) and stored_inputs(engine) == []


async def test_a_file_the_engine_refuses_is_told_and_stored_nowhere(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    """Slack calls an SVG an image; the engine, which decides what is accepted, does not."""
    engine = await edit_engine(make_engine)
    app = await front_end(engine)
    shared = slack.add_file("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")
    answer = await open_and_submit_an_edit(app, slack, shared)
    assert "an SVG drawing is not accepted" in answer and "not charged" in answer, answer
    assert await engine._store.jobs(states=list(JobState)) == [] and stored_inputs(engine) == []


async def test_the_vary_and_edit_buttons_start_from_the_result(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await edit_engine(make_engine))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat --seed 41"))
    result = await finished(app, slack, job_id)

    async def answer_to(press: Callable[[], Awaitable[None]]) -> str:
        count = len(slack.named("chat.postEphemeral"))
        await press()
        await until(lambda: len(slack.named("chat.postEphemeral")) == count + 1)
        return str(slack.named("chat.postEphemeral")[-1].fields["text"])

    subtle = await answer_to(lambda: click(app, result, "vary_subtle", user=BOB))
    strong = await answer_to(lambda: click(app, result, "vary_strong", user=BOB))
    # A result posted before there were two Vary buttons still has the old one: it makes a subtle variation.
    old = await answer_to(lambda: click(app, result, "vary_subtle", user=BOB, old_action_id="flux_vary"))

    async def edit_from_the_button() -> None:
        await click(app, result, "edit_image", user=BOB)
        await until(lambda: bool(slack.opened_views))
        view = slack.opened_views[-1]
        assert json.loads(view["private_metadata"]) == {"channel": CHANNEL, "job": job_id}
        await submit_view(app, view, "make the cat blue", user=BOB, field="instruction")

    edited = await answer_to(edit_from_the_button)

    images = app.engine.settings.images
    assert images.vary_subtle_strength != images.vary_strong_strength
    edit = await app.engine.get_job(job_id_of(edited))
    assert (edit.request.task, edit.request.model) == (Task.EDIT, "kontext-pro")
    assert edit.request.prompt == "make the cat blue" and edit.requester.user_id == BOB
    original = await app.engine.get_job(job_id)
    subtle_strength = images.vary_subtle_strength
    for note, strength in ((subtle, subtle_strength), (strong, images.vary_strong_strength), (old, subtle_strength)):
        job = await app.engine.get_job(job_id_of(note))
        assert (job.request.task, job.request.strength) == (Task.VARY, strength)
        assert (job.request.prompt, job.request.model) == (original.request.prompt, original.request.model)
        assert job.request.input_image == edit.request.input_image and job.requester.user_id == BOB
    # All four start from the result itself: one stored input (inputs are stored by content), the result's pixels.
    [stored] = stored_inputs(app.engine)
    assert stored.stem == edit.request.input_image
    with Image.open(stored) as kept, Image.open(io.BytesIO(await app.engine.result_image(job_id))) as made:
        assert kept.size == made.size and kept.tobytes() == made.convert(kept.mode).tobytes()
    for note in (subtle, strong, old, edited):
        await finished(app, slack, job_id_of(note))


async def test_the_edit_button_on_a_deleted_image_says_so_without_a_modal(
    make_engine: EngineFactory, slack: FakeSlack, front_end: FrontEndFactory
) -> None:
    app = await front_end(await edit_engine(make_engine))
    job_id = job_id_of(await slash(app, "/imagine", "a red cat"))
    result = await finished(app, slack, job_id)
    requester = Requester(Platform.SLACK, ALICE, guild_id=TEAM_ID, channel_id=CHANNEL)
    await app.engine.delete_result(requester, job_id)
    await click(app, result, "edit_image", user=BOB)
    await until(lambda: bool(slack.named("chat.postEphemeral")))
    [answer] = slack.named("chat.postEphemeral")
    assert f"job {job_id} has no stored image" in answer.fields["text"] and slack.named("views.open") == []
