"""`flux-bot doctor` against real files and the fake BFL, Discord and Slack servers: one line per check, exit code."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from bot.__main__ import main
from bot.doctor import Check, Status, failed, run_checks
from engine.backup import backup_sync
from engine.config import Secrets, Settings
from engine.ledger import Reservation
from engine.models import BackendKind, Job, JobState, Mode, Platform, Requester, ResolvedRequest, Resource
from engine.store import Store
from tests.conftest import SettingsFactory
from tests.fakes.bfl_server import API_KEY, FakeBfl
from tests.fakes.discord_server import BOT_ID, FakeDiscord
from tests.fakes.slack_server import BOT_TOKEN, FakeSlack
from tests.fakes.tiny_flux import build_tiny_flux

DISCORD_TOKEN = "discord-bot-token-123"


def by_topic(checks: list[Check], topic: str) -> Check:
    matching = [check for check in checks if check.what.startswith(topic)]
    assert len(matching) == 1, (topic, checks)
    return matching[0]


def test_a_broken_config_is_one_failed_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[scheduler]\nmax_running_per_user = "lots"\n')
    assert main(["--config", str(config), "doctor"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"[FAIL] configuration {config}: scheduler.max_running_per_user")
    assert "fix or remove that key" in out[0]


async def test_a_missing_bfl_key_fails_with_what_to_set(make_settings: SettingsFactory) -> None:
    # With nothing else to serve (the local lane off), a missing key means no image can be made.
    checks = await run_checks(make_settings(routing={"local_enabled": False}), Secrets())
    line = by_topic(checks, "BFL API").line()
    assert line.startswith("[FAIL] BFL API: BFL_API_KEY is not set, and no local model can serve either")
    assert "put BFL_API_KEY=... in the environment" in line and "[local] model" in line
    assert failed(checks)
    # The demo model serves while nothing real is configured: a warning, not a failure.
    demo_settings = make_settings()
    store = await Store.open(demo_settings.bot.database_path)  # doctor fails on a missing database
    await store.close()
    demo = await run_checks(demo_settings, Secrets())
    line = by_topic(demo, "BFL API").line()
    assert line.startswith("[warn] BFL API: BFL_API_KEY is not set; jobs run on the local lane")
    assert (
        "API-only models (pro, ultra, kontext-pro, kontext-max) are refused" in line and "api_enabled = false" in line
    )
    assert not failed(demo)
    # A chat token with no weights: the demo model does not serve chat users, so nothing can.
    chat = await run_checks(make_settings(), Secrets(discord_token=DISCORD_TOKEN))
    assert by_topic(chat, "BFL API").status is Status.FAIL
    # A local-only bot says so and is not failed for it.
    local_only_settings = make_settings(routing={"api_enabled": False})
    store = await Store.open(local_only_settings.bot.database_path)  # doctor fails on a missing database
    await store.close()
    local_only = await run_checks(local_only_settings, Secrets())
    assert by_topic(local_only, "BFL API").status is Status.INFO
    assert not failed(local_only)


async def test_healthy_setup_passes_every_check(make_settings: SettingsFactory, tmp_path: Path) -> None:
    async with FakeBfl() as bfl, FakeDiscord(), FakeSlack() as slack:
        settings = make_settings(bfl={"api_url": bfl.api_url})
        store = await Store.open(settings.bot.database_path)
        await store.close()
        backup_sync(settings.bot.database_path, settings.bot.state_dir / "backups", keep=2)
        secrets = Secrets(
            discord_token=DISCORD_TOKEN, slack_bot_token=BOT_TOKEN, slack_signing_secret="s3cr3t", bfl_api_key=API_KEY
        )
        checks = await run_checks(settings, secrets, slack_api_url=slack.base_url)
    lines = [check.line() for check in checks]
    assert not failed(checks), lines
    assert by_topic(checks, "database").line().endswith("integrity check passed")
    assert by_topic(checks, "BFL API").line() == "[ok] BFL API: key accepted, $12.345 of credits left"
    assert by_topic(checks, "backups").status is Status.OK
    assert by_topic(checks, "Discord").line() == f"[ok] Discord: token accepted (bot flux-bot, id {BOT_ID})"
    assert by_topic(checks, "Slack").status is Status.OK
    assert by_topic(checks, "local worker").status is Status.INFO  # the demo model, said plainly
    assert not any(secret in line for line in lines for secret in secrets.values())


async def test_refused_tokens_fail_without_showing_them(make_settings: SettingsFactory) -> None:
    async with FakeDiscord() as discord_api, FakeSlack() as slack:
        discord_api.refused_bot_tokens.add(DISCORD_TOKEN)
        secrets = Secrets(discord_token=DISCORD_TOKEN, slack_bot_token="xoxb-revoked")
        checks = await run_checks(make_settings(routing={"api_enabled": False}), secrets, slack_api_url=slack.base_url)
    lines = [check.line() for check in checks]
    assert by_topic(checks, "Discord").line().startswith("[FAIL] Discord: the token was refused — reset it")
    assert (
        by_topic(checks, "Slack: the bot token")
        .line()
        .startswith("[FAIL] Slack: the bot token was refused (invalid_auth)")
    )
    assert by_topic(checks, "Slack: neither").status is Status.FAIL  # HTTP mode needs the signing secret
    assert not any(DISCORD_TOKEN in line or "xoxb-revoked" in line for line in lines)


async def test_a_rejected_bfl_key_and_an_unreachable_bfl_fail(make_settings: SettingsFactory) -> None:
    async with FakeBfl() as bfl:
        checks = await run_checks(make_settings(bfl={"api_url": bfl.api_url}), Secrets(bfl_api_key="wrong-key-000"))
    assert by_topic(checks, "BFL API").line().startswith("[FAIL] BFL API: BFL refused the API key (HTTP 403)")
    # The fake has stopped: nothing listens on its port any more.
    checks = await run_checks(make_settings(bfl={"api_url": bfl.api_url}), Secrets(bfl_api_key=API_KEY))
    assert by_topic(checks, "BFL API").line().startswith("[FAIL] BFL API: cannot reach BFL")


async def test_a_damaged_database_names_the_backup_to_restore(make_settings: SettingsFactory) -> None:
    settings = make_settings(routing={"api_enabled": False})
    store = await Store.open(settings.bot.database_path)
    await store.close()
    saved = backup_sync(settings.bot.database_path, settings.bot.state_dir / "backups", keep=2)
    settings.bot.database_path.write_bytes(b"SQLite format 3\0" + os.urandom(4096))
    check = by_topic(await run_checks(settings, Secrets()), "database")
    assert check.status is Status.FAIL
    assert check.hint == f"stop the bot, then `flux-bot admin restore {saved}`"


async def test_local_weights_are_opened_and_a_damaged_file_is_named(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    folder = build_tiny_flux(tmp_path / "tiny")
    settings: Settings = make_settings(routing={"api_enabled": False}, local={"model": str(folder), "device": "cpu"})
    weights = by_topic(await run_checks(settings, Secrets()), "local weights")
    assert weights.status is Status.OK and "tensors readable" in weights.what

    damaged = sorted(folder.rglob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    weights = by_topic(await run_checks(settings, Secrets()), "local weights")
    assert weights.status is Status.FAIL
    assert str(damaged.relative_to(folder)) in weights.what
    assert weights.hint == "delete that file and download the weights again"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: the check lists it instead")
async def test_a_real_model_without_a_gpu_fails(make_settings: SettingsFactory, tmp_path: Path) -> None:
    folder = build_tiny_flux(tmp_path / "tiny")
    settings = make_settings(routing={"api_enabled": False}, local={"model": str(folder), "device": "auto"})
    check = by_topic(await run_checks(settings, Secrets()), "GPU")
    # This machine has no GPU (CI neither); on a GPU host the line lists the cards instead.
    assert check.line().startswith("[FAIL] GPU: no CUDA device is visible — install the NVIDIA driver")


def test_doctor_exits_0_on_the_default_demo_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "BFL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FLUX_BOT_CONFIG", raising=False)
    config = tmp_path / "config.toml"
    config.write_text('[bot]\nstate_dir = "state"\n')  # everything else at its default

    async def first_start() -> None:  # a bot that has started once (doctor never creates the database)
        await (await Store.open(tmp_path / "state" / "flux-bot.db")).close()

    asyncio.run(first_start())
    assert main(["--config", str(config), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out, out
    assert "[warn] BFL API: BFL_API_KEY is not set" in out
    assert any(line.startswith(("[info] GPU", "[ok] GPU")) for line in out.splitlines()), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: the check lists it instead")
async def test_a_cpu_box_gets_a_gpu_line_for_the_demo_model(make_settings: SettingsFactory) -> None:
    check = by_topic(await run_checks(make_settings(), Secrets()), "GPU")
    assert check.line() == "[info] GPU: no CUDA GPU: local generation runs on the CPU (demo model only)"
    off = by_topic(await run_checks(make_settings(routing={"local_enabled": False}), Secrets()), "GPU")
    assert off.line() == "[info] GPU: not used ([routing] local_enabled = false)"


async def test_the_image_store_is_one_line(make_settings: SettingsFactory) -> None:
    settings: Settings = make_settings(bot={"keep_images_days": 7})
    empty = by_topic(await run_checks(settings, Secrets()), "images")
    assert empty.line() == f"[info] images: none stored yet in {settings.bot.images_dir}; kept 7 days"
    settings.bot.images_dir.mkdir(parents=True)
    for name, size, day in (("ja.png", 3 * 2**20, 5), ("jb.png", 2**19, 9)):
        path = settings.bot.images_dir / name
        path.write_bytes(b"x" * size)
        stamp = datetime(2026, 11, day, 12, tzinfo=UTC).timestamp()
        os.utime(path, (stamp, stamp))
    line = by_topic(await run_checks(settings, Secrets()), "images").line()
    assert line == f"[ok] images: 2 files, 3.5 MB in {settings.bot.images_dir}, the oldest from 2026-11-05; kept 7 days"


def _api_job(job_id: str) -> Job:
    who = Requester(Platform.DISCORD, "alice", guild_id="g1")
    request = ResolvedRequest("p", "pro", 1024, 1024, "1:1", 28, None, 1, Mode.AUTO)
    return Job(job_id, who, request, JobState.QUEUED, BackendKind.API, "test", created_at=0.0)


def _api_reservations(usd: int) -> list[Reservation]:
    return [Reservation(Resource.USD_MICROS, usd, BackendKind.API, "2026-11-26", "2026-11")]


async def test_doctor_reports_totals_that_differ_from_the_ledger(make_settings: SettingsFactory) -> None:
    settings = make_settings(routing={"api_enabled": False})
    store = await Store.open(settings.bot.database_path)
    try:
        await store.submit_job(_api_job("a1"), _api_reservations(40_000), [], None)
    finally:
        await store.close()
    [check] = [c for c in await run_checks(settings, Secrets()) if c.what.startswith("ledger totals")]
    assert check.status is Status.OK
    with sqlite3.connect(settings.bot.database_path) as db:
        db.execute("UPDATE usage SET posted = posted + 1 WHERE scope_kind = 'global' AND resource = 'usd_micros'")
    [check] = [c for c in await run_checks(settings, Secrets()) if c.what.startswith("ledger totals")]
    assert check.status is Status.FAIL
    assert "1 differ from the ledger's lines, e.g. global, usd_micros, 2026-11" in check.what
    assert check.hint is not None and "flux-bot admin backup" in check.hint


async def test_gpu_hosts_on_nats_the_connection_the_streams_and_the_live_hosts(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    from engine.backends.factory import build_backends
    from tests.fakes.gpu_hosts import FAST_LANE, GpuHosts
    from tests.fakes.nats_server import NatsServer, free_port

    unreachable = make_settings(nats={"url": f"nats://127.0.0.1:{free_port()}"}, routing={"api_enabled": False})
    lines = [check.line() for check in await run_checks(unreachable, Secrets())]
    assert any(line.startswith("[FAIL] GPU hosts: cannot connect to NATS at nats://127.0.0.1:") for line in lines)
    assert any(
        line.startswith("[info] local worker: none on this host; the GPU lane is the GPU hosts") for line in lines
    )

    server = NatsServer(tmp_path / "nats")
    await server.start()
    hosts = GpuHosts(tmp_path / "hosts", server.url)
    try:
        settings = make_settings(nats={"url": server.url, **FAST_LANE}, routing={"api_enabled": False})
        fresh = {check.what: check for check in await run_checks(settings, Secrets())}
        assert fresh[f"NATS: connected to {server.url}"].status is Status.OK
        assert any(what.startswith("NATS: the GPU lane's FLUX_JOBS, FLUX_RESULTS") for what in fresh)

        backends, _ = await build_backends(settings, Secrets())
        pool = backends[BackendKind.LOCAL]
        await pool.start()  # the bot creates the lane's streams and buckets
        try:
            none_yet = {check.what: check for check in await run_checks(settings, Secrets())}
            assert none_yet["GPU hosts: none online"].status is Status.WARN
            host = await hosts.start("gpu-a", synthetic_s=0.1)
            for _ in range(600):
                if pool.capacity():
                    break
                await asyncio.sleep(0.05)
            online = [check for check in await run_checks(settings, Secrets()) if check.what.startswith("GPU host ")]
            assert [(check.status, check.what) for check in online] == [
                (Status.OK, "GPU host gpu-a: 0 of 1 GPUs busy, serving schnell (flux-bot 0.1.0, 0 recycles)")
            ]
            assert await hosts.stop(host) == 0
        finally:
            await pool.close()
    finally:
        await hosts.close()
        await server.stop()
