"""/healthz and /metrics over real HTTP (aiohttp client against the real server on 127.0.0.1:0), on a real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from bot.ops_http import OpsServer
from engine.models import BackendEvent, BackendJob, BackendKind, FailureReason, ImageRequest, JobDone, JobFailed
from engine.service import Engine
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.engine.test_telemetry import Samples, samples, value
from tests.fakes.backends import ScriptedBackend, fail

UNLIMITED = {"default": {"concurrent_jobs": 100, "images_per_day": 1000}}


class Ops:
    """The server on an ephemeral loopback port, and a client for it."""

    def __init__(self, engine: Engine, server: OpsServer, http: aiohttp.ClientSession) -> None:
        self.engine, self.server, self.http = engine, server, http
        self.base = f"http://127.0.0.1:{server.port}"

    async def metrics(self) -> Samples:
        async with self.http.get(f"{self.base}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            return samples(await response.text())

    async def healthz(self) -> tuple[int, dict[str, object]]:
        async with self.http.get(f"{self.base}/healthz") as response:
            return response.status, await response.json()


@pytest.fixture
async def serve() -> AsyncIterator[list[Ops]]:
    """Servers started by the test (through `start_ops`), closed afterwards."""
    started: list[Ops] = []
    yield started
    for ops in started:
        await ops.http.close()
        await ops.server.close()


async def start_ops(engine: Engine, serve: list[Ops]) -> Ops:
    server = OpsServer(engine)
    port = await server.start("127.0.0.1", 0)
    assert port > 0 and server.port == port
    ops = Ops(engine, server, aiohttp.ClientSession())
    serve.append(ops)
    return ops


async def test_metrics_scraped_over_http_move_after_jobs(
    make_engine: EngineFactory, make_settings: SettingsFactory, serve: list[Ops]
) -> None:
    def plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
        return fail(FailureReason.MODERATED, retryable=False) if "moderate" in job.request.prompt else None

    local = ScriptedBackend(plan=plan, gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(tiers=UNLIMITED))
    ops = await start_ops(engine, serve)
    before = await ops.metrics()
    alice = user("alice")

    first = await engine.submit(alice, ImageRequest("a boat", "schnell"))
    await local.started_event.wait()  # held by the gate: the next jobs wait in the queue
    queued = [await engine.submit(alice, ImageRequest(prompt, "schnell")) for prompt in ("moderate me", "a ship")]
    to_cancel = await engine.submit(alice, ImageRequest("a raft", "schnell"))
    waiting = await ops.metrics()
    assert value(waiting, "flux_bot_jobs_queued", backend="local") == 3
    assert value(waiting, "flux_bot_jobs_running", backend="local") == 1
    await engine.cancel(alice, to_cancel.job_id)
    assert value(await ops.metrics(), "flux_bot_jobs_queued", backend="local") == 2

    assert local.gate is not None
    local.gate.set()
    assert isinstance(await wait_terminal(engine, first.job_id), JobDone)
    assert isinstance(await wait_terminal(engine, queued[0].job_id), JobFailed)
    assert isinstance(await wait_terminal(engine, queued[1].job_id), JobDone)
    after = await ops.metrics()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("flux_bot_jobs_submitted_total", backend="local", model="schnell") == 4
    assert moved("flux_bot_jobs_ended_total", state="done", backend="local") == 2
    assert moved("flux_bot_jobs_ended_total", state="failed", backend="local") == 1
    assert moved("flux_bot_jobs_ended_total", state="cancelled", backend="local") == 1
    assert moved("flux_bot_job_failures_total", reason="moderated", backend="local") == 1
    assert moved("flux_bot_job_queue_wait_seconds_count", backend="local") == 3  # the cancelled job never started
    assert moved("flux_bot_job_generation_seconds_count", backend="local") == 2  # done jobs only
    assert moved("flux_bot_job_end_to_end_seconds_count", state="done", backend="local") == 2
    assert moved("flux_bot_api_spend_dollars_total", state="done") == 0  # local images cost no money
    assert value(after, "flux_bot_jobs_queued", backend="local") == 0


async def test_healthz_turns_unhealthy_when_the_database_is_unreachable(
    make_engine: EngineFactory, serve: list[Ops]
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    ops = await start_ops(engine, serve)
    status, body = await ops.healthz()
    assert status == 200
    assert body["status"] == "ok" and body["problems"] == []
    assert body["database"] == {"ok": True, "error": None}
    assert body["backends"] == {
        "local": {"available": True, "healthy": True, "paused": False, "in_flight": 0, "capacity": 1, "detail": ""}
    }

    await engine._store.close()  # the connection is gone: every query now fails
    status, body = await ops.healthz()
    assert status == 503
    assert body["status"] == "unhealthy"
    database = body["database"]
    assert isinstance(database, dict) and database["ok"] is False and "no active connection" in database["error"]
    assert body["problems"] == [f"database: {database['error']}"]
    scraped = await ops.metrics()  # /metrics still answers, and says the database did not
    assert value(scraped, "flux_bot_database_up") == 0
    assert not any(name == "flux_bot_jobs_queued" for name, _ in scraped)  # no stale queue depths


async def test_healthz_is_unhealthy_when_no_backend_can_take_jobs(make_engine: EngineFactory, serve: list[Ops]) -> None:
    local = ScriptedBackend(healthy=False)
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.LOCAL: local, BackendKind.API: api})
    ops = await start_ops(engine, serve)
    status, _ = await ops.healthz()
    assert status == 200  # the API alone can still take jobs

    await engine.admin_pause(user("root", admin=True), BackendKind.API, True)
    status, body = await ops.healthz()
    assert status == 503
    assert body["problems"] == ["local: unhealthy", "api: paused"]
    assert body["database"] == {"ok": True, "error": None}
