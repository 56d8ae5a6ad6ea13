"""One local worker process as the supervisor sees it: its pipes, the tasks that read them, and how it ended.

Split from local.py, which decides *when* workers start, serve, recycle and die; this module only talks to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Callable

from engine.backends.protocol import Frame, MessageType, ProtocolError, encode, read_frame

log = logging.getLogger("engine.backends.local")

CLOSE_GRACE_S = 10.0  # how long a worker may take to exit after `shutdown` before it is killed
STDERR_TAIL_LINES = 20


class WorkerGone(Exception):
    """The worker process ended (its stdout closed); the message says how."""


class WorkerProcess:
    """One worker process: its pipes, the tasks that read them, and what the supervisor knows of it."""

    def __init__(self, slot: int, proc: asyncio.subprocess.Process, on_exit: Callable[[WorkerProcess], None]) -> None:
        self.slot = slot
        self.proc = proc
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue()
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
        self._readers = (asyncio.create_task(self._read_frames()), asyncio.create_task(self._read_log()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def send(self, frame: Frame) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(frame))
        await self.proc.stdin.drain()

    async def receive(self, wait_s: float) -> Frame:
        """The next frame; TimeoutError when none comes within wait_s, WorkerGone once the process has ended."""
        try:
            # Queued frames first: wait_for(timeout=0) would give up even on a frame that is already here.
            frame = self.frames.get_nowait()
        except asyncio.QueueEmpty:
            if wait_s <= 0:
                raise TimeoutError from None
            frame = await asyncio.wait_for(self.frames.get(), wait_s)
        if frame is None:
            self.frames.put_nowait(None)  # the end stays visible to whoever asks next
            raise WorkerGone(self.exit_detail())
        return frame

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def stop(self, *, graceful: bool) -> None:
        self.retired = True
        if graceful and self.running:
            with contextlib.suppress(ConnectionError):
                await self.send(Frame(MessageType.SHUTDOWN))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), CLOSE_GRACE_S)
        self.kill()
        await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def exit_detail(self) -> str:
        code = self.proc.returncode
        if code is None:
            how = "stopped answering"
        elif code < 0:
            how = f"was killed by {_signal_name(-code)}"
        else:
            how = f"exited with code {code}"
        detail = f"worker pid {self.pid} {how}"
        if self.protocol_error:
            detail += f" ({self.protocol_error})"
        if self.stderr_tail:
            detail += "; last log: " + " | ".join(list(self.stderr_tail)[-3:])
        return detail[:1000]

    async def _read_frames(self) -> None:
        assert self.proc.stdout is not None
        try:
            while (frame := await read_frame(self.proc.stdout)) is not None:
                self.last_frame_at = time.monotonic()
                self.frames.put_nowait(frame)
        except ProtocolError as exc:
            self.protocol_error = str(exc)
            self.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), CLOSE_GRACE_S)
        if self.running:  # closed its stdout yet lives on: it can no longer be talked to
            self.kill()
            await self.proc.wait()
        self.frames.put_nowait(None)
        self._on_exit(self)

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        # Drained continuously: a worker blocked on a full stderr pipe would look hung to the watchdog.
        while True:
            try:
                line = await self.proc.stderr.readline()
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
