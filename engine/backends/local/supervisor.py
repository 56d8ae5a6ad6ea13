"""The in-host supervisor: one FLUX.1 worker process per GPU (the worker is cli.py's `main`).

Self-hosted FLUX fails in ways that only a restart cures: fragmented GPU memory, OOM with memory to spare, RSS that
only grows, a kernel that never returns. So the supervisor treats a worker process as disposable. It restarts one
after `recycle_after_jobs`, when reserved-minus-allocated GPU memory or RSS grows past its bound, after an OOM, a hung
job (watchdog) or a crash. A job caught in any of these ends in exactly one `Failed` with `retryable=True`; retrying
or failing over is the scheduler's decision, never this module's, so no job is run twice behind its back.

A job whose consumer goes away (the user cancelled it) costs no restart: the worker is sent `cancel`, stops the
pipeline at its next step and answers `cancelled`, and then serves the next job with the model still loaded. Only a
worker that does not answer within `cancel_timeout_s` (a step that never returns) is killed and replaced. Either
way the job yields nothing more, so the scheduler ends it as cancelled, never as failed.

Workers are spawned as child processes, or, with `[local] worker_sockets`, run by systemd as their own units
(flux-bot-worker@.service) and attached to through their Unix sockets. The decisions above are the same for both;
for a unit, "restart" means: end the process (SIGKILL, or `shutdown` when graceful), let systemd's Restart=always
start a fresh one, and attach to it once it listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import engine
from engine.backends.base import Requeue, Resumption
from engine.backends.gpu_probe import GpuProbe, GpuReading
from engine.backends.local.cli import worker_args
from engine.backends.local.process import ChildPipes, Transport, UnitSocket, WorkerGone, WorkerProcess
from engine.backends.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    CancelledJob,
    Hello,
    ImageDone,
    JobSpec,
    MemoryStats,
    ProtocolError,
    Ready,
    Stats,
    StepProgress,
    WorkerFailed,
    WorkerFailure,
    expect,
    job_id_of,
)
from engine.backends.upkeep import DEFAULT_SECONDS_PER_STEP, JobTimes, Tasks
from engine.config import LocalSettings, ModelSettings, StyleAdapter, StyleSettings
from engine.errors import EngineError
from engine.models import (
    PNG,
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    Finished,
    Progress,
    ResolvedRequest,
    Started,
)

log = logging.getLogger(__name__)

MAX_START_FAILURES = 3  # consecutive failed starts after which a worker slot counts as broken (unhealthy)
MAX_START_BACKOFF_S = 60.0
# systemd restarts a worker unit within its RestartSec, and the worker binds its socket before it imports torch, so
# a socket that stays unreachable this long belongs to a unit that is stopped or failing: that is a failed start.
CONNECT_WAIT_S = 30.0
MAX_CONNECT_RETRY_S = 1.0
RECENT_JOBS = 50  # the window of the failure rate that the router sees
# The folder that holds the `engine` package, so `python -m engine.backends.local` works from any cwd.
PACKAGE_ROOT = Path(engine.__file__).resolve().parent.parent


class _StartFailed(EngineError):
    """A worker process ended or said `failed` before it was ready; the message is its detail."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A snapshot of one running worker process, for operators, metrics and the soak benchmark."""

    slot: int
    pid: int
    device: str
    jobs: int  # served by this process
    busy: bool
    rss_start_mb: float
    rss_mb: float  # at the last check between jobs


@dataclass(slots=True)
class _Slot:
    """A place for one worker process: a GPU (CUDA_VISIBLE_DEVICES), or the configured device when `gpu` is None;
    with `socket`, the worker unit listening there (whose GPU, if known, is `gpu`)."""

    index: int
    gpu: int | None
    socket: Path | None = None
    process: WorkerProcess | None = None
    launching: bool = False
    start_failures: int = 0  # consecutive
    last_error: str = ""
    styles: tuple[str, ...] = ()  # the LoRA styles its running worker loaded (its `ready` says)
    styles_version: int = 0  # the LocalBackend's styles version its running worker was started with

    @property
    def broken(self) -> bool:
        return self.process is None and self.start_failures >= MAX_START_FAILURES


class LocalBackend:
    """Runs jobs on supervised local worker processes; see the module docstring for the failure handling."""

    kind = BackendKind.LOCAL

    def __init__(
        self,
        settings: LocalSettings,
        models: Mapping[str, ModelSettings],
        model_path: Path,
        *,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        styles: Mapping[str, StyleSettings] | None = None,
    ) -> None:
        self._settings = settings
        self._models = dict(models)
        # str(Path) gives a Hugging Face id back unchanged; a relative folder is resolved here, not in the worker.
        self._model = _weights(model_path)
        self._kontext = _weights(Path(settings.kontext_model)) if settings.kontext_model else ""
        self._styles = self._adapters_to_load(styles or {})
        self._styles_version = 0  # raised by reload_styles: workers started before it are replaced between jobs
        self._python = python
        self._extra_env = dict(extra_env or {})
        if sockets := settings.worker_sockets:
            gpus: tuple[int | None, ...] = settings.gpus or (None,) * len(sockets)
            self._slots = [_Slot(i, gpu, path) for i, (gpu, path) in enumerate(zip(gpus, sockets, strict=True))]
        else:
            self._slots = [_Slot(i, gpu) for i, gpu in enumerate(settings.gpus or (None,))]
        self._idle: deque[WorkerProcess] = deque()
        self._changed = asyncio.Condition()
        self._tasks = Tasks("local backend")
        self._live: set[WorkerProcess] = set()
        self._closed = False
        self._recycles = 0
        self._workers_started = 0
        self._jobs_served = 0
        self._failures = 0
        self._recent: deque[bool] = deque(maxlen=RECENT_JOBS)
        self._times = JobTimes()
        self._last_seconds: float | None = None
        self._gpu_probe = GpuProbe()

    # ---- counters (for metrics) ----

    @property
    def recycles(self) -> int:
        """Worker processes replaced for any reason: job count, memory growth, OOM, hang, crash, cancellation."""
        return self._recycles

    @property
    def workers_started(self) -> int:
        """Worker processes that became ready: each one loaded the model."""
        return self._workers_started

    @property
    def jobs_served(self) -> int:
        """Jobs that reached a worker and ended (finished or failed)."""
        return self._jobs_served

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def loaded_styles(self) -> tuple[str, ...]:
        """The LoRA styles every running worker has loaded (any of them may take a job), none while none runs."""
        running = [slot.styles for slot in self._slots if slot.process is not None]
        if not running:
            return ()
        return tuple(style for style in running[0] if all(style in styles for styles in running[1:]))

    def workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(slot.index, p.pid, p.device, p.jobs, p.busy, p.rss_start_mb, p.rss_mb)
            for slot in self._slots
            if (p := slot.process) is not None
        ]

    def gpu_readings(self) -> list[GpuReading]:
        """Temperature and memory of each GPU a running worker uses (none on a CPU or without NVML)."""
        readings: list[GpuReading] = []
        for slot in self._slots:
            device = slot.process.device if slot.process is not None else ""
            if device.startswith("cuda"):
                index = slot.gpu if slot.gpu is not None else int(device.partition(":")[2] or 0)
                reading = self._gpu_probe.read(index)
                if reading is not None:
                    readings.append(reading)
        return readings

    async def wait_idle(self) -> None:
        """Return once every worker is started and idle (its between-jobs check done), or none can start."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._closed
                    or all(slot.broken or (slot.process is not None and not slot.process.busy) for slot in self._slots)
                )
            )

    def style_slots(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """(where, slots, the LoRA styles loaded there) for each running worker, for `/admin styles`."""
        return [(f"in-host worker {slot.index}", 1, slot.styles) for slot in self._slots if slot.process is not None]

    async def reload_styles(self, styles: Mapping[str, StyleSettings]) -> None:
        """Serve `styles` from now on: idle workers are replaced at once, busy ones after their job (none is lost);
        their successors load the new adapters at start."""
        self._styles = self._adapters_to_load(styles)
        self._styles_version += 1
        while self._idle:
            self._replace(self._idle.popleft(), "the styles were reloaded", graceful=True)

    def _adapters_to_load(self, styles: Mapping[str, StyleSettings]) -> dict[str, tuple[StyleAdapter, ...]]:
        """The adapters of the styles these workers can run: with adapters, for any model or one they serve."""
        served = {name for name, model in self._models.items() if self.supports(name, model)}
        return {
            name: tuple(adapter.model_copy(update={"file": _adapter_file(adapter.file)}) for adapter in style.adapters)
            for name, style in styles.items()
            if style.adapters and (not style.models or served.intersection(style.models))
        }

    # ---- the Backend protocol ----

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        # An edit model (Kontext [dev]) needs its own weights, which the workers load beside the model's.
        return model.local and (not model.needs_input_image or bool(self._settings.kontext_model))

    def capacity(self) -> int:
        return len(self._slots)

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        measured = self._times.get(request)
        if measured is not None:
            return measured
        model = self._models.get(request.model)
        per_step = model.local_seconds_per_step if model else DEFAULT_SECONDS_PER_STEP
        return request.steps * per_step

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        per_job = self.estimate_seconds(request) if request else (self._last_seconds or 0.0)
        # The backend knows only how many wait: the scheduler replaces this wait with one that also counts what the
        # running jobs have left and the dispatcher's fair order.
        return BackendStatus(
            kind=self.kind,
            healthy=not self._closed and not all(slot.broken for slot in self._slots),
            wait_s=per_job * queued_ahead / self.capacity(),
            run_s=per_job,
            ahead=queued_ahead,
            in_flight=sum(1 for slot in self._slots if slot.process is not None and slot.process.busy),
            capacity=self.capacity(),
            detail=self._detail(),
        )

    async def start(self) -> None:
        """Launch every worker; returns once each is ready or has failed once (failed ones keep retrying)."""
        for slot in self._slots:
            self._ensure_launch(slot)
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._closed or all(slot.process is not None or slot.start_failures for slot in self._slots)
            )

    def detach(self) -> None:
        return None  # its workers stop with it: an abandoned job is queued again at the next start

    async def close(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        await self._tasks.cancel_all()
        await asyncio.gather(*(process.stop(graceful=True) for process in list(self._live)), return_exceptions=True)

    def resume(self, job: BackendJob) -> Resumption:
        """A job a restart cut off died with its worker process: nothing of it is left to continue."""
        return Requeue("queued again after a restart")

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        process = await self._acquire()
        if process is None:
            reason = FailureReason.INTERRUPTED if self._closed else FailureReason.CRASH
            yield Failed(reason, self._unavailable_detail(), retryable=True)
            return
        request = job.request
        spec = JobSpec.of(job)
        if spec.style not in self._styles:
            # A style without adapters is only its template, already in the prompt: the worker runs the base model.
            spec = replace(spec, style="")
        sent = settled = False
        try:
            yield Started(self.kind, f"worker {process.slot} (pid {process.pid}, {process.device})")
            started = process.last_frame_at = time.monotonic()
            sent = True
            with contextlib.suppress(ConnectionError):  # a dead worker: the read below reports how it ended
                await process.send(spec)
            while True:
                event = await self._next_event(process, spec, started)
                if isinstance(event, Progress):
                    yield event
                    continue
                settled = True
                self._settle(process, request, event, started)
                yield event
                return
        finally:
            if not settled and sent:
                # Cancelled or abandoned mid-job. While the backend closes, close() stops the process anyway.
                if self._closed:
                    self._replace(process, f"job {job.job_id} was abandoned at shutdown", graceful=False)
                else:
                    self._tasks.spawn(self._stop_job(process, spec.id))
            elif not settled:
                self._tasks.spawn(self._make_idle(process))

    # ---- jobs ----

    async def _acquire(self) -> WorkerProcess | None:
        """A ready, idle worker (waiting for one as long as it takes), or None when none can ever come."""
        async with self._changed:
            while True:
                while self._idle:
                    process = self._idle.popleft()
                    if process.running and not process.retired:
                        process.busy = True
                        return process
                if self._closed or all(slot.broken for slot in self._slots):
                    return None
                for slot in self._slots:
                    if slot.process is None:
                        self._ensure_launch(slot)
                await self._changed.wait()

    async def _next_event(self, process: WorkerProcess, spec: JobSpec, started: float) -> Progress | Finished | Failed:
        job_deadline = started + self._settings.job_timeout_s
        step_deadline = process.last_frame_at + self._settings.step_timeout_s
        try:
            message = await process.receive(min(job_deadline, step_deadline) - time.monotonic())
        except TimeoutError:
            if time.monotonic() >= job_deadline:
                detail = f"job took longer than job_timeout_s = {self._settings.job_timeout_s:g} s"
                return self._lost(process, FailureReason.TIMEOUT, detail, started)
            detail = f"no progress for step_timeout_s = {self._settings.step_timeout_s:g} s"
            return self._lost(process, FailureReason.HUNG, detail, started)
        except WorkerGone as exc:
            reason = FailureReason.INTERRUPTED if self._closed else FailureReason.CRASH
            return self._lost(process, reason, str(exc), started)
        try:
            if job_id_of(message) != spec.id:
                raise ProtocolError(f"{message.TYPE} for job {job_id_of(message)!r} while running {spec.id!r}")
            if isinstance(message, StepProgress):
                return Progress(message.step, message.total, message.preview or None)
            if isinstance(message, ImageDone):
                gpu_ms = round(message.seconds * 1000)
                return Finished(message.image, PNG.mime, message.seed, gpu_ms=gpu_ms)
            if isinstance(message, WorkerFailed):
                if message.reason is WorkerFailure.OOM:
                    return self._lost(process, FailureReason.OOM, message.detail, started, graceful=True)
                return Failed(FailureReason.INTERNAL, message.detail, gpu_ms=_elapsed_ms(started))
            raise ProtocolError(f"unexpected {message.TYPE} message during a job")
        except ProtocolError as exc:
            return self._lost(process, FailureReason.INTERNAL, f"worker protocol error: {exc}", started, retry=False)

    async def _stop_job(self, process: WorkerProcess, job_id: str) -> None:
        """Have the worker stop a job nobody waits for any more; keep it if it answers within cancel_timeout_s."""
        bound = self._settings.cancel_timeout_s
        try:
            stopped, oom = await self._cancel(process, job_id, time.monotonic() + bound)
        except TimeoutError:
            self._replace(
                process, f"job {job_id}: no answer to cancel within cancel_timeout_s = {bound:g} s", graceful=False
            )
            return
        except (WorkerGone, ConnectionError, ProtocolError) as exc:
            self._replace(process, f"job {job_id}: cancelling it failed: {exc}", graceful=False)
            return
        except BaseException:
            process.kill()  # close() cancelled this wait: the GPU must not go on with a lost job meanwhile
            raise
        when = "after it had ended" if stopped.step is None else f"after step {stopped.step}"
        log.info("worker %d (pid %d): job %s cancelled %s", process.slot, process.pid, job_id, when)
        process.jobs += 1
        if oom:
            self._replace(process, f"{FailureReason.OOM.value} in job {job_id}, cancelled meanwhile", graceful=True)
        else:
            await self._after_job(process)

    @staticmethod
    async def _cancel(process: WorkerProcess, job_id: str, deadline: float) -> tuple[CancelledJob, bool]:
        """Send `cancel` and read up to its answer; also whether the job ran out of memory before it stopped."""
        await process.send(Cancel(job_id))
        oom = False
        while True:
            message = await process.receive(deadline - time.monotonic())
            if job_id_of(message) != job_id:
                raise ProtocolError(f"{message.TYPE} for job {job_id_of(message)!r} while cancelling {job_id!r}")
            if isinstance(message, CancelledJob):
                return message, oom
            # Progress, or the end of a job that finished before the cancel reached it: nobody takes it now.
            oom = oom or (isinstance(message, WorkerFailed) and message.reason is WorkerFailure.OOM)

    def _lost(
        self,
        process: WorkerProcess,
        reason: FailureReason,
        detail: str,
        started: float,
        *,
        graceful: bool = False,
        retry: bool = True,
    ) -> Failed:
        """The job failed in a way that leaves the worker unfit to serve: report it and replace the worker."""
        self._replace(process, f"{reason.value}: {detail}", graceful=graceful)
        return Failed(reason, detail, retryable=retry, gpu_ms=_elapsed_ms(started))

    def _settle(self, process: WorkerProcess, request: ResolvedRequest, event: BackendEvent, started: float) -> None:
        self._jobs_served += 1
        process.jobs += 1
        succeeded = isinstance(event, Finished)
        self._recent.append(succeeded)
        if succeeded:
            # What the user waits for, pipe and PNG included, is what the router's ETA should predict.
            seconds = time.monotonic() - started
            self._times.add(request, seconds)
            self._last_seconds = seconds
        else:
            self._failures += 1
        if not process.retired:
            # Between-jobs checks run in the background so the result reaches the user without waiting for them.
            self._tasks.spawn(self._after_job(process))

    async def _after_job(self, process: WorkerProcess) -> None:
        settings = self._settings
        reason = ""
        if self._slots[process.slot].styles_version != self._styles_version:
            reason = "the styles were reloaded"
        elif process.jobs >= settings.recycle_after_jobs:
            reason = f"served {process.jobs} jobs (recycle_after_jobs = {settings.recycle_after_jobs})"
        else:
            try:
                memory = await self._memory(process)
            except (TimeoutError, WorkerGone, ProtocolError, ConnectionError) as exc:
                reason = f"no answer to a memory check: {exc}"
            else:
                growth = memory.rss_mb - process.rss_start_mb
                if memory.slack_mb > settings.max_reserved_slack_mb:
                    reason = (
                        f"reserved-minus-allocated GPU memory {memory.slack_mb:.0f} MB"
                        f" > max_reserved_slack_mb = {settings.max_reserved_slack_mb}"
                    )
                elif growth > settings.max_rss_growth_mb:
                    reason = f"RSS grew by {growth:.0f} MB > max_rss_growth_mb = {settings.max_rss_growth_mb}"
        if reason:
            self._replace(process, reason, graceful=True)
        else:
            await self._make_idle(process)

    async def _make_idle(self, process: WorkerProcess) -> None:
        process.busy = False
        async with self._changed:
            self._idle.append(process)
            self._changed.notify_all()

    async def _memory(self, process: WorkerProcess) -> MemoryStats:
        await process.send(Stats())
        memory = expect(await process.receive(self._settings.step_timeout_s), MemoryStats)
        process.rss_mb = memory.rss_mb
        return memory

    # ---- worker processes ----

    def _ensure_launch(self, slot: _Slot) -> None:
        if not slot.launching and not self._closed:
            slot.launching = True
            self._tasks.spawn(self._launch(slot))

    async def _launch(self, slot: _Slot) -> None:
        """Start a worker for the slot, retrying with backoff until one is ready or the backend closes."""
        delay = 1.0
        try:
            while not self._closed:
                try:
                    process = await self._start_process(slot)
                except _StartFailed as exc:
                    slot.start_failures += 1
                    slot.last_error = str(exc)
                    log.error("worker %d failed to start (%d in a row): %s", slot.index, slot.start_failures, exc)
                    async with self._changed:
                        self._changed.notify_all()  # waiting jobs give up once every slot is broken
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_START_BACKOFF_S)
                    continue
                slot.start_failures = 0
                slot.process = process
                await self._make_idle(process)
                return
        finally:
            slot.launching = False

    async def _start_process(self, slot: _Slot) -> WorkerProcess:
        transport = await (self._spawn_worker(slot) if slot.socket is None else _attach(slot.socket))
        process = WorkerProcess(slot.index, transport, self._on_exit)
        self._live.add(process)
        try:
            await process.send(Hello(PROTOCOL_VERSION))
            ready = await process.receive(self._settings.start_timeout_s)
            if isinstance(ready, WorkerFailed):
                raise _StartFailed(ready.detail)
            if not isinstance(ready, Ready) or ready.version != PROTOCOL_VERSION:
                raise _StartFailed(f"expected ready (protocol {PROTOCOL_VERSION}), got {ready}")
            process.device = ready.device
            slot.styles = ready.styles
            process.rss_start_mb = (await self._memory(process)).rss_mb
        except (TimeoutError, WorkerGone, ProtocolError, ConnectionError, _StartFailed) as exc:
            await process.stop(graceful=False)
            if isinstance(exc, TimeoutError):
                raise _StartFailed(f"not ready within start_timeout_s = {self._settings.start_timeout_s:g} s") from exc
            raise _StartFailed(str(exc)) from exc
        except BaseException:
            process.kill()
            raise
        self._workers_started += 1
        log.info("worker %d ready: pid %d on %s", slot.index, process.pid, process.device)
        return process

    async def _spawn_worker(self, slot: _Slot) -> ChildPipes:
        arguments = worker_args(self._settings, self._model, self._kontext, self._styles)
        slot.styles_version = self._styles_version
        argv = [self._python, "-m", "engine.backends.local", *arguments]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._worker_env(slot),
                # Its own session: a Ctrl-C meant for the bot must not kill workers before close() shuts them down.
                start_new_session=True,
            )
        except OSError as exc:
            raise _StartFailed(f"cannot run {self._python}: {exc}") from exc
        return ChildPipes(proc)

    def _worker_env(self, slot: _Slot) -> dict[str, str]:
        env = {**os.environ, **self._extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), env.get("PYTHONPATH"))))
        if slot.gpu is not None:
            # PCI order makes CUDA's device numbers agree with NVML's, which the GPU probe uses.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        return env

    def _replace(self, process: WorkerProcess, reason: str, *, graceful: bool) -> None:
        """Take the worker out of service now and start its successor once it has gone."""
        if process.retired:
            return
        process.retired = True
        if not graceful:
            process.kill()  # at once, even if the event loop is busy: the GPU should stop working on a lost job
        self._recycles += 1
        log.warning("worker %d (pid %d): %s; restarting it", process.slot, process.pid, reason)
        slot = self._slots[process.slot]
        slot.process = None
        slot.launching = True  # so that no job waiting for a worker starts a second successor meanwhile
        self._tasks.spawn(self._retire(process, slot, graceful=graceful))

    async def _retire(self, process: WorkerProcess, slot: _Slot, *, graceful: bool) -> None:
        # The successor starts only after its predecessor exits: two copies of FLUX rarely fit on one GPU.
        try:
            await process.stop(graceful=graceful)
        finally:
            slot.launching = False
        self._ensure_launch(slot)

    def _on_exit(self, process: WorkerProcess) -> None:
        self._live.discard(process)
        if not (process.retired or process.busy or self._closed):
            self._replace(process, f"died while idle: {process.exit_detail()}", graceful=False)

    # ---- health ----

    def _unavailable_detail(self) -> str:
        if self._closed:
            return "the local backend is shutting down"
        errors = "; ".join(f"worker {slot.index}: {slot.last_error}" for slot in self._slots if slot.last_error)
        return f"no local worker could start ({errors})"[:1000]

    def _detail(self) -> str:
        up = [slot for slot in self._slots if slot.process is not None]
        parts = [f"{len(up)}/{len(self._slots)} workers up"]
        if self._recent:
            failed = self._recent.count(False)
            parts.append(f"{failed}/{len(self._recent)} recent jobs failed ({failed / len(self._recent):.0%})")
        parts.append(f"{self._recycles} recycles")
        parts.extend(
            f"worker {slot.index} cannot start: {slot.last_error[:200]}" for slot in self._slots if slot.broken
        )
        parts.extend(reading.text for reading in self.gpu_readings())
        return "; ".join(parts)


async def _attach(path: Path) -> Transport:
    """Connect to the worker unit listening on `path`, waiting out the moment systemd takes to restart one."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    delay = 0.05
    while True:
        try:
            return await UnitSocket.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            # No socket yet, or the stale one of a process that has ended: the unit is (re)starting, or down.
            if time.monotonic() + delay > deadline:
                raise _StartFailed(
                    f"nothing listens on {path} after {CONNECT_WAIT_S:g} s ({exc.strerror}):"
                    " is its flux-bot-worker@ unit running?"
                ) from exc
        except OSError as exc:
            raise _StartFailed(f"cannot attach to {path}: {exc}") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_CONNECT_RETRY_S)


def _weights(path: Path) -> str:
    """A folder as an absolute path (the worker may run elsewhere); a Hugging Face id as it is."""
    return str(path.resolve()) if path.exists() else str(path)


def _adapter_file(file: str) -> str:
    """A local adapter file as an absolute path (the worker may run elsewhere); an hf: file as it is."""
    return file if file.startswith("hf:") else str(Path(file).resolve())


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
