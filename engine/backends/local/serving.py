"""The worker's serve loop: the channel to its one supervisor, the inbox that lets a cancel reach a running job.

Spawned by the supervisor, a worker speaks the protocol's frames on stdin/stdout, so stdout carries nothing else
and every log line goes to stderr. Run as its own systemd unit (flux-bot-worker@.service) with `--listen SOCKET`,
it binds that Unix socket, loads the model, tells systemd READY=1, serves the same frames to the one supervisor that
connects, keeps systemd's watchdog fed while it makes progress, and exits when that connection ends or on
`shutdown`: systemd's Restart=always then starts a fresh process, which is how a worker unit is recycled.

A `cancel` reaches a job while it runs: a reader thread takes every frame off the channel as it comes and notes a
cancel at once, for the pipeline's step callback to see. The worker answers `cancelled`, frees what the job held (as
between any two jobs) and serves the next job with the model still loaded. Only the serving thread pings systemd's
watchdog, so a step that never returns still stops the pings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Protocol

from engine.backends.local.faults import Fault
from engine.backends.local.frames import read_message_blocking
from engine.backends.local.pipeline import FluxRunner, Options, Runner, WorkerSetupError, load_pipeline
from engine.backends.local.synthetic import SYNTHETIC_ENV, SyntheticRunner, synthetic_seconds
from engine.backends.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    CancelledJob,
    Hello,
    JobSpec,
    Message,
    ProtocolError,
    Ready,
    Shutdown,
    Stats,
    WorkerFailed,
    WorkerFailure,
    encode,
)
from engine.sd_notify import Notifier, watchdog_interval_s

log = logging.getLogger(__name__)


class Channel(Protocol):
    """Where messages come from and go to: stdin/stdout pipes, a Unix socket, a JetStream consumer later.

    `receive` blocks and is called from the inbox's reader thread while `send` is called from the serving thread.
    """

    def receive(self) -> Message | None: ...

    def send(self, message: Message) -> None: ...


# What the inbox's reader thread hands the serving thread: a message, None at the end of the stream, or what broke it.
_Inbound = Message | None | Exception


class PipeChannel:
    def __init__(self, reader: IO[bytes], writer: IO[bytes]) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    def from_stdio(cls) -> PipeChannel:
        # The protocol keeps a private copy of stdout; fd 1 and sys.stdout then point at stderr, so a library that
        # prints can never corrupt a frame.
        protocol_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(sys.stdin.buffer, os.fdopen(protocol_fd, "wb"))

    def receive(self) -> Message | None:
        return read_message_blocking(self._reader)

    def send(self, message: Message) -> None:
        self._writer.write(encode(message))
        self._writer.flush()


class Heartbeat:
    """WATCHDOG=1 for systemd, at most once per interval, from the thread that serves jobs.

    Pinged while waiting for a frame and whenever a frame goes out (every step sends progress), so a step that never
    returns stops the pings and systemd kills the unit after WatchdogSec, even with no supervisor watching. Never
    from the inbox's reader thread, which keeps reading whatever the serving thread does.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None) -> None:
        self.notifier = notifier
        self.interval_s = interval_s  # None: no watchdog asked of this process
        self._due = 0.0

    def beat(self) -> None:
        if self.interval_s is not None and time.monotonic() >= self._due:
            self.notifier.watchdog()
            self._due = time.monotonic() + self.interval_s

    def wait_readable(self, sock: socket.socket) -> None:
        """Block until `sock` has something to read (a frame, a connection, its end), pinging meanwhile."""
        while not select.select([sock], [], [], self.interval_s)[0]:
            self.beat()

    def wait(self, inbound: queue.Queue[_Inbound]) -> _Inbound:
        """The next item of `inbound`, pinging while none comes."""
        while True:
            try:
                return inbound.get(timeout=self.interval_s)
            except queue.Empty:
                self.beat()


class SocketChannel:
    """Messages over one connection accepted on a worker unit's socket."""

    def __init__(self, conn: socket.socket, heartbeat: Heartbeat) -> None:
        self._conn = conn
        # Unbuffered: select() sees only what the kernel holds, so a read-ahead buffer could keep a frame it waits for.
        self._reader = conn.makefile("rb", buffering=0)
        self._heartbeat = heartbeat

    def wait_readable(self) -> None:
        self._heartbeat.wait_readable(self._conn)

    def receive(self) -> Message | None:
        return read_message_blocking(self._reader)

    def send(self, message: Message) -> None:
        self._conn.sendall(encode(message))
        self._heartbeat.beat()

    def close(self) -> None:
        self._reader.close()
        self._conn.close()


class Inbox:
    """The supervisor's messages, read on a thread of their own so that a cancel reaches a job while it runs.

    The reader thread queues every message, in order, for the serving thread, and notes a cancel the moment it
    arrives (and the end of the stream, which cancels whatever runs: nobody is left to take its result). The serving
    thread forgets a cancel once it has answered it, so a cancel never outlives its answer.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._inbound: queue.Queue[_Inbound] = queue.Queue()
        self._cancelled: set[str] = set()
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="inbox", daemon=True).start()

    def next(self, heartbeat: Heartbeat) -> Message | None:
        item = heartbeat.wait(self._inbound)
        if isinstance(item, Exception):
            raise item
        return item

    def cancelled(self, job_id: str) -> bool:
        with self._changed:
            return self._ended or job_id in self._cancelled

    def until_cancelled(self, job_id: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._ended or job_id in self._cancelled)

    def answered(self, job_id: str) -> None:
        with self._changed:
            self._cancelled.discard(job_id)

    def _read(self) -> None:
        try:
            while True:
                message = self._channel.receive()
                with self._changed:
                    if message is None:
                        self._ended = True
                    elif isinstance(message, Cancel):
                        self._cancelled.add(message.id)
                    self._changed.notify_all()
                # Queued after it is noted: a job stopped by a cancel always finds that cancel in the queue.
                self._inbound.put(message)
                if message is None or isinstance(message, Shutdown):
                    return
        except (ProtocolError, OSError) as exc:  # the serving thread raises it, as if it had read the frame itself
            with self._changed:
                self._ended = True
                self._changed.notify_all()
            self._inbound.put(exc)


def serve(runner: Runner, channel: Channel, heartbeat: Heartbeat) -> int:
    """Serve jobs until the supervisor says `shutdown` or goes away; the exit code."""
    inbox = Inbox(channel)
    stopped: dict[str, CancelledJob] = {}  # jobs a cancel stopped, until that cancel comes up in the queue
    while True:
        message = inbox.next(heartbeat)
        if message is None or isinstance(message, Shutdown):
            return 0  # the end of the stream means the supervisor is gone: free the GPU rather than linger
        if isinstance(message, JobSpec):
            result = runner.run(message, channel, inbox)
            if isinstance(result, CancelledJob):
                stopped[result.id] = result
            else:
                channel.send(result)
        elif isinstance(message, Cancel):
            # One answer per cancel, in stream order: whatever this job sent came before it, nothing comes after.
            inbox.answered(message.id)
            channel.send(stopped.pop(message.id, CancelledJob(message.id, None)))
        elif isinstance(message, Stats):
            channel.send(runner.memory())
        else:
            channel.send(WorkerFailed(None, WorkerFailure.INTERNAL, f"unexpected {message.TYPE} message"))


def ready_message(runner: Runner, load_s: float) -> Ready:
    styles = runner.styles.names if isinstance(runner, FluxRunner) else ()  # a synthetic runner loads no adapters
    return Ready(PROTOCOL_VERSION, os.getpid(), runner.device, runner.dtype, runner.model, round(load_s, 3), styles)


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660, in place of the stale one a previous process left there."""
    try:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise WorkerSetupError(f"{path} exists and is not a socket")
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Through the umask rather than a chmod after bind(), which would leave a moment with a wider mode.
        umask = os.umask(0o117)
        try:
            listener.bind(str(path))
        finally:
            os.umask(umask)
        listener.listen()
    except OSError as exc:
        raise WorkerSetupError(f"cannot listen on {path}: {exc}") from exc
    return listener


def serve_pipe(channel: Channel, options: Options, fault: Fault | None) -> int:
    """Serve the supervisor that spawned this process, over `channel` (its pipes); the exit code."""
    code = greet(channel)
    if code is not None:
        return code
    loaded = load(options, fault)
    if isinstance(loaded, WorkerFailed):
        channel.send(loaded)
        return 1
    runner, load_s = loaded
    channel.send(ready_message(runner, load_s))
    return serve(runner, channel, Heartbeat(Notifier(None), None))


def serve_socket(path: Path, options: Options, fault: Fault | None, notifier: Notifier) -> int:
    """Serve one supervisor on a Unix socket at `path`; the exit code once it is done.

    The socket is bound before the model loads: a supervisor connects at once and waits for `ready`, as it waits
    for a worker it spawned, instead of polling a socket that appears only minutes later. READY=1 to systemd means
    the model is loaded.
    """
    listener = bind_socket(path)
    loaded = load(options, fault)
    if isinstance(loaded, WorkerFailed):
        tell_a_waiting_supervisor(listener, loaded)
        return 1
    runner, load_s = loaded
    heartbeat = Heartbeat(notifier, watchdog_interval_s())
    notifier.ready()
    notifier.status(f"waiting for the supervisor on {path}")
    while True:
        heartbeat.wait_readable(listener)
        conn, _ = listener.accept()
        channel = SocketChannel(conn, heartbeat)
        channel.wait_readable()
        code = greet(channel)
        if code != 0:
            break
        channel.close()  # gone before its hello (a supervisor that gave up while we loaded): wait for the next
    # One supervisor per process: a second is refused at once rather than queued behind this one for good.
    listener.close()
    if code is not None:
        return code
    log.info("serving the supervisor on %s", path)
    notifier.status(f"serving the supervisor on {path}")
    channel.send(ready_message(runner, load_s))
    return serve(runner, channel, heartbeat)


def tell_a_waiting_supervisor(listener: socket.socket, failure: WorkerFailed) -> None:
    """Send `failure` to a supervisor already connected and waiting for `ready`; with none, the journal has it."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    conn.setblocking(True)
    channel = SocketChannel(conn, Heartbeat(Notifier(None), None))
    with contextlib.suppress(ConnectionError, ProtocolError):
        if greet(channel) is None:
            channel.send(failure)
    channel.close()


def greet(channel: Channel) -> int | None:
    """None once the peer has opened with a hello of this protocol version; else the exit code (0: it left)."""
    hello = channel.receive()
    if hello is None:
        return 0
    if not isinstance(hello, Hello) or hello.version != PROTOCOL_VERSION:
        detail = f"expected hello with protocol version {PROTOCOL_VERSION}, got {hello}"
        channel.send(WorkerFailed(None, WorkerFailure.INTERNAL, detail))
        return 2
    return None


def load(options: Options, fault: Fault | None) -> tuple[Runner, float] | WorkerFailed:
    """The loaded (and warmed) runner with its load time in seconds, or the `failed` message that says why not."""
    started = time.perf_counter()
    try:
        synthetic = synthetic_seconds(os.environ.get(SYNTHETIC_ENV))
    except ValueError as exc:
        return WorkerFailed(None, WorkerFailure.INTERNAL, str(exc))
    if synthetic is not None:
        log.warning("%s is set: serving synthetic images (benchmarks and tests only)", SYNTHETIC_ENV)
        return SyntheticRunner(synthetic), time.perf_counter() - started
    try:
        pipe, device, styles = load_pipeline(options)
        runner = FluxRunner(pipe, device, options, fault, styles)
        if options.warmup:
            runner.warm_up()
    except Exception as exc:
        log.exception("cannot serve %s", options.model)
        return WorkerFailed(None, WorkerFailure.INTERNAL, f"cannot load {options.model}: {exc}"[:1000])
    from engine.backends.demo_model import DEMO_NOTICE, is_demo_model

    if is_demo_model(Path(options.model)):
        log.warning("%s", DEMO_NOTICE)
    load_s = time.perf_counter() - started
    log.info("serving %s on %s (%.1f s to load)", options.model, device, load_s)
    return runner, load_s
