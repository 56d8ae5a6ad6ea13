"""Appeals in the engine: which refusals can be appealed, who may appeal, and what an allowed appeal runs and costs.
The front-ends' buttons are tested in tests/bot/test_discord_appeals.py and test_slack_appeals.py."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot.commands import Commands
from engine.config import Secrets
from engine.errors import InvalidRequest, NotAllowed, PolicyBlocked, QuotaExceeded
from engine.models import AppealState, BackendKind, ImageRequest, JobDone, Mode, Resource, Task
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend

ADMIN = user("root", admin=True)


def png(color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


async def refusal(engine: Engine, request: ImageRequest, who: str = "alice") -> PolicyBlocked:
    with pytest.raises(PolicyBlocked) as refused:
        await engine.submit(user(who), request)
    return refused.value


@pytest.mark.parametrize(
    ("prompt", "appealable"),
    [
        ("a gun at dawn", True),  # a blocked word: the operator's judgement, which an admin may overrule
        ("ab", False),  # too short: nothing for an admin to decide
        ("a cat\x07", False),  # a control character: likewise
    ],
)
async def test_only_a_blocked_word_can_be_appealed(
    make_engine: EngineFactory, make_settings: SettingsFactory, prompt: str, appealable: bool
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(policy={"blocked_words": ["gun"]}))
    refused = await refusal(engine, ImageRequest(prompt, "schnell"))
    assert (refused.appeal_id is not None) is appealable


async def test_appeals_can_be_turned_off(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(policy={"blocked_words": ["gun"]}, review={"appeals": False})
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    assert (await refusal(engine, ImageRequest("a gun", "schnell"))).appeal_id is None


async def test_an_allowed_edit_runs_with_its_image_and_an_exhausted_allowance_keeps_the_appeal_waiting(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(policy={"blocked_words": ["gun"]}, tiers={"default": {"images_per_day": 1}})
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    image = png("blue")
    request = ImageRequest("add a gun to the knight", "schnell", task=Task.VARY, input_image=image, mode=Mode.RELAX)
    appeal_id = (await refusal(engine, request)).appeal_id
    assert appeal_id is not None
    with pytest.raises(NotAllowed):
        await engine.appeal(user("bob"), appeal_id)
    appeal = await engine.appeal(user("alice"), appeal_id)
    assert appeal.state is AppealState.PENDING and appeal.input_image is not None
    with pytest.raises(InvalidRequest, match="appealed already"):
        await engine.appeal(user("alice"), appeal_id)
    with pytest.raises(NotAllowed):
        await engine.allow_appeal(user("bob"), appeal_id)

    # Alice spends her one image of the day: the admin's Allow is refused with her limit, and the appeal waits.
    await wait_terminal(engine, (await engine.submit(user("alice"), ImageRequest("a cat", "schnell"))).job_id)
    with pytest.raises(QuotaExceeded) as exhausted:
        await engine.allow_appeal(ADMIN, appeal_id)
    assert exhausted.value.charge_possible
    assert [a.id for a in await engine.pending_appeals(ADMIN)] == [appeal_id]

    await engine.admin_quota_grant(ADMIN, user("alice").user_key, Resource.IMAGES, 1)
    text = await Commands(engine).admin(ADMIN, f"review allow {appeal_id}")
    assert f"Appeal {appeal_id} allowed" in text
    [decided] = [a for a in [await engine._store.get_appeal(appeal_id)] if a is not None]
    assert decided.state is AppealState.ALLOWED and decided.job_id is not None
    assert isinstance(await wait_terminal(engine, decided.job_id), JobDone)
    job = await engine.get_job(decided.job_id)
    assert job.request.task is Task.VARY and job.request.prompt == "add a gun to the knight"
    assert job.requester.user_key == user("alice").user_key
    assert await engine.pending_appeals(ADMIN) == []


async def test_admin_review_lists_and_denies_appeals(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(policy={"blocked_words": ["gun"]}))
    appeal_id = (await refusal(engine, ImageRequest("a gun", "schnell"))).appeal_id
    assert appeal_id is not None
    commands = Commands(engine)
    # Refused but not appealed: nothing waits for an admin yet.
    assert "no appeals wait" in await commands.admin(ADMIN, "review list")
    await engine.appeal(user("alice"), appeal_id)
    assert appeal_id in await commands.admin(ADMIN, "review list")
    assert "kept refused (not for this server)" in await commands.admin(
        ADMIN, f"review deny {appeal_id} not for this server"
    )
    with pytest.raises(InvalidRequest, match="nothing to decide"):
        await commands.admin(ADMIN, f"review allow {appeal_id}")
    audit = "\n".join(f"{line.action} {line.detail}" for line in await engine.audit_log(ADMIN, action="appeal"))
    assert "appeal.deny" in audit and "not for this server" in audit and "appeal.file" in audit


async def test_an_appeal_allowed_at_a_shell_runs_in_the_running_bot(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(policy={"blocked_words": ["gun"]})
    bot = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    appeal_id = (await refusal(bot, ImageRequest("a gun", "schnell"))).appeal_id
    assert appeal_id is not None
    await bot.appeal(user("alice"), appeal_id)
    # `flux-bot admin review allow` runs in its own process, which dispatches nothing: the bot finds the job.
    cli = await Engine.open_admin(settings, Secrets())
    try:
        _, queued = await cli.allow_appeal(ADMIN, appeal_id)
    finally:
        await cli.close()
    assert isinstance(await wait_terminal(bot, queued.job_id), JobDone)
