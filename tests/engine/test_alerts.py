"""Spend and failure-rate alerts, through the real engine: announced once, the highest threshold only, remembered
across a restart on the same database, and not at all without a cap or below the minimum number of jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from engine.alerts import Alert, FailureAlert, SpendAlert
from engine.models import FailureReason
from engine.service import Engine
from tests.conftest import SettingsFactory
from tests.engine.clocked import ClockedJobs, Outcome

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
PRO = Outcome(5, cost_micros=40_000)
BAD = Outcome(2, FailureReason.BAD_REQUEST)
GOOD = Outcome(2)


@pytest.fixture
async def jobs() -> AsyncIterator[ClockedJobs]:
    harness = ClockedJobs()
    yield harness
    await harness.close()


async def announced(engine: Engine, action: str) -> list[dict[str, object]]:
    """What was announced, oldest first, from the audit log (the durable record of every alert)."""
    await engine._alerts.drain()
    return [json.loads(str(row["detail"])) for row in reversed(await engine._store.audit_log(action))]


async def next_alert(stream: AsyncIterator[Alert]) -> Alert:
    return await asyncio.wait_for(anext(stream), 10)  # the bound only guards against a hung test


async def test_spend_thresholds_once_each_and_not_again_after_a_restart(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    # A $0.30 cap and $0.04 images: 50% is crossed by the 4th image, 80% by the 6th.
    settings = make_settings(limits={"global_api_usd_per_month": "0.30"}, tiers={"default": {}})
    engine = await jobs.open(settings)
    stream = engine._alerts.stream()
    for n in range(3):
        await jobs.run(engine, T0 + timedelta(minutes=n), "pro", PRO)
    assert await announced(engine, "alert.spend") == []
    await jobs.run(engine, T0 + timedelta(minutes=3), "pro", PRO)
    assert await next_alert(stream) == SpendAlert("2026-11", 50, 160_000, 300_000)

    await engine.close()  # a restart: what was announced is remembered in the database
    engine = await jobs.open(settings)
    stream = engine._alerts.stream()
    await jobs.run(engine, T0 + timedelta(minutes=4), "pro", PRO)  # 67%: 50% was already announced
    assert len(await announced(engine, "alert.spend")) == 1
    await jobs.run(engine, T0 + timedelta(minutes=5), "pro", PRO)  # 80%
    assert await next_alert(stream) == SpendAlert("2026-11", 80, 240_000, 300_000)
    assert await announced(engine, "alert.spend") == [
        {"month": "2026-11", "percent": 50, "spent_micros": 160_000, "cap_micros": 300_000},
        {"month": "2026-11", "percent": 80, "spent_micros": 240_000, "cap_micros": 300_000},
    ]


async def test_several_thresholds_crossed_at_once_announce_the_highest_and_a_new_month_starts_afresh(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        limits={"global_api_usd_per_month": "0.08"}, ops={"spend_alert_percents": [25, 50]}, tiers={"default": {}}
    )
    engine = await jobs.open(settings)
    stream = engine._alerts.stream()
    await jobs.run(engine, T0, "pro", PRO)  # 50% in one step: past 25% and 50%
    assert await next_alert(stream) == SpendAlert("2026-11", 50, 40_000, 80_000)
    await jobs.run(engine, datetime(2026, 12, 1, 9, tzinfo=UTC), "pro", PRO)
    assert await next_alert(stream) == SpendAlert("2026-12", 50, 40_000, 80_000)
    assert [a["percent"] for a in await announced(engine, "alert.spend")] == [50, 50]


async def test_no_spend_alerts_without_a_cap(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    engine = await jobs.open(make_settings(tiers={"default": {}}))
    for n in range(3):
        await jobs.run(engine, T0 + timedelta(minutes=n), "pro", PRO)
    assert await announced(engine, "alert.spend") == []
    assert await engine._store.get_control("alert.spend") is None


async def test_failure_rate_alert_needs_min_jobs_and_comes_at_most_once_an_hour(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    settings = make_settings(ops={"failure_alert_rate": 0.5, "failure_alert_min_jobs": 4}, tiers={"default": {}})
    engine = await jobs.open(settings)
    stream = engine._alerts.stream()
    minute = iter(range(1000))

    async def run(outcome: Outcome, start: datetime = T0) -> None:
        await jobs.run(engine, start + timedelta(minutes=next(minute)), "schnell", outcome)

    for outcome in (BAD, BAD, BAD, GOOD):  # 3 of 4 failed, but the 3 failures came before the 4th job ended
        await run(outcome)
    assert await announced(engine, "alert.failures") == []
    await run(BAD)  # 4 of 5 failed in the last hour
    assert await next_alert(stream) == FailureAlert(4, 5, 0.5, 3600)
    await run(BAD)  # still within the hour of the last alert
    assert len(await announced(engine, "alert.failures")) == 1

    await engine.close()
    engine = await jobs.open(settings)
    stream = engine._alerts.stream()
    await run(BAD)  # after a restart too
    assert len(await announced(engine, "alert.failures")) == 1

    later = T0 + timedelta(hours=2)  # the earlier jobs are out of the window and the last alert is old enough
    for outcome in (GOOD, GOOD, GOOD, BAD):  # 1 of 4: under the rate
        await run(outcome, later)
    assert len(await announced(engine, "alert.failures")) == 1
    await run(BAD, later)  # 2 of 5
    assert len(await announced(engine, "alert.failures")) == 1
    await run(BAD, later)  # 3 of 6: at the rate
    assert await next_alert(stream) == FailureAlert(3, 6, 0.5, 3600)
    assert [a["failed"] for a in await announced(engine, "alert.failures")] == [4, 3]
