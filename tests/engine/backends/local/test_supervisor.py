"""LocalBackend and its worker processes on the tiny FLUX.1 pipeline: real diffusers code, real subprocesses, CPU.

Starting a worker costs several seconds of CPU (it imports torch, diffusers and transformers), and every failure
scenario restarts workers. So the scenarios that need workers run once per module, concurrently (the `runs`
fixture), and record what the backend yielded; each test then checks one behaviour in that record. The drivers act
on events (kill the worker once the first Progress arrives), never on elapsed time, and assert nothing themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.backends.base import Requeue
from engine.backends.demo_model import MARKER, VERSION, ensure_demo_model
from engine.backends.gpu_probe import GpuProbe
from engine.backends.local.cli import build_parser, options_from_args, worker_args
from engine.backends.local.faults import Fault, parse_fault
from engine.backends.local.pipeline import FLUX_LATENT_RGB, Options, preview_png, rgb_map
from engine.backends.local.supervisor import LocalBackend
from engine.models import BackendEvent, BackendKind, BackendStatus, Failed, FailureReason, Finished, Progress, Started
from tests.fakes.tiny_flux import (
    MODELS,
    SIZE,
    build_tiny_flux,
    kinds,
    png_size,
    tiny_backend,
    tiny_job,
    tiny_request,
    tiny_settings,
)

# Only guards against a hung test run; no scenario is expected to come near it.
GUARD_S = 300
# The worker's second job hangs at step 2 (after Progress 1) until something kills the process.
HANG_SECOND_JOB = "hang_at_step=2;job=2"
# The worker's second job stalls at step 2 (after Progress 1) until it is cancelled: a cancel always finds it running.
STALL_SECOND_JOB = "stall_at_step=2;job=2"


@dataclass
class Run:
    """What one scenario saw: events per job, the worker pid per job, and the backend's counters at the end."""

    jobs: dict[str, list[BackendEvent]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False
    status: BackendStatus | None = None
    recycles: int = 0
    workers_started: int = 0
    jobs_served: int = 0
    failures: int = 0
    error: BaseException | None = None

    def checked(self) -> Run:
        if self.error is not None:
            raise self.error
        return self


async def _run_job(
    backend: LocalBackend,
    run: Run,
    job_id: str,
    on_progress: Callable[[Progress], None] | None = None,
    **request: int,
) -> None:
    events = run.jobs.setdefault(job_id, [])
    async for event in backend.run(tiny_job(job_id, **request)):
        events.append(event)
        if isinstance(event, Started):
            (worker,) = (info for info in backend.workers() if info.busy)
            run.pids[job_id] = worker.pid
        elif isinstance(event, Progress) and on_progress is not None:
            on_progress(event)


async def _scenario(run: Run, backend: LocalBackend, body: Callable[[], Awaitable[None]]) -> None:
    try:
        await backend.start()
        await body()
        run.status = backend.status(queued_ahead=1, request=tiny_request())
    except BaseException as exc:  # recorded, and raised by the tests that read this run
        run.error = exc
    finally:
        run.recycles, run.jobs_served, run.failures = backend.recycles, backend.jobs_served, backend.failures
        run.workers_started = backend.workers_started
        await backend.close()


async def _cancel_mid_job(backend: LocalBackend, run: Run, job_id: str) -> None:
    """Start a job and cancel its consumer (as the scheduler does) once the first Progress arrives."""
    first_progress = asyncio.Event()
    consumer = asyncio.create_task(_run_job(backend, run, job_id, lambda _: first_progress.set()))
    await first_progress.wait()
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    run.cancelled = consumer.cancelled()


async def _crash_then_cancel(model: Path, run: Run) -> None:
    # The cancelled job hangs: its worker never answers the cancel, whatever the bound, and is killed after it.
    backend = tiny_backend(model, fault=HANG_SECOND_JOB, cancel_timeout_s=1.0)

    def sigkill_worker(progress: Progress) -> None:
        if progress.step == 1:
            os.kill(run.pids["killed"], signal.SIGKILL)

    async def body() -> None:
        await _run_job(backend, run, "first", width=96)
        await _run_job(backend, run, "killed", sigkill_worker)
        await _run_job(backend, run, "after_crash")
        await _cancel_mid_job(backend, run, "ignored")
        await _run_job(backend, run, "after_cancel")

    await _scenario(run, backend, body)


async def _cancel(model: Path, run: Run) -> None:
    backend = tiny_backend(model, fault=STALL_SECOND_JOB)

    async def body() -> None:
        await _run_job(backend, run, "before")
        await _cancel_mid_job(backend, run, "stopped")  # seed 1 as well: the same noise, stopped half-way
        await _run_job(backend, run, "next")

    await _scenario(run, backend, body)


async def _oom(model: Path, run: Run) -> None:
    backend = tiny_backend(model, fault="oom_at_step=2;job=2")

    async def body() -> None:
        for job_id in ("ok", "oom", "after_oom"):
            await _run_job(backend, run, job_id)

    await _scenario(run, backend, body)


async def _hang(model: Path, run: Run) -> None:
    # Generous for a watchdog test, so that a healthy step on a loaded CI machine never trips it; the hung job
    # waits this long, while the other scenarios run.
    backend = tiny_backend(model, fault=HANG_SECOND_JOB, step_timeout_s=5.0)

    async def body() -> None:
        for job_id in ("ok", "hung", "after_hang"):
            await _run_job(backend, run, job_id)

    await _scenario(run, backend, body)


async def _recycle(model: Path, run: Run) -> None:
    backend = tiny_backend(model, recycle_after_jobs=2)

    async def body() -> None:
        await asyncio.gather(*(_run_job(backend, run, f"r{n}", seed=n) for n in range(5)))

    await _scenario(run, backend, body)


async def _cannot_start(model: Path, run: Run) -> None:
    backend = LocalBackend(tiny_settings(), MODELS, model, python="/nonexistent/python3")

    async def body() -> None:
        await _run_job(backend, run, "orphan")

    await _scenario(run, backend, body)


SCENARIOS = {
    "crash_cancel": _crash_then_cancel,
    "cancel": _cancel,
    "oom": _oom,
    "hang": _hang,
    "recycle": _recycle,
    "cannot_start": _cannot_start,
}


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def supervisor_log() -> Iterator[list[str]]:
    """What the supervisor logged while the scenarios ran."""
    logger = logging.getLogger("engine.backends.local")
    handler, level = _Messages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def runs(tiny_flux: Path, supervisor_log: list[str]) -> dict[str, Run]:
    results = {name: Run() for name in SCENARIOS}

    async def run_all() -> None:
        scenarios = (scenario(tiny_flux, results[name]) for name, scenario in SCENARIOS.items())
        await asyncio.wait_for(asyncio.gather(*scenarios), GUARD_S)

    asyncio.run(run_all())
    return results


def _finished(events: list[BackendEvent]) -> Finished:
    assert isinstance(events[-1], Finished), kinds(events)
    return events[-1]


def _failed(events: list[BackendEvent]) -> Failed:
    assert isinstance(events[-1], Failed), kinds(events)
    return events[-1]


# ---- through real worker processes ----


def test_a_job_runs_end_to_end_through_a_worker(runs: dict[str, Run]) -> None:
    events = runs["crash_cancel"].checked().jobs["first"]
    assert kinds(events) == ["Started", "Progress", "Progress", "Progress", "Progress", "Finished"]
    assert isinstance(events[0], Started) and events[0].backend is BackendKind.LOCAL
    finished = _finished(events)
    assert finished.mime == "image/png"
    assert png_size(finished.image) == (96, SIZE)
    assert finished.seed == 1
    assert finished.gpu_ms > 0


def test_progress_and_previews_arrive_in_order(runs: dict[str, Run]) -> None:
    for run in runs.values():
        for job_id, events in run.checked().jobs.items():
            if not isinstance(events[-1], Finished):
                continue
            progress = [event for event in events if isinstance(event, Progress)]
            assert [(p.step, p.total) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)], job_id
            # preview_every = 1: a preview at every step but the last, which the image itself follows.
            previews = [p.preview_png for p in progress]
            assert previews[-1] is None
            for preview in previews[:-1]:
                assert preview is not None
                assert max(png_size(preview)) <= 128


def test_sigkill_mid_job_fails_as_a_retryable_crash_and_the_next_job_gets_a_new_worker(runs: dict[str, Run]) -> None:
    run = runs["crash_cancel"].checked()
    events = run.jobs["killed"]
    assert kinds(events) == ["Started", "Progress", "Failed"]
    failed = _failed(events)
    assert failed.reason is FailureReason.CRASH
    assert failed.retryable
    assert "SIGKILL" in failed.detail
    _finished(run.jobs["after_crash"])
    assert run.pids["after_crash"] != run.pids["killed"]


def test_cancelling_mid_job_stops_the_pipeline_and_the_same_worker_serves_the_next_job(
    runs: dict[str, Run], supervisor_log: list[str]
) -> None:
    run = runs["cancel"].checked()
    assert run.cancelled
    assert kinds(run.jobs["stopped"]) == ["Started", "Progress"]  # no terminal event: the consumer went away
    # The worker stopped the pipeline where the cancel found it (step 2 of 4) and answered.
    assert any(message.endswith("job stopped cancelled after step 2") for message in supervisor_log), supervisor_log
    _finished(run.jobs["next"])
    assert run.pids["before"] == run.pids["stopped"] == run.pids["next"]  # no new process...
    assert (run.workers_started, run.recycles) == (1, 0)  # ...so the model was loaded once
    assert (run.jobs_served, run.failures) == (2, 0)  # the cancelled job never ended, so it is not counted


def test_the_job_after_a_cancel_is_made_exactly_as_by_a_fresh_worker(runs: dict[str, Run]) -> None:
    after_cancel = _finished(runs["cancel"].checked().jobs["next"]).image
    assert after_cancel == _finished(runs["cancel"].jobs["before"]).image
    # The same request as the first job of a worker started after a crash: nothing of the cancel leaks into it.
    assert after_cancel == _finished(runs["crash_cancel"].checked().jobs["after_crash"]).image


def test_a_worker_that_does_not_stop_a_cancelled_job_in_time_is_replaced(
    runs: dict[str, Run], supervisor_log: list[str]
) -> None:
    run = runs["crash_cancel"].checked()
    assert run.cancelled
    assert kinds(run.jobs["ignored"]) == ["Started", "Progress"]  # never a Failed: the job ends cancelled
    assert any("job ignored: no answer to cancel within cancel_timeout_s = 1 s" in m for m in supervisor_log)
    with pytest.raises(ProcessLookupError):
        os.kill(run.pids["ignored"], 0)
    _finished(run.jobs["after_cancel"])
    assert run.pids["after_cancel"] != run.pids["ignored"]
    assert run.recycles == 2  # the crash and the cancellation
    assert run.workers_started == 3
    assert (run.jobs_served, run.failures) == (4, 1)  # the cancelled job never ended, so it is not counted


def test_an_oom_fails_the_job_recycles_the_worker_and_the_next_job_succeeds(runs: dict[str, Run]) -> None:
    run = runs["oom"].checked()
    _finished(run.jobs["ok"])
    failed = _failed(run.jobs["oom"])
    assert failed.reason is FailureReason.OOM
    assert failed.retryable
    assert "out of memory" in failed.detail
    _finished(run.jobs["after_oom"])
    assert run.pids["after_oom"] != run.pids["oom"] == run.pids["ok"]
    assert (run.recycles, run.jobs_served, run.failures) == (1, 3, 1)


def test_a_hung_step_hits_the_watchdog_and_the_worker_is_replaced(runs: dict[str, Run]) -> None:
    run = runs["hang"].checked()
    _finished(run.jobs["ok"])
    events = run.jobs["hung"]
    assert kinds(events) == ["Started", "Progress", "Failed"]
    failed = _failed(events)
    assert failed.reason is FailureReason.HUNG
    assert failed.retryable
    _finished(run.jobs["after_hang"])
    assert run.pids["after_hang"] != run.pids["hung"]
    with pytest.raises(ProcessLookupError):
        os.kill(run.pids["hung"], 0)


def test_workers_are_recycled_after_n_jobs_and_no_job_is_lost(runs: dict[str, Run]) -> None:
    run = runs["recycle"].checked()
    assert sorted(run.jobs) == [f"r{n}" for n in range(5)]
    for events in run.jobs.values():
        assert sum(isinstance(event, Finished | Failed) for event in events) == 1
        _finished(events)
    jobs_per_pid = [list(run.pids.values()).count(pid) for pid in set(run.pids.values())]
    assert sorted(jobs_per_pid) == [1, 2, 2]
    assert (run.recycles, run.jobs_served, run.failures) == (2, 5, 0)


def test_status_reports_health_failure_rate_and_recycles(runs: dict[str, Run]) -> None:
    status = runs["oom"].checked().status
    assert status is not None
    assert status.healthy
    assert "1/3 recent jobs failed (33%)" in status.detail
    assert "1 recycles" in status.detail
    assert status.eta_s > 0


def test_a_worker_that_cannot_start_fails_the_job_and_makes_the_backend_unhealthy(runs: dict[str, Run]) -> None:
    run = runs["cannot_start"].checked()
    failed = _failed(run.jobs["orphan"])
    assert failed.reason is FailureReason.CRASH
    assert failed.retryable
    assert "/nonexistent/python3" in failed.detail
    assert run.status is not None
    assert not run.status.healthy
    assert "cannot start" in run.status.detail


# ---- without workers ----


def test_eta_is_seeded_from_seconds_per_step_and_scaled_by_the_queue(tiny_flux: Path) -> None:
    backend = tiny_backend(tiny_flux)
    request = tiny_request(steps=4)
    per_job = 4 * MODELS["tiny"].local_seconds_per_step
    assert backend.estimate_seconds(request) == pytest.approx(per_job)
    status = backend.status(queued_ahead=2, request=request)
    assert status.eta_s == pytest.approx(per_job * 3)
    assert status.healthy and status.capacity == 1
    assert backend.supports("tiny", MODELS["tiny"])


def test_one_worker_per_configured_gpu(tiny_flux: Path) -> None:
    assert tiny_backend(tiny_flux, gpus=(0, 1)).capacity() == 2


def test_gpu_temperature_and_memory_come_from_nvml_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    queries: list[int] = []

    class NVMLError(Exception):
        pass

    def handle(index: int) -> int:
        queries.append(index)
        return index

    memory = SimpleNamespace(used=30 * 2**30, total=80 * 2**30)
    fake = SimpleNamespace(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetTemperature=lambda handle, sensor: 64,
        nvmlDeviceGetMemoryInfo=lambda handle: memory,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert probe.describe(1) == "GPU1 64°C 30.0/80.0 GiB"
    assert probe.describe(1) == "GPU1 64°C 30.0/80.0 GiB"
    assert queries == [1]  # cached: the router asks at every decision


def test_a_job_a_restart_cut_off_is_queued_again(tmp_path: Path) -> None:
    """Its worker process ended with the old supervisor: nothing is left to continue, so it starts over."""
    backend = LocalBackend(tiny_settings(), MODELS, tmp_path / "no-model")  # never started: no worker runs
    assert isinstance(backend.resume(tiny_job("cut-off")), Requeue)


def test_fault_switch_parsing() -> None:
    assert parse_fault(None) is None
    assert parse_fault("") is None
    assert parse_fault("oom_at_step=2") == Fault("oom", 2)
    assert parse_fault("hang_at_step=3;job=2") == Fault("hang", 3, 2)
    assert parse_fault("stall_at_step=2") == Fault("stall", 2)
    fault = parse_fault("crash_at_step=1;job=2")
    assert fault is not None and fault.fires(2, 1) and not fault.fires(1, 1)
    for bad in ("oom", "explode_at_step=1", "oom_at_step=1;hang_at_step=2", "job=2"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_worker_arguments_carry_every_switch() -> None:
    settings = tiny_settings(compile=True, fp8=True, fuse_qkv=True, vae_tiling=True, cpu_offload=True, warmup=False)
    options = options_from_args(build_parser().parse_args(worker_args(settings, "some/model")))
    assert options == Options(
        model="some/model",
        device="cpu",
        dtype="bfloat16",
        buckets=[(SIZE, SIZE)],
        warmup=False,
        compile=True,
        fp8=True,
        fuse_qkv=True,
        vae_tiling=True,
        cpu_offload=True,
        preview_every=1,
    )


def test_previews_are_small_pngs_projected_from_packed_latents() -> None:
    import torch

    # FLUX.1 packs 16 latent channels in 2x2 patches: (batch, (H/16)*(W/16), 64) for an 8x VAE.
    square = torch.randn(1, 64 * 64, 64)
    assert png_size(preview_png(square, 1024, 1024, vae_scale_factor=8)) == (128, 128)
    wide = torch.randn(1, 84 * 48, 64)
    assert png_size(preview_png(wide, 1344, 768, vae_scale_factor=8)) == (128, 73)
    # Another latent width gets a fixed fallback map: the same preview every time.
    four_channels = torch.randn(1, 16 * 16, 16)
    first = preview_png(four_channels, 256, 256, vae_scale_factor=8)
    assert first == preview_png(four_channels, 256, 256, vae_scale_factor=8)
    assert png_size(first) == (32, 32)
    assert torch.equal(rgb_map(16)[0], torch.tensor(FLUX_LATENT_RGB))


def test_the_demo_model_is_built_once_and_never_over_a_foreign_folder(tiny_flux: Path, tmp_path: Path) -> None:
    marker = tiny_flux / MARKER
    before = marker.stat().st_mtime_ns
    assert ensure_demo_model(tiny_flux) == tiny_flux
    assert marker.stat().st_mtime_ns == before
    foreign = tmp_path / "weights"
    foreign.mkdir()
    (foreign / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError):
        ensure_demo_model(foreign)


def test_a_demo_model_from_an_older_builder_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"version": VERSION - 1}))
    (folder / "stale.bin").write_bytes(b"old")
    assert ensure_demo_model(folder) == folder
    assert json.loads((folder / MARKER).read_text())["version"] == VERSION
    assert not (folder / "stale.bin").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]  # no staging or outdated folder left
