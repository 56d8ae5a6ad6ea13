"""`flux-bot admin review` and `flux-bot admin audit` at a shell, on the database of a bot that held an image."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.__main__ import main
from engine.models import BackendKind, ImageRequest, JobHeld, Platform, Requester
from tests.conftest import EngineFactory, SettingsFactory, wait_terminal
from tests.fakes.backends import ScriptedBackend


async def test_held_images_are_listed_decided_and_audited_from_the_shell(
    tmp_path: Path,
    make_engine: EngineFactory,
    make_settings: SettingsFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("BFL_API_KEY", "DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "FLUX_BOT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    settings = make_settings(review={"phrases": ["Mario"]})
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    alice = Requester(Platform.CONSOLE, "alice")
    held = [await engine.submit(alice, ImageRequest(f"Mario number {n}", "schnell")) for n in (1, 2)]
    for queued in held:
        assert isinstance(await wait_terminal(engine, queued.job_id), JobHeld)
    await engine.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[bot]\nstate_dir = "{settings.bot.state_dir}"\n[review]\nphrases = ["Mario"]\n')

    async def admin(*words: str) -> tuple[int, str, str]:
        # A thread of its own: the CLI runs its own event loop, as at a shell.
        code = await asyncio.to_thread(main, ["--config", str(config), "admin", *words])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await admin("review")
    assert code == 0
    assert f"{held[0].job_id} console:alice held: phrase 'Mario': Mario number 1" in out
    assert (await admin("review", "approve", held[0].job_id))[0] == 0
    code, out, _ = await admin("review", "reject-and-ban", held[1].job_id, "not", "here")
    assert code == 0 and "console:alice is banned" in out
    code, _, err = await admin("review", "approve", held[1].job_id)
    assert code == 1 and "was rejected: nothing to decide" in err and "Traceback" not in err
    code, out, _ = await admin("audit", "--action", "review")
    lines = out.strip().splitlines()
    assert [line.split()[3] for line in lines] == ["review.reject", "review.approve", "review.hold", "review.hold"]
    assert "reason=not here" in lines[0]
    code, _, err = await admin("audit", "--since", "yesterday")
    assert code == 1 and "--since must look like 2026-12-01" in err
