"""Money and advice lines are true: the charge sentence only where a charge was possible, advice that fits this
bot's configuration (its lanes and admins' pauses, from Engine.capabilities()), and whose budget a refusal is about."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot import render
from bot.console import Console
from engine.errors import BackendUnavailable, EngineError, QuotaExceeded
from engine.ledger import LimitCheck, Scope
from engine.models import (
    BackendKind,
    FailureReason,
    ImageRequest,
    JobFailed,
    Platform,
    Requester,
    Resource,
)
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, user
from tests.fakes.backends import ScriptedBackend


async def _console_lines(engine: Engine, out: Path, lines: list[str]) -> list[str]:
    written: list[str] = []
    feed = iter([line + "\n" for line in lines])
    requester = Requester(Platform.CONSOLE, "alice", display_name="alice", is_admin=True)
    console = Console(engine, requester, out, write=written.append)
    assert await asyncio.wait_for(console.run(lambda: next(feed, "")), 30) == 0
    return written


async def test_only_refusals_of_a_paid_request_talk_about_charges(make_engine: EngineFactory, tmp_path: Path) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    not_about_a_job = ["/frobnicate", "/admin quota shw bob", "/admin pause gpu", "/job jnope", "/cancel jnope"]
    refused_images = ["/imagine a cat model=flux-9000", "/imagine a cat steps=99", "/imagine a cat mode=turbo"]
    written = await _console_lines(engine, tmp_path, [*not_about_a_job, *refused_images])
    errors = [line for line in written if "can't" in line or "No job" in line]
    assert len(errors) == len(not_about_a_job) + len(refused_images), written
    for line in errors[: len(not_about_a_job)]:
        assert "charged" not in line, line
    for line in errors[len(not_about_a_job) :]:
        assert line.endswith("You were not charged."), line


async def test_admin_credits_without_a_key_says_the_key_is_missing(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    with pytest.raises(BackendUnavailable) as caught:
        await engine.admin_credits(user("root", admin=True))
    text = render.error_message(caught.value, engine.capabilities())
    assert text == "BFL_API_KEY is not set, so the BFL balance cannot be read: set it in the environment."


def _credits_failure() -> JobFailed:
    return JobFailed("j1", FailureReason.OUT_OF_CREDITS, "HTTP 402", 0)


@pytest.mark.parametrize(
    ("lanes", "paused", "relax"),
    [
        ((BackendKind.LOCAL, BackendKind.API), (), True),
        ((BackendKind.API,), (), False),  # no GPU lane at all
        ((BackendKind.LOCAL, BackendKind.API), (BackendKind.LOCAL,), False),  # the GPU lane is paused
    ],
)
async def test_relax_is_offered_only_with_a_gpu_lane_to_serve_it(
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    lanes: tuple[BackendKind, ...],
    paused: tuple[BackendKind, ...],
    relax: bool,
) -> None:
    engine = await make_engine({kind: ScriptedBackend(kind=kind) for kind in lanes})
    for kind in paused:
        await engine.admin_pause(user("root", admin=True), kind, True)
    capabilities = engine.capabilities()
    assert capabilities.local_usable is relax
    failed = render.failed_text(_credits_failure(), capabilities)
    assert ("mode=relax" in failed) is relax
    assert failed.startswith(
        "Job j1 failed: this bot's BFL account is out of credits. You were not charged. Tell an admin"
    )
    budget = LimitCheck(
        "your API budget this month", Scope("user", "discord:alice"), Resource.USD_MICROS, "2026-12", 100, None
    )
    refusal = budget.refusal(90, 40_000)
    assert refusal is not None
    assert ("mode=relax" in render.error_message(refusal, capabilities)) is relax


async def test_the_concurrent_jobs_refusal_says_to_wait_for_a_job(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    local = ScriptedBackend(gate=asyncio.Event())
    settings = make_settings(tiers={"default": {"concurrent_jobs": 1}})
    engine = await make_engine({BackendKind.LOCAL: local}, settings)
    await engine.submit(user(), ImageRequest("first", "schnell"))
    with pytest.raises(QuotaExceeded) as caught:
        await engine.submit(user(), ImageRequest("second", "schnell"))
    text = render.error_message(caught.value, engine.capabilities())
    assert text == (
        "You already have 1 job waiting or running, as many as you may have at once. You were not charged."
        " Wait for one of your jobs to finish (see /queue), or cancel one."
    )
    assert "reset" not in text and "mode=relax" not in text
    assert "You were not charged." in text


@pytest.mark.parametrize(
    ("limits", "whose"),
    [
        ({"guild_api_usd_per_month": 0.01}, "this server's API budget this month (shared by its members)"),
        ({"global_api_usd_per_month": 0.01}, "the whole bot's API budget this month (shared by everyone)"),
    ],
)
async def test_a_shared_budget_refusal_says_whose_budget_it_is(
    make_engine: EngineFactory, make_settings: SettingsFactory, limits: dict[str, float], whose: str
) -> None:
    settings = make_settings(limits=limits, tiers={"default": {"api_usd_per_month": 100}})
    engine = await make_engine({BackendKind.API: ScriptedBackend(kind=BackendKind.API)}, settings)
    with pytest.raises(EngineError) as caught:
        await engine.submit(user(), ImageRequest("a lighthouse", "pro"))
    text = render.error_message(caught.value, engine.capabilities())
    assert f"but {whose} has only $0.01 left: ask an admin to raise that budget" in text
    assert "mode=relax" not in text  # there is no GPU lane here


def test_a_shared_budget_quota_refusal_names_its_scope() -> None:
    guild = LimitCheck(
        "this server's API budget this month (shared by its members)",
        Scope("guild", "discord:g1"),
        Resource.USD_MICROS,
        "2026-12",
        10_000,
        None,
    )
    refusal = guild.refusal(10_000, 40_000)
    assert refusal is not None and refusal.scope == "guild"
    text = render.error_message(refusal)
    assert text.startswith("That would go over this server's API budget this month (shared by its members) ($0.00")
    assert "It is a shared budget, not your own: wait for the reset, or ask an admin to raise it." in text


async def test_a_paused_api_is_called_paused_and_no_missing_lane_is_offered(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.API: ScriptedBackend(kind=BackendKind.API)})
    await engine.admin_pause(user("root", admin=True), BackendKind.API, True)
    with pytest.raises(BackendUnavailable) as caught:
        await engine.submit(user(), ImageRequest("a lighthouse", "pro"))
    text = render.error_message(caught.value, engine.capabilities())
    assert text == (
        "No image backend can take this now: FLUX1.1 [pro] runs only on the API and the API is paused: try later."
        " You were not charged."
    )
