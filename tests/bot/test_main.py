"""`flux-bot run` as systemd runs it: a real process, a fake NOTIFY_SOCKET, SIGSTOP as a blocked loop, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from engine.backup import list_backups
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
