"""Metrics and the job log, driven by real jobs through the real engine (only the image making is scripted)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.backends.base import Backend
from engine.backends.gpu_probe import GpuProbe, GpuReading
from engine.backends.local.supervisor import LocalBackend, WorkerInfo
from engine.config import LocalSettings, Secrets
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    Failed,
    FailureReason,
    Finished,
    ImageRequest,
    JobCancelled,
    JobDone,
    JobFailed,
)
from engine.service import Engine
from engine.store import Store
from engine.telemetry import WorkerPool
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend, fail, tiny_png

UNLIMITED = {"default": {"concurrent_jobs": 100, "images_per_day": 1000}}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str | bytes) -> Samples:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def job_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The flux_bot.jobs records, each parsed from logfmt back into its fields."""
    return [
        dict(pair.split("=", 1) for pair in shlex.split(record.getMessage()))
        for record in caplog.records
        if record.name == "flux_bot.jobs"
    ]


class Clock:
    """The engine's clock, moved by the test: durations come out exact."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clocked_engine(make_settings: SettingsFactory) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """make_engine with the engine's clock in the test's hands."""
    engines: list[Engine] = []

    async def build(backends: dict[BackendKind, Backend], clock: Clock) -> Engine:
        settings = make_settings(tiers=UNLIMITED)
        engine = Engine(settings, Secrets(), await Store.open(settings.bot.database_path, clock), backends, clock=clock)
        await engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        await engine.close()


async def test_counters_and_histograms_move_by_exactly_the_jobs_that_ran(
    make_engine: EngineFactory, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def local_plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        return fail(FailureReason.OOM) if "oom" in job.request.prompt and attempt == 1 else None

    def api_plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        return fail(FailureReason.TIMEOUT, charged=25_000) if "timeout" in job.request.prompt else None

    local = ScriptedBackend(plan=local_plan, gate=asyncio.Event())
    api = ScriptedBackend(kind=BackendKind.API, slots=4, plan=api_plan)
    engine = await make_engine(
        {BackendKind.LOCAL: local, BackendKind.API: api},
        make_settings(tiers=UNLIMITED, scheduler={"max_running_per_user": 4}),
    )
    before = samples(await engine._telemetry.scrape())
    alice = user("alice")

    held = await engine.submit(alice, ImageRequest("a lamp in a secret garden", "schnell"))
    await local.started_event.wait()  # held mid-generation by the gate, so the next local jobs queue
    cancelled = await engine.submit(alice, ImageRequest("a kettle in a secret garden", "schnell"))
    assert await engine.cancel(alice, cancelled.job_id) == JobCancelled(cancelled.job_id, 0)
    rerouted = await engine.submit(alice, ImageRequest("oom: a teapot in a secret garden", "schnell"))
    waiting = samples(await engine._telemetry.scrape())
    assert value(waiting, "flux_bot_jobs_queued", backend="local") == 1
    assert value(waiting, "flux_bot_jobs_running", backend="local") == 1
    assert value(waiting, "flux_bot_jobs_queued", backend="api") == 0

    done_api = await engine.submit(alice, ImageRequest("a tower in a secret garden", "pro"))
    failed_api = await engine.submit(alice, ImageRequest("timeout: a tower in a secret garden", "pro"))
    assert isinstance(await wait_terminal(engine, done_api.job_id), JobDone)
    failed = await wait_terminal(engine, failed_api.job_id)
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.TIMEOUT and failed.charged_micros == 25_000
    assert local.gate is not None
    local.gate.set()
    for queued in (held, rerouted):
        assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
    after = samples(await engine._telemetry.scrape())

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("flux_bot_jobs_submitted_total", backend="local", model="schnell") == 3
    assert moved("flux_bot_jobs_submitted_total", backend="api", model="pro") == 2
    ended = {
        (state, kind): moved("flux_bot_jobs_ended_total", state=state, backend=kind)
        for state in ("done", "failed", "cancelled")
        for kind in ("local", "api")
    }
    assert ended == {
        ("done", "local"): 2,
        ("done", "api"): 1,
        ("failed", "local"): 0,
        ("failed", "api"): 1,
        ("cancelled", "local"): 1,
        ("cancelled", "api"): 0,
    }
    failures = {labels: v for (name, labels), v in after.items() if name == "flux_bot_job_failures_total"}
    assert failures == {frozenset({("reason", "timeout"), ("backend", "api")}): 1}
    assert moved("flux_bot_job_reroutes_total", from_backend="local", to_backend="local", reason="oom") == 1
    assert moved("flux_bot_api_spend_dollars_total", state="done") == pytest.approx(0.04)
    assert moved("flux_bot_api_spend_dollars_total", state="failed") == pytest.approx(0.025)
    assert moved("flux_bot_api_spend_dollars_total", state="cancelled") == 0
    # Queue wait per attempt: the held job, the teapot's OOM attempt and its retry; both API jobs.
    assert moved("flux_bot_job_queue_wait_seconds_count", backend="local") == 3
    assert moved("flux_bot_job_queue_wait_seconds_count", backend="api") == 2
    assert moved("flux_bot_job_generation_seconds_count", backend="local") == 2
    assert moved("flux_bot_job_generation_seconds_count", backend="api") == 1
    assert moved("flux_bot_job_end_to_end_seconds_count", state="done", backend="local") == 2
    assert moved("flux_bot_job_end_to_end_seconds_count", state="cancelled", backend="local") == 1
    assert moved("flux_bot_job_end_to_end_seconds_count", state="failed", backend="api") == 1
    assert value(after, "flux_bot_jobs_queued", backend="local") == 0
    assert value(after, "flux_bot_database_up") == 1

    # One line per transition (no progress lines), and no prompt in any log line of any logger.
    lines = job_lines(caplog)
    events = {
        name: [line["event"] for line in lines if line["job"] == queued.job_id]
        for name, queued in {
            "held": held,
            "cancelled": cancelled,
            "rerouted": rerouted,
            "done_api": done_api,
            "failed_api": failed_api,
        }.items()
    }
    assert events == {
        "held": ["job.queued", "job.started", "job.done"],
        "cancelled": ["job.queued", "job.cancelled"],
        "rerouted": ["job.queued", "job.started", "job.rerouted", "job.started", "job.done"],
        "done_api": ["job.queued", "job.started", "job.done"],
        "failed_api": ["job.queued", "job.started", "job.failed"],
    }
    assert all(line["user"] == alice.user_key for line in lines)
    failed_line = next(line for line in lines if line["event"] == "job.failed")
    assert failed_line["failure"] == "timeout" and failed_line["cost_usd"] == "0.025000"
    assert failed_line["route"] == "api" and failed_line["model"] == "pro"
    reroute_line = next(line for line in lines if line["event"] == "job.rerouted")
    assert (
        reroute_line["after"] == "oom" and reroute_line["from"] == "local" and "local retry" in reroute_line["reason"]
    )
    assert "secret garden" not in caplog.text


async def test_log_lines_carry_exact_durations_and_cost(
    clocked_engine: Callable[..., Awaitable[Engine]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_bot.jobs")
    clock = Clock()

    def plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        if job.request.prompt != "second":
            return None
        clock.now += 3.4  # generation takes 3.4 s
        return [Finished(tiny_png(), "image/png", job.request.seed)]

    local = ScriptedBackend(plan=plan, gate=asyncio.Event())
    engine = await clocked_engine({BackendKind.LOCAL: local}, clock)
    first = await engine.submit(user(), ImageRequest("first", "schnell"))
    await local.started_event.wait()
    second = await engine.submit(user(), ImageRequest("second", "schnell"))
    clock.now += 1.2  # the second job waits 1.2 s behind the first
    assert local.gate is not None
    local.gate.set()
    for queued in (first, second):
        assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)

    done = [line for line in job_lines(caplog) if line["event"] == "job.done"]
    assert done == [
        {
            "event": "job.done",
            "job": first.job_id,
            "user": "discord:alice",
            "route": "local",
            "model": "schnell",
            "reason": first.route.reason,
            "queue_s": "0.00",
            "gen_s": "1.20",
            "total_s": "1.20",
            "cost_usd": "0.000000",
        },
        {
            "event": "job.done",
            "job": second.job_id,
            "user": "discord:alice",
            "route": "local",
            "model": "schnell",
            "reason": second.route.reason,
            "queue_s": "1.20",
            "gen_s": "3.40",
            "total_s": "4.60",
            "cost_usd": "0.000000",
        },
    ]
    raw = next(r.getMessage() for r in caplog.records if r.name == "flux_bot.jobs" and second.job_id in r.getMessage())
    assert f'reason="{second.route.reason}"' in raw  # a value with spaces is quoted
    scraped = samples(await engine._telemetry.scrape())
    assert value(scraped, "flux_bot_job_queue_wait_seconds_sum", backend="local") == pytest.approx(1.2)
    assert value(scraped, "flux_bot_job_generation_seconds_sum", backend="local") == pytest.approx(4.6)
    assert value(scraped, "flux_bot_job_generation_seconds_bucket", backend="local", le="2.0") == 1
    assert value(scraped, "flux_bot_job_generation_seconds_bucket", backend="local", le="5.0") == 2
    assert value(scraped, "flux_bot_job_end_to_end_seconds_sum", state="done", backend="local") == pytest.approx(5.8)


async def test_a_job_recovered_after_a_restart_counts_without_durations(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    held = ScriptedBackend(gate=asyncio.Event())
    first = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), {BackendKind.LOCAL: held})
    await first.start()
    queued = await first.submit(user(), ImageRequest("a lamp", "schnell"))
    await held.started_event.wait()
    await first.close()  # the job stays `running` in the database

    caplog.clear()
    caplog.set_level(logging.INFO, logger="flux_bot.jobs")
    second = Engine(
        settings, Secrets(), await Store.open(settings.bot.database_path), {BackendKind.LOCAL: ScriptedBackend()}
    )
    await second.start()
    try:
        assert isinstance(await wait_terminal(second, queued.job_id), JobDone)
        scraped = samples(await second._telemetry.scrape())
    finally:
        await second.close()
    assert value(scraped, "flux_bot_jobs_ended_total", state="done", backend="local") == 1
    assert value(scraped, "flux_bot_jobs_submitted_total", backend="local", model="schnell") == 0
    assert value(scraped, "flux_bot_job_queue_wait_seconds_count", backend="local") == 0
    assert value(scraped, "flux_bot_job_generation_seconds_count", backend="local") == 0
    assert value(scraped, "flux_bot_job_end_to_end_seconds_count", state="done", backend="local") == 0
    lines = job_lines(caplog)
    assert [line["event"] for line in lines] == ["job.started", "job.done"]
    done = lines[-1]
    assert done["user"] == "discord:alice" and done["route"] == "local" and done["model"] == "schnell"
    assert not {"queue_s", "gen_s", "total_s"} & done.keys()  # nobody here measured them


@dataclass
class SupervisedBackend(ScriptedBackend):
    """A scripted local backend that also reports workers and GPUs the way LocalBackend does."""

    probe: GpuProbe = field(default_factory=GpuProbe)
    recycles: int = 2

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(0, 4242, "cuda:0", 3, False, 900.0, 950.0)]

    def gpu_readings(self) -> list[GpuReading]:
        reading = self.probe.read(0)
        return [reading] if reading else []


def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-ml-py's module shape, answering for one GPU at 64 °C with 30 of 80 GiB used (no GPU in CI)."""

    class NVMLError(Exception):
        pass

    memory = SimpleNamespace(used=30 * 2**30, total=80 * 2**30)
    fake = SimpleNamespace(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetTemperature=lambda handle, sensor: 64,
        nvmlDeviceGetMemoryInfo=lambda handle: memory,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_gpu_probe_gives_a_typed_reading_and_the_routers_text(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch)
    probe = GpuProbe()
    assert probe.read(1) == GpuReading(1, 64, 30 * 2**30, 80 * 2**30)
    assert probe.describe(1) == "GPU1 64°C 30.0/80.0 GiB"


async def test_worker_and_gpu_gauges_are_read_at_scrape_time(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(monkeypatch)
    local = SupervisedBackend()
    engine = await make_engine({BackendKind.LOCAL: local})
    scraped = samples(await engine._telemetry.scrape())
    assert value(scraped, "flux_bot_worker_recycles_total") == 2
    assert value(scraped, "flux_bot_local_workers") == 1
    assert value(scraped, "flux_bot_local_worker_slots") == 1
    assert value(scraped, "flux_bot_gpu_temperature_celsius", gpu="0") == 64
    assert value(scraped, "flux_bot_gpu_memory_used_bytes", gpu="0") == 30 * 2**30
    assert value(scraped, "flux_bot_gpu_memory_total_bytes", gpu="0") == 80 * 2**30
    local.recycles = 3  # a worker was replaced: the next scrape says so, with no event in between
    assert value(samples(await engine._telemetry.scrape()), "flux_bot_worker_recycles_total") == 3
    health = await engine.health()
    assert health.ok and health.worker_slots == 1 and [w.pid for w in health.workers] == [4242]


async def test_the_real_local_backend_is_a_worker_pool(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    local = LocalBackend(LocalSettings(device="cpu", gpus=(0, 1)), settings.models, tmp_path / "no-model")
    assert isinstance(local, WorkerPool)
    store = await Store.open(settings.bot.database_path)
    try:
        engine = Engine(settings, Secrets(), store, {BackendKind.LOCAL: local})  # not started: no worker runs
        scraped = samples(await engine._telemetry.scrape())
    finally:
        await store.close()
    assert value(scraped, "flux_bot_local_worker_slots") == 2
    assert value(scraped, "flux_bot_local_workers") == 0
    assert value(scraped, "flux_bot_worker_recycles_total") == 0
    assert not any(name.startswith("flux_bot_gpu_") for name, _ in scraped)  # no GPU in use, no GPU series


async def test_a_failure_detail_cannot_forge_a_log_line(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_bot.jobs")
    detail = 'the API said: "no"\nevent=job.done job=forged'
    local = ScriptedBackend(plan=lambda job, attempt: [Failed(FailureReason.BAD_REQUEST, detail)])
    engine = await make_engine({BackendKind.LOCAL: local})
    queued = await engine.submit(user(), ImageRequest("a lamp", "schnell"))
    assert isinstance(await wait_terminal(engine, queued.job_id), JobFailed)
    messages = [record.getMessage() for record in caplog.records if record.name == "flux_bot.jobs"]
    assert not any("\n" in message for message in messages)
    lines = job_lines(caplog)
    assert [line["event"] for line in lines] == ["job.queued", "job.started", "job.failed"]
    assert lines[-1]["detail"] == 'the API said: "no"\\nevent=job.done job=forged'
