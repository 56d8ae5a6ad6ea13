"""One local worker process as the supervisor sees it: how frames reach it, the tasks that read them, how it ended.

The supervisor (supervisor.py) decides *when* workers start, serve, recycle and die; this module only talks to one.
A worker is reached through a `Transport`: the pipes of a child process the supervisor spawned (`ChildPipes`), or
the Unix socket of a worker that systemd runs as its own unit, `flux-bot worker --listen` (`UnitSocket`). Above
the transport, frames, timeouts, kills and graceful stops are the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from engine.backends.local.frames import read_message
from engine.backends.protocol import Message, ProtocolError, Shutdown, encode
from engine.errors import EngineError

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 10.0  # how long a worker may take to exit after `shutdown` (or its end of stream) before it is killed
STDERR_TAIL_LINES = 20
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class WorkerGone(EngineError):
    """The worker process ended (its end of the stream closed); the message says how."""


class Transport(Protocol):
    """How the supervisor reaches one worker process."""

    @property
    def pid(self) -> int: ...

    @property
    def reader(self) -> asyncio.StreamReader: ...  # the worker's frames

    @property
    def log(self) -> asyncio.StreamReader | None: ...  # its log, when it comes to us rather than to the journal

    @property
    def running(self) -> bool: ...

    async def write(self, data: bytes) -> None: ...

    def kill(self) -> None: ...

    async def wait(self) -> None:
        """Return once the process has exited."""

    def ended(self) -> str:
        """How the process ended, for a person: "exited with code 1", "was killed by SIGKILL"..."""

    def close(self) -> None: ...


class ChildPipes:
    """A worker the supervisor spawned: frames over its stdin/stdout, its log on stderr, its exit status known."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self._stdin = proc.stdin
        self.pid = proc.pid
        self.reader = proc.stdout
        self.log: asyncio.StreamReader | None = proc.stderr
        # Killed through a pidfd, not Process.kill(): that polls with waitpid() first and can reap a worker that has
        # just exited before asyncio's child watcher does, which then reports its status as 255.
        self._pidfd = -1
        with contextlib.suppress(OSError):  # already gone (ProcessLookupError), or a kernel without pidfds
            self._pidfd = os.pidfd_open(proc.pid)

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def write(self, data: bytes) -> None:
        self._stdin.write(data)
        await self._stdin.drain()

    def kill(self) -> None:
        if not self.running:
            return
        with contextlib.suppress(ProcessLookupError):  # it has exited; the child watcher has yet to say so
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                self._proc.kill()

    async def wait(self) -> None:
        await self._proc.wait()

    def ended(self) -> str:
        code = self._proc.returncode
        if code is None:
            return "stopped answering"
        if code < 0:
            return f"was killed by {_signal_name(-code)}"
        return f"exited with code {code}"

    def close(self) -> None:
        self._stdin.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class UnitSocket:
    """A worker run as its own systemd unit, reached through its Unix socket.

    The worker's pid comes from the socket itself (SO_PEERCRED) and is held as a pidfd: a kill can never hit a
    process that has since reused the number, and the pidfd turns readable when the worker exits, which is how a
    supervisor that is not its parent learns of it. Its exit status and its log belong to systemd (the journal).
    """

    def __init__(self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
        self.path = path
        self.reader = reader
        self.log: asyncio.StreamReader | None = None
        self._writer = writer
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._pidfd, self._exited.set)

    @classmethod
    async def connect(cls, path: Path) -> UnitSocket:
        """Attach to the worker listening on `path`; OSError when nothing listens there (yet)."""
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            credentials = writer.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
            pid, _, _ = _PEERCRED.unpack(credentials)
            return cls(path, reader, writer, pid)
        except BaseException:
            writer.close()
            raise

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def kill(self) -> None:
        if self._pidfd < 0 or not self.running:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The unit runs as another user. Without the connection the worker stops its job at the next step and
            # exits, and one stuck inside a step stops its watchdog pings, so systemd kills it after WatchdogSec.
            log.warning("worker pid %d at %s: not allowed to kill it; closing its connection", self.pid, self.path)
            self._writer.close()

    async def wait(self) -> None:
        await self._exited.wait()

    def ended(self) -> str:
        if self.running:
            return "stopped answering"
        return f"at {self.path} ended (how: journalctl _PID={self.pid})"

    def close(self) -> None:
        self._writer.close()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class WorkerProcess:
    """One worker process: its transport, the tasks that read it, and what the supervisor knows of it."""

    def __init__(self, slot: int, transport: Transport, on_exit: Callable[[WorkerProcess], None]) -> None:
        self.slot = slot
        self.transport = transport
        self.inbound: asyncio.Queue[Message | None] = asyncio.Queue()
        self.last_frame_at = time.monotonic()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.protocol_error = ""
        self.device = ""
        self.rss_start_mb = 0.0
        self.rss_mb = 0.0  # at the last memory check
        self.jobs = 0
        # Starting counts as busy: only a started, idle worker that dies is restarted by the exit handler.
        self.busy = True
        self.retired = False  # being (or been) replaced: never handed another job
        self._on_exit = on_exit
        readers = [asyncio.create_task(self._read_frames())]
        if transport.log is not None:
            readers.append(asyncio.create_task(self._read_log(transport.log)))
        self._readers = tuple(readers)

    @property
    def pid(self) -> int:
        return self.transport.pid

    @property
    def running(self) -> bool:
        return self.transport.running

    async def send(self, message: Message) -> None:
        await self.transport.write(encode(message))

    async def receive(self, wait_s: float) -> Message:
        """The next message; TimeoutError when none comes within wait_s, WorkerGone once the process has ended."""
        try:
            # Queued messages first: wait_for(timeout=0) would give up even on one that is already here.
            message = self.inbound.get_nowait()
        except asyncio.QueueEmpty:
            if wait_s <= 0:
                raise TimeoutError from None
            message = await asyncio.wait_for(self.inbound.get(), wait_s)
        if message is None:
            self.inbound.put_nowait(None)  # the end stays visible to whoever asks next
            raise WorkerGone(self.exit_detail())
        return message

    def kill(self) -> None:
        self.transport.kill()

    async def stop(self, *, graceful: bool) -> None:
        self.retired = True
        if graceful and self.running:
            with contextlib.suppress(ConnectionError):
                await self.send(Shutdown())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.transport.wait(), CLOSE_GRACE_S)
        self.kill()
        await self.transport.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self.transport.close()

    def exit_detail(self) -> str:
        detail = f"worker pid {self.pid} {self.transport.ended()}"
        if self.protocol_error:
            detail += f" ({self.protocol_error})"
        if self.stderr_tail:
            detail += "; last log: " + " | ".join(list(self.stderr_tail)[-3:])
        return detail[:1000]

    async def _read_frames(self) -> None:
        try:
            while (message := await read_message(self.transport.reader)) is not None:
                self.last_frame_at = time.monotonic()
                self.inbound.put_nowait(message)
        except ProtocolError as exc:
            self.protocol_error = str(exc)
            self.kill()
        except ConnectionError:  # a socket reset by a worker that died: the same end as a closed pipe
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.transport.wait(), CLOSE_GRACE_S)
        if self.running:  # closed its end of the stream yet lives on: it can no longer be talked to
            self.kill()
            await self.transport.wait()
        self.inbound.put_nowait(None)
        self._on_exit(self)

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        # Drained continuously: a worker blocked on a full stderr pipe would look hung to the watchdog.
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line past the stream's limit, which the reader has dropped: keep draining
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                log.info("worker %d [%d]: %s", self.slot, self.pid, text)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
