"""The chaos run (bench/chaos.py) at CI size: 200 jobs from 20 users, two engine restarts, a worker SIGKILL and BFL
faults, against the real engine, BFL client, worker supervisor and delivery path.

Pass or fail comes only from the run's exact invariants (no job lost, none charged twice, no limit exceeded, the
ledger equal to settled costs plus billed failures and to what the BFL fake billed, one terminal message per job to
its user); how fast it ran never counts. The faults are drawn at random, so which job meets which fault varies from
run to run; every invariant must hold whatever the draw.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Options, run_chaos, summary
from engine.backends.bfl import BflBackend
from engine.backends.demo_model import ensure_demo_model
from engine.config import BflSettings, ModelSettings
from engine.models import (
    MICROS_PER_CREDIT,
    BackendEvent,
    BackendJob,
    Failed,
    FailureReason,
    Finished,
    Mode,
    ResolvedRequest,
)
from tests.fakes.bfl_server import API_KEY, FakeBfl, Faults

# Only guards against a hung run (a job that never ends shows up as a broken invariant well before this).
GUARD_S = 300


async def test_the_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    model = await asyncio.to_thread(ensure_demo_model, tmp_path / "demo-model")
    # A tenth of the jobs local (they take ~0.4 s each on a CPU); the rest go to the BFL fake or are refused.
    options = Options(jobs=200, users=20, seed=7, kills=1, local_share=0.1, guard_s=GUARD_S / 2)
    report = await asyncio.wait_for(run_chaos(options, tmp_path / "state", model), GUARD_S)
    print(summary(report))  # shown with -s or on failure
    assert report.problems == []
    assert report.attempts == 200
    assert len(report.stops) == 2  # each restart is due at the latest once every submit is in
    assert report.accepted > 0 and report.messages == report.accepted


# ---- the BFL fake's random faults, as the real client sees them (the chaos checks rely on this) ----

MODELS = {"pro": ModelSettings(display_name="pro", api_endpoint="flux-pro-1.1", price_credits=Decimal(4))}


async def _one_job(faults: Faults, **settings: Any) -> tuple[BackendEvent, FakeBfl]:
    async with FakeBfl(faults=faults) as bfl:
        backend = BflBackend(BflSettings(api_url=bfl.api_url, poll_interval_s=0.01, **settings), MODELS, API_KEY)
        await backend.start()
        try:
            request = ResolvedRequest("a fox", "pro", 256, 256, "1:1", 2, None, 1, Mode.AUTO)
            events = [event async for event in backend.run(BackendJob("j1", request))]
        finally:
            await backend.close()
    return events[-1], bfl


@pytest.mark.parametrize(
    ("faults", "reason", "billed_micros"),
    [
        (Faults(seed=3, timeout=1.0), FailureReason.TIMEOUT, 40_000),
        (Faults(seed=3, server_error=1.0), FailureReason.SERVER_ERROR, 0),
        (Faults(seed=3, moderated=1.0), FailureReason.MODERATED, 0),
    ],
)
async def test_each_fault_fails_the_job_and_the_client_charges_what_the_fake_billed(
    faults: Faults, reason: FailureReason, billed_micros: int
) -> None:
    last, bfl = await _one_job(faults, total_timeout_s=0.3)
    assert isinstance(last, Failed) and last.reason is reason
    assert last.charged_micros == billed_micros
    assert sum(bfl.billed().values()) * MICROS_PER_CREDIT == billed_micros
    assert sum(bfl.injected.values()) == 1


async def test_a_429_burst_longer_than_the_retries_fails_unbilled_and_a_shorter_one_is_ridden_out() -> None:
    last, bfl = await _one_job(Faults(burst_429=1.0, burst_length=(5, 5)), max_retries=2)
    assert isinstance(last, Failed) and last.reason is FailureReason.RATE_LIMITED and last.charged_micros == 0
    assert bfl.billed() == {} and bfl.injected == {"429 burst": 1, "429": 3}

    # With this seed the first submit starts a burst of two and the third draws no fault.
    last, bfl = await _one_job(Faults(seed=4, burst_429=0.5, burst_length=(2, 2)), max_retries=3)
    assert bfl.injected == {"429 burst": 1, "429": 2}
    assert isinstance(last, Finished) and last.cost_micros == 40_000
    assert sum(bfl.billed().values()) * MICROS_PER_CREDIT == 40_000
