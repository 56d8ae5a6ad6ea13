"""`flux-bot` as operators start it: `run` as systemd runs it (a real process, a fake NOTIFY_SOCKET, SIGSTOP as a
blocked loop, SIGTERM), `run` from a folder with its config.toml, the config search order and the first line that
names the file and the database, the demo model only when nothing real is configured."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from bot.__main__ import main
from bot.doctor import local_lane_check, run_checks
from engine.backends.factory import LocalLane, local_lane, serving_settings
from engine.backup import list_backups
from engine.config import Secrets, load_settings
from engine.models import BackendKind
from engine.service import Engine
from engine.store import Store
from tests.fakes.bfl_server import API_KEY, FakeBfl
from tests.fakes.notify_socket import NotifyListener
from tests.fakes.slack_server import BOT_TOKEN

WATCHDOG_USEC = 300_000  # pings every 0.15 s
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_stopped(pid: int) -> None:
    """Until the kernel reports the process as stopped: from then on it cannot send anything."""
    while process_state(pid) != "T":
        await asyncio.sleep(0.01)


async def test_run_reports_ready_pings_only_while_running_and_stops_cleanly(
    tmp_path: Path, notify_listener: NotifyListener
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    ops_port = free_port()
    config.write_text(
        f'[bot]\nstate_dir = "{state}"\n[routing]\nlocal_enabled = false\n[slack]\nport = 0\n'
        f"[ops]\nhttp_port = {ops_port}\n"
    )
    async with FakeBfl() as bfl:
        env = {
            **os.environ,
            "NOTIFY_SOCKET": notify_listener.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_SIGNING_SECRET": "signing-secret",
            "BFL_API_KEY": API_KEY,
            "BFL_API_URL": bfl.api_url,
        }
        env.pop("WATCHDOG_PID", None)
        log = (tmp_path / "bot.log").open("wb")
        bot = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "--config", str(config), "run", cwd=REPO, env=env, stderr=log
        )
        try:
            first = await notify_listener.until("WATCHDOG=1")
            assert first[0] == "READY=1"
            assert "STATUS=serving" in first
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{ops_port}/healthz") as health,
            ):
                assert health.status == 200, await health.text()

            os.kill(bot.pid, signal.SIGSTOP)  # the whole process, event loop included, is frozen
            await wait_stopped(bot.pid)
            notify_listener.drain()  # whatever it sent before it stopped
            await asyncio.sleep(4 * WATCHDOG_USEC / 2_000_000)
            assert notify_listener.drain() == []  # four intervals, no ping: systemd would restart it
            os.kill(bot.pid, signal.SIGCONT)
            await notify_listener.until("WATCHDOG=1")  # running again, pinging again

            bot.send_signal(signal.SIGTERM)
            await notify_listener.until("STOPPING=1")
            assert await asyncio.wait_for(bot.wait(), 60) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
            log.close()
    # The scheduled backup ran at start (there was none yet).
    assert len(list_backups(state / "backups")) == 1, (tmp_path / "bot.log").read_text()


CHAT_AND_CONFIG_VARIABLES = (
    "DISCORD_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
    "SLACK_SIGNING_SECRET",
    "BFL_API_KEY",
    "BFL_API_URL",
    "FLUX_BOT_CONFIG",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any token, key or config selection, and able to import this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k not in CHAT_AND_CONFIG_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


async def test_run_in_a_folder_reads_its_config_toml_and_serves_the_api_image_not_the_demo_models(
    tmp_path: Path,
) -> None:
    """`printf '/imagine a red cat\n' | BFL_API_KEY=x BFL_API_URL=... ./scripts/run`, from the folder of the file."""
    (tmp_path / "config.toml").write_text("[policy]\nmax_prompt_chars = 10\n")
    async with FakeBfl(api_key="x") as bfl:
        bot = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            cwd=tmp_path,
            env=clean_env(BFL_API_KEY="x", BFL_API_URL=bfl.api_url),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(bot.communicate(b"/imagine a red cat\n/imagine a red cat on a mat\n"), 120)
        posts = bfl.count("POST")
    lines = out.decode().splitlines()
    assert bot.returncode == 0, (out, err)
    state = tmp_path / "state"  # relative to the file
    assert lines[0] == f"flux-bot: config {tmp_path / 'config.toml'} (./config.toml); database {state / 'flux-bot.db'}"
    # One line says that the GPU lane is off and how to add weights; no demo model anywhere.
    off = [line for line in lines if "local generation is off" in line]
    assert len(off) == 1 and "[local] model" in off[0] and "flux-bot[gpu]" in off[0], lines
    assert "DEMO" not in out.decode() and not (state / "demo-model").exists()
    # The short prompt went to the API and the saved image is the API's; the long one was refused by the file's limit.
    assert posts == 1
    saved = [line for line in lines if ": saved " in line]
    assert len(saved) == 1, lines
    with Image.open(saved[0].split(": saved ")[1].split(", ")[0]) as image:
        assert image.size == (8, 8) and image.getpixel((0, 0)) == (200, 40, 40)  # tests/fakes/bfl_server.sample_image
        assert image.text["backend"] == "api"
    refusal = [line for line in lines if "the limit is 10" in line]
    assert len(refusal) == 1 and "not charged" in refusal[0], lines


def first_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.splitlines()[0]


def test_the_config_file_is_found_where_people_edit_it_and_the_first_line_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config, then $FLUX_BOT_CONFIG, then ./config.toml, then /etc/flux-bot/config.toml, then the defaults."""
    for name in CHAT_AND_CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    files = {}
    for name in ("option", "variable", "here", "etc"):
        folder = tmp_path / name
        folder.mkdir()
        files[name] = folder / "config.toml"
        files[name].write_text('[bot]\nstate_dir = "data"\n')  # relative: to the file's folder
    work = tmp_path / "here"  # the working directory, holding ./config.toml
    monkeypatch.chdir(work)
    system = files["etc"]

    def line(name: str, how: str) -> str:
        return f"flux-bot: config {files[name]} ({how}); database {files[name].parent / 'data' / 'flux-bot.db'}"

    monkeypatch.setenv("FLUX_BOT_CONFIG", str(files["variable"]))
    # The global options work before and after the subcommand.
    for argv in (["--config", str(files["option"]), "doctor"], ["doctor", "--config", str(files["option"])]):
        assert main(argv, system_config=system) == 1  # the database does not exist yet (see below)
        assert first_line(capsys) == line("option", "--config")
    main(["doctor", "--log-level", "ERROR"], system_config=system)
    assert first_line(capsys) == line("variable", "$FLUX_BOT_CONFIG")
    monkeypatch.delenv("FLUX_BOT_CONFIG")
    main(["doctor"], system_config=system)
    assert first_line(capsys) == line("here", "./config.toml")
    files["here"].unlink()
    main(["doctor"], system_config=system)
    assert first_line(capsys) == line("etc", str(system))
    system.unlink()
    main(["doctor"], system_config=system)
    assert first_line(capsys) == (
        f"flux-bot: config built-in defaults (no --config, $FLUX_BOT_CONFIG, ./config.toml or {system}); "
        f"database {work / 'state' / 'flux-bot.db'}"
    )
    # A file named by the option or the variable must exist: it is never silently replaced by another one.
    assert main(["run", "--config", str(tmp_path / "typo.toml")]) == 2
    assert f"{tmp_path / 'typo.toml'}: (file): file not found" in capsys.readouterr().err


def test_admin_and_doctor_never_create_an_empty_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in CHAT_AND_CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "bot" / "config.toml"
    config.parent.mkdir()
    config.write_text('[bot]\nstate_dir = "state"\n')
    database = tmp_path / "bot" / "state" / "flux-bot.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths follow the file, not the working directory

    for words in (["quota", "show", "console:alice"], ["spend"], ["backup"], ["jobs"]):
        assert main(["admin", "--config", str(config), *words]) == 1
        captured = capsys.readouterr()
        assert f"no database at {database}" in captured.err and "flux-bot run" in captured.err
        assert "Traceback" not in captured.err and captured.out == ""
    assert main(["doctor", "--config", str(config)]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[FAIL] database")]
    assert failures == [
        f"[FAIL] database {database}: does not exist — start the bot once (`flux-bot run`) to create "
        "it, or select the config file of the existing one (--config, $FLUX_BOT_CONFIG)"
    ]
    assert not database.exists() and not database.parent.exists()

    # `admin restore` is the one command that makes the database: from a checked copy.
    copy = tmp_path / "copy.db"

    async def make_copy() -> None:
        store = await Store.open(copy)
        await store.close()

    asyncio.run(make_copy())
    assert main(["admin", "--config", str(config), "restore", str(copy)]) == 0
    assert database.is_file()
    capsys.readouterr()
    # Scripts read admin's output: the config line comes first only with --verbose, which also works after the words.
    assert main(["admin", "--config", str(config), "quota", "show", "console:alice"]) == 0
    plain = capsys.readouterr().out
    assert not plain.startswith("flux-bot: config") and "console:alice" in plain
    assert main(["admin", "quota", "show", "console:alice", "--config", str(config), "--verbose"]) == 0
    verbose = capsys.readouterr().out.splitlines()
    assert verbose[0] == f"flux-bot: config {config} (--config); database {database}"
    assert "\n".join(verbose[1:]) == plain.rstrip("\n")


@pytest.mark.parametrize("admin", [False, True])
def test_run_at_the_console_is_an_admin_session_only_with_admin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], admin: bool
) -> None:
    for name in CHAT_AND_CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.toml").write_text("[routing]\nlocal_enabled = false\n")  # no backend: nothing to start
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/admin jobs\n"))
    assert main(["run", *(["--admin"] if admin else [])]) == 0
    out = capsys.readouterr().out
    assert ("only admins can do this" in out) is not admin, out


async def test_a_chat_token_or_a_bfl_key_without_weights_turns_the_local_lane_off(tmp_path: Path) -> None:
    """The demo model never serves real users by accident: with a chat token or a key and no weights, no local lane."""
    config = tmp_path / "config.toml"
    config.write_text("[routing]\nmax_local_wait_s = 600.0\n")  # the GPU lane would win every job if it existed
    async with FakeBfl() as bfl:
        for env in ({"SLACK_BOT_TOKEN": BOT_TOKEN}, {"DISCORD_TOKEN": "t0ken-123"}, {"BFL_API_KEY": API_KEY}):
            settings, secrets = load_settings(config, {**env, "BFL_API_URL": bfl.api_url})
            assert local_lane(settings, secrets) is LocalLane.NO_WEIGHTS
            engine = await Engine.open(serving_settings(settings, secrets), secrets)
            try:
                assert not engine.demo and engine._scheduler.backend(BackendKind.LOCAL) is None
            finally:
                await engine.close()
            lane_check = local_lane_check(settings, secrets)
            if secrets.bfl_api_key:
                assert lane_check.line().startswith("[info] local worker: off, API only"), lane_check
            else:  # a chat token alone: nothing could make an image, and doctor fails for it
                assert lane_check.line().startswith("[FAIL] local worker: off (no [local] model) and no BFL API")
        assert not (tmp_path / "state" / "demo-model").exists()
    # Nothing configured at all: the demo model, and doctor says why.
    settings, secrets = load_settings(config, {})
    assert local_lane(settings, secrets) is LocalLane.DEMO_UNCONFIGURED
    [lane_check] = [c for c in await run_checks(settings, secrets) if c.what.startswith("local worker")]
    assert "demo model, because nothing is configured" in lane_check.what


async def test_the_demo_model_by_request_marks_every_chat_result_as_noise(tmp_path: Path) -> None:
    """`[local] model = "demo"` with chat tokens: the real demo model, and each Discord and Slack result says so."""
    from bot.discord_app import DiscordFrontEnd
    from bot.slack_app import SlackFrontEnd
    from tests.bot.test_discord import command, content, feed, imagine, wait_followup
    from tests.bot.test_slack import SECRET, finished, job_id_of, slash
    from tests.fakes.discord_server import FakeDiscord
    from tests.fakes.slack_server import FakeSlack

    config = tmp_path / "config.toml"
    config.write_text('[local]\nmodel = "demo"\ndevice = "cpu"\n[routing]\napi_enabled = false\n')
    settings, secrets = load_settings(config, {"SLACK_BOT_TOKEN": BOT_TOKEN, "DISCORD_TOKEN": "t0ken-123"})
    [lane_check] = [c for c in await run_checks(settings, Secrets()) if c.what.startswith("local worker")]
    assert "demo model by request" in lane_check.what
    engine = await Engine.open(settings, secrets)
    try:
        assert engine.demo
        async with FakeSlack() as slack_api, FakeDiscord() as discord_api:
            slack = SlackFrontEnd(
                engine,
                bot_token=BOT_TOKEN,
                signing_secret=SECRET,
                client_base_url=slack_api.base_url,
                edit_interval_s=0,
            )
            discord = DiscordFrontEnd(engine, edit_interval_s=0.0)
            try:
                await slack.start(port=0)
                await discord.client.login("t0ken-123")
                slack_job = job_id_of(await slash(slack, "/imagine", "a red cat --aspect 16:9 --steps 1"))
                token = feed(discord, command("imagine", imagine("a red cat", steps=1, aspect="16:9")))
                slack_result = await finished(slack, slack_api, slack_job)
                discord_result = await wait_followup(discord_api, token)
            finally:
                await slack.close()
                await discord.close()
        comment = slack_api.named("files.completeUploadExternal")[0].fields["initial_comment"]
        for text in (slack_result.fields["text"], comment, content(discord_result)):
            assert "demo model: random weights, this image is noise" in text, text
    finally:
        await engine.close()
