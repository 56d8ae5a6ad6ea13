"""`flux-bot run` as systemd runs it: a real process, a fake NOTIFY_SOCKET, SIGSTOP as a blocked loop, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from engine.backup import list_backups
from tests.fakes.bfl_server import API_KEY, FakeBfl
from tests.fakes.slack_server import BOT_TOKEN

WATCHDOG_USEC = 300_000  # pings every 0.15 s
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # sun_path holds about 107 bytes: keep it short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "notify"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()
        os.unlink(os.path.join(folder, "notify"))
        os.rmdir(folder)


async def until(sock: socket.socket, message: str, limit_s: float = 60.0) -> list[str]:
    """Datagrams up to and including `message` (the limit only guards against a hung test)."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    while message not in seen:
        seen.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), limit_s)).decode())
    return seen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_stopped(pid: int) -> None:
    """Until the kernel reports the process as stopped: from then on it cannot send anything."""
    while process_state(pid) != "T":
        await asyncio.sleep(0.01)


async def test_run_reports_ready_pings_only_while_running_and_stops_cleanly(
    tmp_path: Path, notify_socket: socket.socket
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
            "NOTIFY_SOCKET": notify_socket.getsockname(),
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
            first = await until(notify_socket, "WATCHDOG=1")
            assert first[0] == "READY=1"
            assert "STATUS=serving" in first
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{ops_port}/healthz") as health,
            ):
                assert health.status == 200, await health.text()

            os.kill(bot.pid, signal.SIGSTOP)  # the whole process, event loop included, is frozen
            await wait_stopped(bot.pid)
            drain(notify_socket)  # whatever it sent before it stopped
            await asyncio.sleep(4 * WATCHDOG_USEC / 2_000_000)
            assert drain(notify_socket) == []  # four intervals, no ping: systemd would restart it
            os.kill(bot.pid, signal.SIGCONT)
            await until(notify_socket, "WATCHDOG=1")  # running again, pinging again

            bot.send_signal(signal.SIGTERM)
            await until(notify_socket, "STOPPING=1")
            assert await asyncio.wait_for(bot.wait(), 60) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
            log.close()
    # The scheduled backup ran at start (there was none yet).
    assert len(list_backups(state / "backups")) == 1, (tmp_path / "bot.log").read_text()
