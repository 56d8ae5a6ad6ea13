"""Workers as their own systemd units: `flux-bot worker --listen SOCKET`, attached to through `[local] worker_sockets`.

Every scenario runs real worker processes on the tiny FLUX.1 pipeline (CPU). `Unit` plays systemd's part for
flux-bot-worker@.service: it runs the unit's command and starts a fresh process whenever the last one exits
(Restart=always), recording each process's pid and exit status. As in test_local.py, the scenarios run once per
module, concurrently (the `runs` fixture), and record what they saw; each test checks one behaviour in that record.
Drivers act on events (kill the worker once its first progress arrives), never on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.backends.local import supervisor as local_module
from engine.backends.local.cli import build_parser, worker_args
from engine.backends.local.frames import read_message, read_message_blocking
from engine.backends.local.serving import bind_socket, tell_a_waiting_supervisor
from engine.backends.local.supervisor import PACKAGE_ROOT, LocalBackend
from engine.backends.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    CancelledJob,
    Hello,
    ImageDone,
    JobSpec,
    MemoryStats,
    Message,
    Ready,
    Stats,
    StepProgress,
    WorkerFailed,
    WorkerFailure,
    encode,
)
from engine.config import LocalSettings, Secrets, Settings
from engine.models import (
    BackendEvent,
    BackendKind,
    Failed,
    FailureReason,
    Finished,
    ImageRequest,
    JobCancelled,
    JobDone,
    JobEvent,
    JobFailed,
    JobProgress,
    JobRerouted,
    Mode,
    Started,
)
from engine.service import Engine
from engine.store import Store
from tests.conftest import user
from tests.fakes.notify_socket import NotifyListener
from tests.fakes.tiny_flux import (
    MODEL,
    MODELS,
    build_tiny_flux,
    kinds,
    png_pixels,
    png_size,
    tiny_job,
    tiny_request,
    tiny_settings,
)

REPO = Path(__file__).resolve().parents[4]
# Only guards against a hung test run; no scenario is expected to come near it.
GUARD_S = 300
# Each worker process's second job hangs at step 2 (after progress 1) until something kills the process.
HANG_SECOND_JOB = "hang_at_step=2;job=2"
# Each worker process's second job stalls at step 2 (after progress 1) until it is cancelled.
STALL_SECOND_JOB = "stall_at_step=2;job=2"
ENGINE_SIZE = 256  # the smallest side the engine accepts
WATCHDOG_USEC = 100_000  # pings every 50 ms
MAX_STARTS = 5  # per unit; the scenarios need at most 3 processes
ALICE = user()


@dataclass
class Unit:
    """One flux-bot-worker@ unit as systemd runs it: the unit's command, restarted whenever it exits."""

    model: Path
    path: Path
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)  # every process, in start order
    exits: dict[int, int] = field(default_factory=dict)  # pid -> exit status (negative: killed by that signal)
    stopping: bool = False
    _proc: asyncio.subprocess.Process | None = None
    _pidfd: int = -1  # the current process, as systemd tracks it: a signal can never reach a reused pid
    _task: asyncio.Task[None] | None = None

    @property
    def current_pid(self) -> int:
        assert self._proc is not None and self._proc.returncode is None
        return self._proc.pid

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # As systemd's StartLimitBurst: a command that cannot run is not restarted for ever.
        while not self.stopping and len(self.pids) < MAX_STARTS:
            self._proc = await start_worker(self.model, self.path, self.env)
            self.pids.append(self._proc.pid)
            with contextlib.suppress(ProcessLookupError):  # already exited and reaped: nothing left to signal
                self._pidfd = os.pidfd_open(self._proc.pid)
            try:
                self.exits[self._proc.pid] = await self._proc.wait()
            finally:
                if self._pidfd >= 0:
                    os.close(self._pidfd)
                    self._pidfd = -1

    async def stop(self) -> None:
        """No more restarts; a process still running is stopped as `systemctl stop` would (SIGTERM)."""
        self.stopping = True
        if self._proc is not None and self._proc.returncode is None and self._pidfd >= 0:
            # Not Process.terminate(): Popen.send_signal() first polls with waitpid(), which reaps a process that
            # has just exited before asyncio's child watcher can, and asyncio then reports its status as 255.
            with contextlib.suppress(ProcessLookupError):  # it has exited; the watcher has yet to say so
                signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        if self._task is not None:
            await self._task


async def start_worker(model: Path, path: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    """The unit's ExecStart: `flux-bot worker --listen PATH ...` (`python -m bot` is `flux-bot`)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(("NOTIFY_", "WATCHDOG_"))}
    env = {
        **base,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(PACKAGE_ROOT), base.get("PYTHONPATH")))),
        "OMP_NUM_THREADS": "1",  # several workers on few cores, as in tiny_backend
        **env,
    }
    argv = [sys.executable, "-m", "bot", "worker", "--listen", str(path), *worker_args(tiny_settings(), str(model))]
    return await asyncio.create_subprocess_exec(*argv, env=env)


@dataclass
class Run:
    """What one scenario saw."""

    events: dict[str, list[JobEvent]] = field(default_factory=dict)  # through the engine
    backend_events: dict[str, list[BackendEvent]] = field(default_factory=dict)  # straight from the backend
    pids: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    gpu_ledger: dict[str, list[str]] = field(default_factory=dict)
    unit_pids: list[int] = field(default_factory=list)
    exits: dict[int, int] = field(default_factory=dict)
    recycles: int = 0
    workers_started: int = 0
    jobs_served: int = 0
    failures: int = 0
    images: dict[str, bytes] = field(default_factory=dict)
    frames: dict[str, list[Message]] = field(default_factory=dict)  # raw protocol: what the worker answered to each
    notify: list[str] = field(default_factory=list)
    socket_mode: int = 0
    ready: Message | None = None
    memory: Message | None = None
    second_connect: str = ""
    exit_code: int | None = None
    error: BaseException | None = None

    def checked(self) -> Run:
        if self.error is not None:
            raise self.error
        return self


async def _scenario(run: Run, body: Callable[[], Awaitable[None]]) -> None:
    try:
        await body()
    except BaseException as exc:  # recorded, and raised by the tests that read this run
        run.error = exc


@dataclass
class _EngineOnUnit:
    """An Engine whose only backend is a LocalBackend attached to one unit, and a user who submits jobs."""

    unit: Unit
    run: Run
    engine: Engine
    backend: LocalBackend

    @classmethod
    async def open(cls, model: Path, folder: Path, run: Run, fault: str, **local: Any) -> _EngineOnUnit:
        unit = Unit(model, folder / "gpu0.sock", {"FLUX_BOT_WORKER_FAULT": fault})
        settings = Settings.model_validate(
            {
                "bot": {"state_dir": str(folder / "state")},
                "routing": {"default_model": MODEL, "api_enabled": False},
                "models": {MODEL: MODELS[MODEL].model_dump()},
                "local": tiny_settings(worker_sockets=(unit.path,), **local).model_dump(),
            }
        )
        backend = LocalBackend(settings.local, settings.models, model)
        unit.start()
        store = await Store.open(settings.bot.database_path)
        engine = Engine(settings, Secrets(), store, {BackendKind.LOCAL: backend})
        await engine.start()
        return cls(unit, run, engine, backend)

    async def job(self, name: str, on_progress: Callable[[str], Awaitable[None]] | None = None) -> None:
        request = ImageRequest("a red fox", MODEL, ENGINE_SIZE, ENGINE_SIZE, steps=4, seed=1, mode=Mode.RELAX)
        queued = await self.engine.submit(ALICE, request)
        events = self.run.events.setdefault(name, [])
        async for event in self.engine.events(queued.job_id):
            events.append(event)
            if isinstance(event, JobProgress) and name not in self.run.pids:
                self.run.pids[name] = self.unit.current_pid  # the process that runs the job (its first try)
            if isinstance(event, JobProgress) and event.step == 1 and on_progress is not None:
                await on_progress(queued.job_id)
                on_progress = None  # once: the retry's progress is left alone
        stored = await self.engine._store.get_job(queued.job_id)
        self.run.attempts[name] = stored.attempts
        ledger = await self.engine._store.job_ledger(queued.job_id)
        self.run.gpu_ledger[name] = [line["entry"] for line in ledger if line["resource"] == "gpu_ms"]

    async def cancel(self, job_id: str) -> None:
        await self.engine.cancel(ALICE, job_id)

    async def close(self) -> None:
        run, backend = self.run, self.backend
        run.recycles, run.jobs_served, run.failures = backend.recycles, backend.jobs_served, backend.failures
        run.workers_started = backend.workers_started
        self.unit.stopping = True  # the shutdown that close() sends ends the last process for good
        await self.engine.close()
        await self.unit.stop()
        run.unit_pids, run.exits = self.unit.pids, self.unit.exits


async def _crash_and_cancel(model: Path, folder: Path, run: Run) -> None:
    """Through the engine: a job, a SIGKILL mid-job (retried on the restarted unit), a cancel the unit ignores."""
    # The cancelled job hangs: its process never answers the cancel, whatever the bound, and is killed after it.
    setup = await _EngineOnUnit.open(model, folder, run, HANG_SECOND_JOB, cancel_timeout_s=1.0)

    async def sigkill(job_id: str) -> None:
        os.kill(setup.unit.current_pid, signal.SIGKILL)  # hung at step 2: it cannot have finished this job

    async def body() -> None:
        await setup.job("first")
        await setup.job("killed", sigkill)
        await setup.job("cancelled", setup.cancel)
        await setup.job("after_cancel")

    try:
        await _scenario(run, body)
    finally:
        await setup.close()


async def _cancel(model: Path, folder: Path, run: Run) -> None:
    """Through the engine: a cancel mid-job that the unit's process honours, and the job after it."""
    setup = await _EngineOnUnit.open(model, folder, run, STALL_SECOND_JOB)

    async def body() -> None:
        await setup.job("before")
        await setup.job("cancelled", setup.cancel)
        await setup.job("next")

    try:
        await _scenario(run, body)
    finally:
        await setup.close()


async def _recycle(model: Path, folder: Path, run: Run) -> None:
    """Straight to the backend: three queued jobs and a recycle after two, through a restarting unit."""
    unit = Unit(model, folder / "gpu0.sock")
    backend = LocalBackend(tiny_settings(worker_sockets=(unit.path,), recycle_after_jobs=2), MODELS, model)

    async def one(name: str, seed: int) -> None:
        events = run.backend_events.setdefault(name, [])
        async for event in backend.run(tiny_job(name, seed)):
            events.append(event)
            if isinstance(event, Started):
                (worker,) = (info for info in backend.workers() if info.busy)
                run.pids[name] = worker.pid

    async def body() -> None:
        await backend.start()
        await asyncio.gather(*(one(f"r{n}", n) for n in range(3)))

    unit.start()
    try:
        await _scenario(run, body)
    finally:
        run.recycles, run.jobs_served, run.failures = backend.recycles, backend.jobs_served, backend.failures
        unit.stopping = True
        await backend.close()
        await unit.stop()
        run.unit_pids, run.exits = unit.pids, unit.exits


async def _notify(model: Path, folder: Path, run: Run) -> None:
    """The raw protocol over the socket, with systemd's NOTIFY_SOCKET and watchdog set: cancels between jobs, mid-job
    and after a job, then the next job, on one process."""
    path = folder / "gpu0.sock"
    listener = NotifyListener()
    env = {
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "FLUX_BOT_WORKER_FAULT": "stall_at_step=2;job=1",
    }

    async def until(reader: asyncio.StreamReader, kind: type[Message]) -> list[Message]:
        frames: list[Message] = []
        while not frames or not isinstance(frames[-1], kind):
            frame = await read_message(reader)
            assert frame is not None, [f.TYPE for f in frames]
            frames.append(frame)
        return frames

    async def body() -> None:
        proc = await start_worker(model, path, env)
        try:
            await listener.until("READY=1", limit_s=GUARD_S)  # the other scenarios load their models meanwhile
            run.socket_mode = path.stat().st_mode
            reader, writer = await asyncio.open_unix_connection(path)

            def send(message: Message) -> None:
                writer.write(encode(message))

            send(Hello(PROTOCOL_VERSION))
            run.ready = await read_message(reader)
            try:
                await asyncio.open_unix_connection(path)
            except OSError as exc:
                run.second_connect = type(exc).__name__
            await listener.until("WATCHDOG=1")
            send(Cancel("never-sent"))
            run.frames["before_any_job"] = await until(reader, CancelledJob)
            send(JobSpec("stopped", MODEL, "a red fox in the snow", 64, 64, 4, None, 1))
            run.frames["stopped_progress"] = await until(reader, StepProgress)
            send(Cancel("stopped"))
            run.frames["stopped"] = await until(reader, CancelledJob)
            send(Cancel("stopped"))  # again, once it has ended
            run.frames["stopped_again"] = await until(reader, CancelledJob)
            # The request of the recycle scenario's r0, a fresh process's first job.
            send(JobSpec("next", MODEL, "a red fox in the snow", 64, 64, 4, None, 0))
            run.frames["next"] = await until(reader, ImageDone)
            send(Stats())
            run.memory = await read_message(reader)
            writer.close()
            run.exit_code = await proc.wait()
            await listener.until("STOPPING=1")
        finally:
            run.notify = listener.messages
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            listener.close()

    await _scenario(run, body)


SCENARIOS = {"crash_cancel": _crash_and_cancel, "cancel": _cancel, "recycle": _recycle, "notify": _notify}


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a Unix socket's path must fit in about 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="fbw-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def runs(tiny_flux: Path) -> dict[str, Run]:
    results = {name: Run() for name in SCENARIOS}

    async def run_all() -> None:
        with tempfile.TemporaryDirectory(prefix="fbw-", dir="/tmp") as top:
            folders = {name: Path(top) / name for name in SCENARIOS}
            for folder in folders.values():
                folder.mkdir()
            scenarios = (scenario(tiny_flux, folders[name], results[name]) for name, scenario in SCENARIOS.items())
            await asyncio.wait_for(asyncio.gather(*scenarios), GUARD_S)

    asyncio.run(run_all())
    return results


def _terminal(events: list[JobEvent]) -> JobEvent:
    return events[-1]


# ---- through real worker units ----


def test_a_job_runs_end_to_end_through_a_worker_unit(runs: dict[str, Run]) -> None:
    run = runs["crash_cancel"].checked()
    events = run.events["first"]
    done = _terminal(events)
    assert isinstance(done, JobDone), [type(event).__name__ for event in events]
    assert done.backend is BackendKind.LOCAL and done.cost_micros == 0
    assert png_size(done.image) == (ENGINE_SIZE, ENGINE_SIZE)
    assert [event.step for event in events if isinstance(event, JobProgress)] == [1, 2, 3, 4]
    assert run.attempts["first"] == 1


def test_a_unit_sigkilled_mid_job_is_reattached_and_the_job_retried_and_charged_once(runs: dict[str, Run]) -> None:
    run = runs["crash_cancel"].checked()
    events = run.events["killed"]
    assert [event.after for event in events if isinstance(event, JobRerouted)] == [FailureReason.CRASH]
    done = _terminal(events)
    assert isinstance(done, JobDone), [type(event).__name__ for event in events]
    assert png_size(done.image) == (ENGINE_SIZE, ENGINE_SIZE)
    assert run.attempts["killed"] == 2
    assert run.gpu_ledger["killed"] == ["reserve", "void", "reserve", "settle"]  # the lost try is free
    first, second = run.unit_pids[:2]
    assert run.exits[first] == -signal.SIGKILL  # the test's kill; "systemd" then started `second`
    assert second != first


def test_a_unit_process_that_does_not_stop_a_cancelled_job_in_time_is_sigkilled(runs: dict[str, Run]) -> None:
    run = runs["crash_cancel"].checked()
    assert isinstance(_terminal(run.events["cancelled"]), JobCancelled)
    assert not any(isinstance(event, JobFailed) for event in run.events["cancelled"])
    assert isinstance(_terminal(run.events["after_cancel"]), JobDone)
    assert run.pids["after_cancel"] != run.pids["cancelled"]
    # The process that ran the cancelled job was killed through its pidfd by the supervisor, not by the test.
    assert len(run.unit_pids) == 3
    assert run.exits[run.unit_pids[1]] == -signal.SIGKILL
    assert run.exits[run.unit_pids[2]] == 0  # the engine's close() sent `shutdown`: a clean exit
    assert run.recycles == 2  # the crash and the cancellation
    assert run.workers_started == 3
    assert (run.jobs_served, run.failures) == (4, 1)  # the cancelled job never ended, so it is not counted


def test_cancelling_mid_job_keeps_the_unit_process_and_its_loaded_model(runs: dict[str, Run]) -> None:
    run = runs["cancel"].checked()
    events = run.events["cancelled"]
    assert isinstance(_terminal(events), JobCancelled)
    assert not any(isinstance(event, JobFailed) for event in events)
    assert [event.step for event in events if isinstance(event, JobProgress)] == [1]
    done = _terminal(run.events["next"])
    assert isinstance(done, JobDone), [type(event).__name__ for event in run.events["next"]]
    assert run.pids["before"] == run.pids["cancelled"] == run.pids["next"]
    assert run.unit_pids == [run.pids["next"]]  # one process for the whole scenario: the model loaded once
    assert run.exits[run.pids["next"]] == 0  # and it left on the engine's `shutdown`, not killed
    assert (run.workers_started, run.recycles, run.jobs_served, run.failures) == (1, 0, 2, 0)
    # The same request as before the cancel, and as the first job of the other scenario's fresh process.
    before = _terminal(run.events["before"])
    first_elsewhere = _terminal(runs["crash_cancel"].checked().events["first"])
    assert isinstance(before, JobDone) and isinstance(first_elsewhere, JobDone)
    assert png_pixels(done.image) == png_pixels(before.image) == png_pixels(first_elsewhere.image)


def test_a_unit_worker_answers_every_cancel_once_and_stops_a_running_job_at_its_next_step(
    runs: dict[str, Run],
) -> None:
    run = runs["notify"].checked()
    frames = run.frames
    assert isinstance(run.ready, Ready)
    # A cancel for no job running (none yet, or one that has ended) is answered and changes nothing.
    assert frames["before_any_job"] == [CancelledJob("never-sent", None)]
    assert frames["stopped_again"] == [CancelledJob("stopped", None)]
    # Stalled in step 2 when the cancel came: it stops there, with no further progress and no image.
    assert [frame.step for frame in frames["stopped_progress"] if isinstance(frame, StepProgress)] == [1]
    assert len(frames["stopped_progress"]) == 1
    assert frames["stopped"] == [CancelledJob("stopped", 2)]
    # The next job runs in full, as it would on a fresh process (the recycle scenario's r0, same request).
    *progress, done = frames["next"]
    assert [frame.step for frame in progress if isinstance(frame, StepProgress)] == [1, 2, 3, 4]
    assert len(progress) == 4
    fresh = runs["recycle"].checked().backend_events["r0"][-1]
    assert isinstance(fresh, Finished)
    assert isinstance(done, ImageDone) and done.image == fresh.image
    assert isinstance(run.memory, MemoryStats)
    assert run.exit_code == 0


def test_units_are_recycled_after_n_jobs_by_shutdown_and_no_queued_job_is_lost(runs: dict[str, Run]) -> None:
    run = runs["recycle"].checked()
    assert sorted(run.backend_events) == [f"r{n}" for n in range(3)]
    for name, events in run.backend_events.items():
        assert sum(isinstance(event, Finished | Failed) for event in events) == 1, name
        assert isinstance(events[-1], Finished), kinds(events)
    jobs_per_pid = sorted(list(run.pids.values()).count(pid) for pid in set(run.pids.values()))
    assert jobs_per_pid == [1, 2]
    assert set(run.pids.values()) == set(run.unit_pids)
    # Every process left on `shutdown` (exit 0), none was killed: a recycle is a clean exit that systemd restarts.
    assert [run.exits[pid] for pid in run.unit_pids] == [0, 0]
    assert (run.recycles, run.jobs_served, run.failures) == (1, 3, 0)


def test_a_unit_worker_tells_systemd_ready_and_pings_its_watchdog(runs: dict[str, Run]) -> None:
    run = runs["notify"].checked()
    messages = run.notify
    assert "READY=1" in messages and "WATCHDOG=1" in messages
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert messages[-1] == "STOPPING=1"
    assert any(message.startswith("STATUS=serving the supervisor on ") for message in messages)


def test_a_unit_worker_serves_one_connection_with_the_frame_protocol_and_exits_when_it_closes(
    runs: dict[str, Run],
) -> None:
    run = runs["notify"].checked()
    assert stat.S_ISSOCK(run.socket_mode) and stat.S_IMODE(run.socket_mode) == 0o660
    assert isinstance(run.ready, Ready)
    assert run.ready.version == PROTOCOL_VERSION and run.ready.device == "cpu"
    assert isinstance(run.memory, MemoryStats) and run.memory.rss_mb > 0
    assert run.second_connect == "ConnectionRefusedError"  # one supervisor per process
    assert run.exit_code == 0


# ---- without workers ----


async def test_a_socket_nobody_listens_on_fails_the_job_and_makes_the_backend_unhealthy(
    tiny_flux: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "CONNECT_WAIT_S", 0.1)  # the unit is down for good, not restarting
    path = short_dir / "gpu0.sock"
    backend = LocalBackend(tiny_settings(worker_sockets=(path,)), MODELS, tiny_flux)
    try:
        await backend.start()
        events = [event async for event in backend.run(tiny_job("orphan"))]
        status = backend.status(queued_ahead=0, request=tiny_request())
    finally:
        await backend.close()
    (failed,) = events
    assert isinstance(failed, Failed) and failed.reason is FailureReason.CRASH and failed.retryable
    assert f"nothing listens on {path}" in failed.detail
    assert not status.healthy
    assert "cannot start" in status.detail


def test_a_load_failure_reaches_a_supervisor_that_is_already_waiting(short_dir: Path) -> None:
    listener = bind_socket(short_dir / "gpu0.sock")
    failure = WorkerFailed(None, WorkerFailure.INTERNAL, "cannot load")
    tell_a_waiting_supervisor(listener, failure)  # nobody waiting: returns at once
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as supervisor:
        supervisor.connect(str(short_dir / "gpu0.sock"))
        supervisor.sendall(encode(Hello(PROTOCOL_VERSION)))
        tell_a_waiting_supervisor(listener, failure)
        with supervisor.makefile("rb") as stream:
            assert read_message_blocking(stream) == failure
            assert read_message_blocking(stream) is None
    listener.close()


def test_the_socket_replaces_a_stale_one_but_never_another_file(short_dir: Path) -> None:
    path = short_dir / "gpu0.sock"
    bind_socket(path).close()  # what a process that has ended leaves behind
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
    listener = bind_socket(path)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
    listener.close()
    other = short_dir / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(Exception, match="is not a socket"):
        bind_socket(other)
    assert other.read_text() == "keep me"


def test_worker_sockets_must_be_absolute_short_distinct_and_match_gpus() -> None:
    assert LocalSettings(worker_sockets=("/run/flux-bot/gpu0.sock",), gpus=(3,)).worker_sockets == (
        Path("/run/flux-bot/gpu0.sock"),
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"worker_sockets": ("gpu0.sock",)}, "absolute"),
        ({"worker_sockets": ("/run/" + "x" * 120,)}, "longer than"),
        ({"worker_sockets": ("/run/a.sock", "/run/a.sock")}, "twice"),
        ({"worker_sockets": ("/run/a.sock", "/run/b.sock"), "gpus": (0,)}, "one GPU per worker socket"),
    ]
    for bad, problem in cases:
        with pytest.raises(ValidationError, match=problem):
            LocalSettings(**bad)


def test_one_slot_per_worker_socket(tiny_flux: Path) -> None:
    sockets = (Path("/run/flux-bot/gpu0.sock"), Path("/run/flux-bot/gpu1.sock"))
    assert LocalBackend(tiny_settings(worker_sockets=sockets, gpus=(0, 1)), MODELS, tiny_flux).capacity() == 2


def test_the_worker_unit_runs_a_command_the_worker_accepts_on_the_documented_socket() -> None:
    unit = (REPO / "systemd" / "flux-bot-worker@.service").read_text()
    (exec_start,) = (line for line in unit.splitlines() if line.startswith("ExecStart="))
    words = shlex.split(exec_start.removeprefix("ExecStart=").replace("%i", "0"))
    assert words[0].endswith("/flux-bot") and words[1] == "worker"
    # systemd drops an unset $VAR and substitutes ${VAR} from the EnvironmentFile.
    words = [
        word.replace("${FLUX_BOT_MODEL}", "/models/flux") for word in words[2:] if word != "$FLUX_BOT_WORKER_FLAGS"
    ]
    args = build_parser().parse_args(words)
    assert args.listen == Path("/run/flux-bot/gpu0.sock")
    assert args.model == "/models/flux"
    assert 'worker_sockets = ["/run/flux-bot/gpu0.sock"' in unit  # the header's config example names that socket
