"""Admin input is checked before anything is written: `flux-bot admin ...` (bot.__main__.main) on a real database
file, and the same words through Commands.admin as a chat admin types them.

Every bad amount, limit, user key or flag gets one line, a non-zero exit and no traceback, and the users, ledger,
audit and jobs tables are byte-for-byte what they were.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.__main__ import main
from bot.commands import Commands
from bot.render import error_message
from engine.errors import EngineError
from engine.models import BackendKind, ImageRequest, Platform, Requester
from tests.conftest import EngineFactory, SettingsFactory, wait_terminal
from tests.fakes.backends import ScriptedBackend

TABLES = ("users", "ledger", "audit", "jobs")
ALICE = "console:alice"  # has used the bot (one job)


def _snapshot(database: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(database) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall() for table in TABLES}


@pytest.fixture
async def cli(
    tmp_path: Path, make_engine: EngineFactory, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path]:
    """A config file and its database, where console:alice has made one image."""
    for name in ("BFL_API_KEY", "DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "FLUX_BOT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    settings = make_settings()
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    queued = await engine.submit(Requester(Platform.CONSOLE, "alice"), ImageRequest("a cat", "schnell"))
    await wait_terminal(engine, queued.job_id)
    await engine.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[bot]\nstate_dir = "{settings.bot.state_dir}"\n')
    return config, settings.bot.database_path


def _admin(config: Path, capsys: pytest.CaptureFixture[str], *words: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "admin", *words])
    out, err = capsys.readouterr()
    return code, out, err


BIG = "9" * 30  # far past SQLite's signed 64-bit integers, whatever the unit's scale
REFUSED = {
    # quota set USER LIMIT VALUE
    "set nan": (["quota", "set", ALICE, "images_per_day", "nan"], "must be a whole number of images, not 'nan'"),
    "set inf": (["quota", "set", ALICE, "gpu_seconds_per_day", "inf"], "must be a whole number of seconds"),
    "set -inf dollars": (["quota", "set", ALICE, "api_usd_per_month", "-inf"], "must be an amount of dollars"),
    "set NaN dollars": (["quota", "set", ALICE, "api_usd_per_month", "NaN"], "must be an amount of dollars"),
    "set negative": (["quota", "set", ALICE, "images_per_day", "-5"], "images_per_day cannot be negative (got -5)"),
    "set negative $": (["quota", "set", ALICE, "api_usd_per_month", "-1.50"], "cannot be negative"),
    "set exponent": (["quota", "set", ALICE, "images_per_day", "1e3"], "not '1e3'"),
    "set overflow": (["quota", "set", ALICE, "images_per_day", BIG], "is more than the maximum of 1,000,000 images"),
    "set overflow $": (["quota", "set", ALICE, "api_usd_per_month", BIG], "more than the maximum of $100,000"),
    "set over max": (["quota", "set", ALICE, "concurrent_jobs", "1001"], "more than the maximum of 1,000 jobs"),
    "set sub-cent": (["quota", "set", ALICE, "api_usd_per_month", "0.001"], "less than $0.01"),
    "set rounds to 0": (["quota", "set", ALICE, "api_usd_per_month", "0.0000001"], "finer than a micro-dollar"),
    "set jobs 0": (["quota", "set", ALICE, "concurrent_jobs", "0"], "concurrent_jobs must be at least 1"),
    "set unknown limit": (["quota", "set", ALICE, "images_per_week", "5"], "unknown limit 'images_per_week'"),
    # quota grant USER images|gpu-seconds|usd AMOUNT
    "grant nan": (["quota", "grant", ALICE, "images", "nan"], "a grant must be a whole number of images"),
    "grant inf $": (["quota", "grant", ALICE, "usd", "inf"], "a grant must be an amount of dollars"),
    "grant negative": (["quota", "grant", ALICE, "images", "-3"], "a grant cannot be negative"),
    "grant zero": (["quota", "grant", ALICE, "images", "0"], "a grant must be at least 1 image"),
    "grant overflow s": (["quota", "grant", ALICE, "gpu-seconds", BIG], "more than the maximum of 8,640,000 seconds"),
    "grant overflow $": (["quota", "grant", ALICE, "usd", BIG], "more than the maximum of $100,000"),
    "grant sub-cent": (["quota", "grant", ALICE, "usd", "0.004"], "less than $0.01"),
    "grant rounds to 0": (["quota", "grant", ALICE, "usd", "0.0000001"], "finer than a micro-dollar"),
    "grant unknown kind": (["quota", "grant", ALICE, "credits", "5"], "grant images, gpu-seconds or usd"),
    # user keys, checked before any write
    "unknown platform": (["quota", "set", "irc:bob", "images_per_day", "5"], "'irc:bob' is not a user key"),
    "empty discord id": (["ban", "discord:"], "'discord:' names no discord user"),
    "slack without user": (["quota", "set", "slack:T1", "images_per_day", "5"], "needs the workspace and the user"),
    "slack empty team": (["ban", "slack::U1"], "needs the workspace and the user"),
    "slack empty user": (["quota", "show", "slack:T1:"], "needs the workspace and the user"),
    # a user nobody has seen: nothing to grant to, reset or unban
    "grant never seen": (["quota", "grant", "console:bob", "images", "5"], "console:bob has never used this bot"),
    "reset never seen": (["quota", "reset", "console:bob"], "console:bob has never used this bot"),
    "unban never seen": (["unban", "console:bob"], "is not banned and has never used this bot"),
}


@pytest.mark.parametrize("words", [w for w, _ in REFUSED.values()], ids=list(REFUSED))
async def test_bad_admin_input_is_one_line_exit_1_and_writes_nothing(
    cli: tuple[Path, Path], capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    config, database = cli
    expected = dict((" ".join(w), e) for w, e in REFUSED.values())[" ".join(words)]
    before = _snapshot(database)
    code, out, err = await _run(config, capsys, words)
    assert code == 1, (out, err)
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "charged" not in err
    assert out == ""
    assert _snapshot(database) == before


async def _run(config: Path, capsys: pytest.CaptureFixture[str], words: list[str]) -> tuple[int, str, str]:
    # main() runs its own event loop, so it runs in a thread here, as it would in a shell.
    return await asyncio.to_thread(_admin, config, capsys, *words)


async def test_a_flag_without_its_value_is_an_error(cli: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, database = cli
    before = _snapshot(database)
    code, out, err = await _run(config, capsys, ["spend", "--month"])
    assert code == 2 and "--month needs a month" in err and out == ""
    code, out, _ = await _run(config, capsys, ["spend", "--month", "2026-11"])
    assert code == 0 and "2026-11" in out
    assert _snapshot(database) == before


async def test_good_amounts_at_the_bounds_are_written(
    cli: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = cli
    code, out, err = await _run(config, capsys, ["quota", "set", ALICE, "images_per_day", "1000000"])
    assert code == 0, err
    assert "images today: 1 of 1000000 images used" in out
    code, out, err = await _run(config, capsys, ["quota", "grant", ALICE, "usd", "0.01"])
    assert code == 0 and out.startswith("Granted $0.01."), err
    code, out, err = await _run(config, capsys, ["quota", "set", ALICE, "api_usd_per_month", "$100000"])
    assert code == 0 and "of $100000.00 used" in out, (out, err)


async def test_a_never_seen_user_is_reported_and_can_be_set_up_ahead(
    cli: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = cli
    code, out, _ = await _run(config, capsys, ["quota", "show", "console:bob"])
    assert code == 0 and "Quota for console:bob (tier: default) — has never used this bot" in out
    code, out, _ = await _run(config, capsys, ["quota", "show", ALICE])
    assert code == 0 and "never used" not in out
    code, out, _ = await _run(config, capsys, ["quota", "set", "console:bob", "images_per_day", "5"])
    assert code == 0 and out.startswith("Limit set. It applies from their first request.")
    code, out, _ = await _run(config, capsys, ["ban", "console:carol"])
    assert code == 0
    assert (
        out.strip()
        == "console:carol banned. console:carol has not used this bot yet: the ban applies from their first request."
    )
    code, out, _ = await _run(config, capsys, ["ban", ALICE])
    assert code == 0 and out.strip() == f"{ALICE} banned."


async def test_admin_credits_without_a_key_says_so(cli: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = cli
    code, out, err = await _run(config, capsys, ["credits"])
    assert code == 1 and out == ""
    assert err.strip() == "BFL_API_KEY is not set, so the BFL balance cannot be read: set it in the environment."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quota grant <@U0BOB|bob> images nan", "a grant must be a whole number of images, not 'nan'"),
        ("quota set U0BOB api_usd_per_month 1e400", "must be an amount of dollars"),
        ("quota grant U0NOBODY usd 5", "slack:T1:U0NOBODY has never used this bot"),
        ("ban slack:T1", "needs the workspace and the user"),
    ],
)
async def test_chat_admin_input_is_checked_the_same_way(make_engine: EngineFactory, text: str, expected: str) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    bob = Requester(Platform.SLACK, "U0BOB", guild_id="T1")
    await wait_terminal(engine, (await engine.submit(bob, ImageRequest("a dog", "schnell"))).job_id)
    database = engine.database_path
    before = _snapshot(database)
    admin = Requester(Platform.SLACK, "U0ADMIN", guild_id="T1", is_admin=True)
    with pytest.raises(EngineError) as caught:
        await Commands(engine).admin(admin, text)
    message = error_message(caught.value, engine.capabilities())
    assert expected in message and "charged" not in message
    assert _snapshot(database) == before
