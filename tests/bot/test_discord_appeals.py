"""Appeals on Discord: a prompt refused for a blocked word offers an Appeal button; the appeal goes to the admins'
review channel with the prompt; an admin who allows it runs the job once for the requester, charged as any job.
Take-down from chat (/admin takedown) removes the result and the review channel's copy.

The real discord.py client against the fake Discord HTTP API, the real engine behind it (as tests/bot/test_discord.py).
"""

from __future__ import annotations

from typing import Any

from bot.discord_app import DiscordFrontEnd
from bot.takedown import remover
from engine.config import Settings
from engine.models import AppealState, BackendKind, JobState, Platform, Requester, Resource
from engine.service import Engine
from tests.bot.test_discord import (
    ALICE,
    BOB,
    EPHEMERAL,
    FrontEndFactory,
    click,
    command,
    content,
    fake,
    feed,
    front_end,
    imagine,
    wait_delivered,
    wait_followup,
)
from tests.bot.test_discord_review import REVIEW_CHANNEL, callback, posts_to, press, review_edit, review_post
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.discord_server import CHANNEL_ID, MANAGE_GUILD, FakeDiscord

__all__ = ["fake", "front_end"]  # the fixtures, used by name

ADMIN = Requester(Platform.CONSOLE, "ops", display_name="ops", is_admin=True)
REFUSED_MESSAGE = "4501"


def appeal_settings(make_settings: SettingsFactory, **review: Any) -> Settings:
    return make_settings(policy={"blocked_words": ["gun"]}, review={"discord_channel_id": REVIEW_CHANNEL, **review})


async def refused(fake: FakeDiscord, app: DiscordFrontEnd, prompt: str) -> tuple[str, dict[str, Any]]:
    """An /imagine the policy refuses: its appeal id and the ephemeral refusal."""
    reply = await wait_followup(fake, feed(app, command("imagine", imagine(prompt))))
    assert reply.payload["flags"] == EPHEMERAL
    [row] = reply.payload["components"]
    [button] = row["components"]
    assert button["label"] == "Appeal" and button["custom_id"].startswith("flux:appeal:a")
    return button["custom_id"].split(":")[2], reply.payload


async def appealed(fake: FakeDiscord, app: DiscordFrontEnd, prompt: str) -> str:
    appeal_id, _ = await refused(fake, app, prompt)
    token = feed(app, click(f"flux:appeal:{appeal_id}", REFUSED_MESSAGE))
    answer = await callback(fake, token)
    assert answer.json["type"] == 7  # the refusal is replaced: one appeal per refusal
    assert "went to the admins" in answer.json["data"]["content"] and answer.json["data"]["components"] == []
    await review_post(fake)
    return appeal_id


async def test_a_refused_prompt_is_appealed_to_the_review_channel_with_the_prompt_as_text(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, appeal_settings(make_settings))
    app = await front_end(engine)
    appeal_id, refusal = await refused(fake, app, "a **water** gun for @everyone")
    assert "blocked word 'gun'" in refusal["content"] and "not charged" in refusal["content"]
    assert "appeal" in refusal["content"]

    # Someone else cannot appeal it.
    other = feed(app, click(f"flux:appeal:{appeal_id}", REFUSED_MESSAGE, user_id=BOB))
    answer = await callback(fake, other)
    assert answer.json["data"]["flags"] == EPHEMERAL and "only the person" in answer.json["data"]["content"]
    assert not posts_to(fake, REVIEW_CHANNEL)

    token = feed(app, click(f"flux:appeal:{appeal_id}", REFUSED_MESSAGE))
    await callback(fake, token)
    post = await review_post(fake)
    text = content(post)
    assert f"Appeal {appeal_id}" in text and f"discord:{ALICE}" in text and f"<@{ALICE}>" not in text
    assert "\\*\\*water\\*\\*" in text and "@\u200beveryone" in text and 'blocked word "gun"' in text
    assert post.payload["allowed_mentions"]["parse"] == []
    [row] = post.payload["components"]
    assert [c["custom_id"] for c in row["components"]] == [
        f"flux:appeal-allow:{appeal_id}",
        f"flux:appeal-deny:{appeal_id}",
    ]
    # Appealing again is answered, not filed twice.
    again = feed(app, click(f"flux:appeal:{appeal_id}", REFUSED_MESSAGE))
    assert "appealed already" in (await callback(fake, again)).json["data"]["content"]
    assert len(posts_to(fake, REVIEW_CHANNEL)) == 1
    audit = await engine.audit_log(ADMIN, action="appeal")
    assert [line.action for line in audit] == ["appeal.file"]


async def test_an_allowed_appeal_runs_the_job_once_after_a_restart_charged_as_usual(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    settings = appeal_settings(make_settings)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    appeal_id = await appealed(fake, app, "a gun range at dawn")
    await app.close()
    await engine.close()

    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = await front_end(engine)
    # A non-admin's press is refused and changes nothing.
    refused_press = feed(app, press(f"flux:appeal-allow:{appeal_id}", user_id=BOB, admin=False))
    assert "can't do that" in (await callback(fake, refused_press)).json["data"]["content"]
    assert (await engine.pending_appeals(ADMIN))[0].id == appeal_id

    token = feed(app, press(f"flux:appeal-allow:{appeal_id}", user_id=BOB, admin=True))
    await fake.wait_for(lambda _: any(p.files for p in posts_to(fake, CHANNEL_ID)), "the image in its channel")
    await wait_delivered(engine)
    [image_post] = [p for p in posts_to(fake, CHANNEL_ID) if p.files]
    assert content(image_post).startswith(f"<@{ALICE}> ") and '"a gun range at dawn"' in content(image_post)
    [told] = [p for p in posts_to(fake, CHANNEL_ID) if not p.files]
    assert "allowed the appeal" in content(told) and told.payload["allowed_mentions"]["parse"] == []
    edit = await review_edit(fake, token)
    assert f"Appeal {appeal_id}: allowed by" in content(edit) and edit.payload["components"] == []

    # Once: a second press decides nothing and runs nothing.
    again = feed(app, press(f"flux:appeal-allow:{appeal_id}", user_id=BOB, admin=True))
    assert "nothing to decide" in content(await wait_followup(fake, again))
    jobs = await engine.admin_jobs(ADMIN, [JobState.DONE])
    assert len(jobs) == 1 and jobs[0].requester.user_id == ALICE and jobs[0].request.prompt == "a gun range at dawn"
    # Charged as any of Alice's images: one image of her daily allowance.
    view = await engine.quota_view(jobs[0].requester)
    assert [line.used for line in view.lines if line.resource is Resource.IMAGES] == [1]
    actions = [line.action for line in await engine.audit_log(ADMIN, action="appeal")]
    assert actions == ["appeal.allow", "appeal.file"]
    [policy] = await engine.audit_log(ADMIN, action="policy.allow")
    assert policy.detail["rule"] == "appeal" and policy.job_id == jobs[0].id


async def test_an_appeal_kept_refused_tells_the_requester_and_runs_nothing(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, appeal_settings(make_settings))
    app = await front_end(engine)
    appeal_id = await appealed(fake, app, "a gun on the table")
    token = feed(app, press(f"flux:appeal-deny:{appeal_id}", user_id=BOB, admin=True))
    await fake.wait_for(lambda _: bool(posts_to(fake, CHANNEL_ID)), "the requester's notice")
    [told] = posts_to(fake, CHANNEL_ID)
    assert "kept the prompt refused" in content(told) and "not charged" in content(told) and not told.files
    edit = await review_edit(fake, token)
    assert f"Appeal {appeal_id}: kept refused" in content(edit)
    assert await engine.admin_jobs(ADMIN, [JobState.QUEUED, JobState.RUNNING, JobState.DONE]) == []
    [line] = await engine.audit_log(ADMIN, action="appeal.deny")
    assert line.subject == f"discord:{ALICE}"


async def test_admin_review_lists_appeals_and_allows_them_from_chat(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, appeal_settings(make_settings))
    app = await front_end(engine)
    appeal_id = await appealed(fake, app, "a gun for the museum")

    def admin(*options: dict[str, Any]) -> str:
        review = {"name": "review", "type": 1, "options": list(options)}
        return feed(app, command("admin", [review], user_id=BOB, permissions=MANAGE_GUILD))

    listed = await wait_followup(fake, admin())
    assert listed.payload["flags"] == EPHEMERAL and appeal_id in content(listed)
    assert "a gun for the museum" in content(listed)
    allowed = await wait_followup(
        fake,
        admin(
            {"name": "decision", "type": 3, "value": "allow"},
            {"name": "target", "type": 3, "value": appeal_id},
        ),
    )
    assert f"Appeal {appeal_id} allowed" in content(allowed)
    [appeal] = [a for a in [await engine._store.get_appeal(appeal_id)] if a is not None]
    assert appeal.state is AppealState.ALLOWED and appeal.job_id is not None
    await fake.wait_for(lambda _: any(p.files for p in posts_to(fake, CHANNEL_ID)), "the image in its channel")


async def test_admin_takedown_in_chat_removes_the_result_and_the_review_copy(
    make_engine: EngineFactory, make_settings: SettingsFactory, fake: FakeDiscord
) -> None:
    settings = make_settings(review={"phrases": ["Mario"], "discord_channel_id": REVIEW_CHANNEL})
    engine: Engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    app = DiscordFrontEnd(
        engine, edit_interval_s=0.0, take_down=remover(engine, discord_token="token", slack_token=None)
    )
    await app.client.login("token")
    try:
        await wait_followup(fake, feed(app, command("imagine", imagine("Super Mario"))))
        post = await review_post(fake)
        job_id = post.payload["components"][0]["components"][0]["custom_id"].split(":")[2]
        await wait_delivered(engine)
        feed(app, press(f"flux:review-approve:{job_id}", user_id=BOB, admin=True))
        await fake.wait_for(lambda _: any(p.files for p in posts_to(fake, CHANNEL_ID)), "the approved image")
        await wait_delivered(engine)

        options = [{"name": "job", "type": 3, "value": job_id}, {"name": "reason", "type": 3, "value": "DMCA 42"}]
        takedown = {"name": "takedown", "type": 1, "options": options}
        report = await wait_followup(
            fake, feed(app, command("admin", [takedown], user_id=BOB, permissions=MANAGE_GUILD))
        )
        text = content(report)
        assert report.payload["flags"] == EPHEMERAL and f"Job {job_id} taken down (DMCA 42)" in text
        assert text.count(": removed") == 2  # the result in its channel, and the approved copy in the review channel
        assert {channel for channel, _ in fake.deleted} == {CHANNEL_ID, REVIEW_CHANNEL}
        assert (await engine.get_job(job_id)).taken_down == "DMCA 42"

        # A non-admin's take-down is refused.
        refused_report = await wait_followup(fake, feed(app, command("admin", [takedown], user_id=ALICE)))
        assert content(refused_report) == "You can't do that: only admins can do this."
    finally:
        await app.close()
