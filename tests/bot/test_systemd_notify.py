"""sd_notify over a real Unix datagram socket: READY, watchdog pings gated on the event loop and the database."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from pathlib import Path

from bot.systemd_notify import Notifier, watchdog_interval_s, watchdog_loop
from engine.models import BackendKind
from tests.conftest import EngineFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.notify_socket import NotifyListener

INTERVAL_S = 0.1


def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


async def test_messages_reach_a_path_socket(notify_listener: NotifyListener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_listener.address})
    try:
        assert notifier.ready()
        assert await notify_listener.recv() == "READY=1"
        assert notifier.status("serving\nwell")
        assert await notify_listener.recv() == "STATUS=serving well"
        assert notifier.stopping()
        assert await notify_listener.recv() == "STOPPING=1"
    finally:
        notifier.close()


async def test_messages_reach_an_abstract_socket() -> None:
    name = f"flux-bot-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready()
        received = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 10)
        assert received == b"READY=1"
    finally:
        notifier.close()
        sock.close()


async def test_missing_listener_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"))
    assert notifier.ready() is False
    notifier.close()


async def test_watchdog_pings_only_while_the_loop_runs(
    notify_listener: NotifyListener, make_engine: EngineFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_listener.address})
    notifier.ready()
    assert await notify_listener.recv() == "READY=1"
    task = asyncio.create_task(watchdog_loop(notifier, engine, INTERVAL_S))
    try:
        assert await notify_listener.recv() == "WATCHDOG=1"
        notify_listener.drain()
        # Block the event loop for three intervals: the loop's thread is ours, so nothing can be sent meanwhile,
        # and anything a sender on another thread had sent would be waiting in the socket now.
        time.sleep(3 * INTERVAL_S)  # noqa: ASYNC251 - blocking the loop is the point
        assert notify_listener.drain() == []
        assert await notify_listener.recv() == "WATCHDOG=1"  # the loop runs again, so the pings resume
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()


class _DeadStore:
    def __init__(self) -> None:
        self.calls = 0
        self.broken = True

    async def get_control(self, name: str) -> str | None:
        self.calls += 1
        if self.broken:
            raise sqlite3.OperationalError("unable to open database file")
        return None


class _FakeEngine:
    def __init__(self) -> None:
        self.store = _DeadStore()

    async def heartbeat(self) -> None:
        await self.store.get_control("heartbeat")


async def test_no_ping_while_the_database_fails(notify_listener: NotifyListener) -> None:
    engine = _FakeEngine()
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_listener.address})
    task = asyncio.create_task(watchdog_loop(notifier, engine, INTERVAL_S))
    try:
        assert (await notify_listener.recv()).startswith("STATUS=database not answering")
        while engine.store.calls < 3:
            await asyncio.sleep(INTERVAL_S / 2)
        assert [m for m in notify_listener.drain() if m == "WATCHDOG=1"] == []
        engine.store.broken = False
        assert await notify_listener.recv() == "STATUS=serving"
        assert await notify_listener.recv() == "WATCHDOG=1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
