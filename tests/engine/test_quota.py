"""Money rules: atomic reservations under concurrency, ledger invariants, calendar periods, admin overrides."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Settings
from engine.errors import BackendUnavailable, InvalidRequest, QuotaExceeded
from engine.ledger import Close, Scope
from engine.models import (
    BackendKind,
    ImageRequest,
    Job,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    Resource,
    RouteDecision,
)
from engine.quota import Quota
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend

PRO_PRICE = 40_000  # FLUX1.1 [pro]: 4 credits


async def test_concurrent_submits_never_overspend(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    """200 submits from 20 users at once against small budgets: every limit holds exactly."""
    settings = make_settings(
        tiers={"default": {"api_usd_per_month": "0.20", "images_per_day": 8}},
        limits={"guild_api_usd_per_month": "0.60", "global_api_usd_per_month": "2.00"},
    )
    api = ScriptedBackend(kind=BackendKind.API, slots=50)
    engine = await make_engine({BackendKind.API: api}, settings)
    users = [user(f"u{i}", guild=f"g{i % 4}") for i in range(20)]

    async def submit(who: Requester) -> str | None:
        try:
            queued = await engine.submit(who, ImageRequest("a lighthouse at dusk", "pro", mode=Mode.FAST))
        except (QuotaExceeded, BackendUnavailable):
            # The router refuses when it already sees no room; the reserve refuses when a concurrent submit took it.
            return None
        return queued.job_id

    results = await asyncio.gather(*(submit(who) for who in users for _ in range(10)))
    accepted = [job_id for job_id in results if job_id]
    for job_id in accepted:
        await wait_terminal(engine, job_id)

    month = engine._quota.periods().month
    for who in users:
        spent = await engine._store.usage(Scope("user", who.user_key), Resource.USD_MICROS, month)
        assert spent <= 200_000
    for guild in range(4):
        spent = await engine._store.usage(Scope("guild", f"discord:g{guild}"), Resource.USD_MICROS, month)
        assert spent <= 600_000
    total = await engine._store.usage(Scope("global", None), Resource.USD_MICROS, month)
    assert total <= 2_000_000
    # Each guild's $0.60 allows exactly 15 images at $0.04, and 4 guilds * 15 = 60 < the global 50 images: the
    # global $2.00 (50 images) binds first. Every dollar of room is used and not one micro-dollar more.
    assert len(accepted) == 50
    assert total == 50 * PRO_PRICE
    assert (await engine._store.ledger_totals())[Resource.USD_MICROS.value] == total


async def test_concurrent_jobs_limit(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(tiers={"default": {"concurrent_jobs": 2}})
    local = ScriptedBackend(gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local}, settings)
    alice = user()
    first = await engine.submit(alice, ImageRequest("one cat", "schnell"))
    await engine.submit(alice, ImageRequest("two cats", "schnell"))
    with pytest.raises(QuotaExceeded) as caught:
        await engine.submit(alice, ImageRequest("three cats", "schnell"))
    assert caught.value.limit == "jobs at once"
    assert local.gate is not None
    local.gate.set()
    await wait_terminal(engine, first.job_id)


def _job(job_id: str, who: Requester, backend: BackendKind) -> Job:
    request = ResolvedRequest("p", "pro", 1024, 1024, "1:1", 28, None, 1, Mode.AUTO)
    return Job(job_id, who, request, JobState.QUEUED, backend, "test", created_at=0.0)


operation = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 2), st.integers(1, 90_000)),
    st.tuples(st.just("settle"), st.integers(0, 2), st.floats(0, 1)),
    st.tuples(st.just("void"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("grant"), st.integers(0, 2), st.integers(1, 50_000)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=25))
def test_ledger_invariants_hold_for_any_sequence(operations: list[tuple[str, int, float]]) -> None:
    """Random reserve/settle/void/grant: balances stay within limits; the ledger sums to the reported spend."""
    asyncio.run(_check_ledger_invariants(operations))


async def _check_ledger_invariants(operations: list[tuple[str, int, float]]) -> None:
    user_limit, global_limit = 200_000, 450_000
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings.model_validate(
            {
                "bot": {"state_dir": folder},
                "tiers": {"default": {"api_usd_per_month": "0.20"}},
                "limits": {"global_api_usd_per_month": "0.45"},
            }
        )
        store = await Store.open(Path(folder) / "ledger.db")
        quota = Quota(store, settings, clock=lambda: 1_790_000_000.0)
        users = [Requester(Platform.CONSOLE, f"p{i}") for i in range(3)]
        open_jobs: dict[int, list[str]] = {0: [], 1: [], 2: []}
        granted = [0, 0, 0]
        expected_posted = 0
        periods = quota.periods()
        try:
            for index, (op, who_index, value) in enumerate(operations):
                who = users[who_index]
                if op == "reserve":
                    decision = RouteDecision(BackendKind.API, "test", estimated_cost_micros=int(value))
                    limits = await quota.limits_for(who)
                    try:
                        await store.submit_job(
                            _job(f"j{index}", who, BackendKind.API),
                            quota.reservations(decision, periods, with_image=False),
                            quota.checks(who, limits, periods),
                            None,
                        )
                        open_jobs[who_index].append(f"j{index}")
                    except QuotaExceeded:
                        pass
                elif op in ("settle", "void") and open_jobs[who_index]:
                    job_id = open_jobs[who_index].pop(0)
                    [reservation] = await store.open_reservations(job_id)
                    amount = None if op == "void" else int(reservation.amount * value)  # actual <= estimate
                    await store.finish_job(job_id, JobState.DONE, [Close(reservation.id, amount, op)], now=1.0)
                    expected_posted += amount or 0
                elif op == "grant":
                    await quota.grant(who.user_key, Resource.USD_MICROS, int(value), "admin")
                    granted[who_index] += int(value)

                for i, each in enumerate(users):
                    used = await store.usage(Scope("user", each.user_key), Resource.USD_MICROS, periods.month)
                    assert used <= user_limit, (i, used)
                    assert used >= -granted[i]
                everyone = await store.usage(Scope("global", None), Resource.USD_MICROS, periods.month)
                assert everyone <= global_limit
            assert await store.verify_totals() == []  # the running totals are what the ledger's lines add up to
            rows = await store.spend_report(periods.month)
            assert sum(row.usd_micros for row in rows) == expected_posted
            assert (await store.ledger_totals()).get(Resource.USD_MICROS.value, 0) == expected_posted
        finally:
            await store.close()


async def test_ledger_is_append_only(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    done = await engine.submit(user(), ImageRequest("a quiet harbour", "schnell"))
    await wait_terminal(engine, done.job_id)
    import aiosqlite

    async with aiosqlite.connect(engine._store.path) as db:
        with pytest.raises(aiosqlite.IntegrityError, match="append-only"):
            await db.execute("UPDATE ledger SET amount = 0")
        with pytest.raises(aiosqlite.IntegrityError, match="append-only"):
            await db.execute("DELETE FROM ledger")


async def test_periods_reset_by_the_calendar(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(bot={"timezone": "Europe/Berlin"}, tiers={"default": {"images_per_day": 1}})
    now = [1_795_000_000.0]  # 2026-11-18 (a Wednesday), mid-morning in Berlin
    store = await Store.open(tmp_path / "periods.db")
    quota = Quota(store, settings, clock=lambda: now[0])
    alice = Requester(Platform.CONSOLE, "alice")
    try:
        periods = quota.periods()
        assert periods.day_resets_at.hour == 0 and periods.day_resets_at.tzname() == "CET"
        decision = RouteDecision(BackendKind.LOCAL, "t", estimated_gpu_ms=1)
        limits = await quota.limits_for(alice)
        await store.submit_job(
            _job("a", alice, BackendKind.LOCAL),
            quota.reservations(decision, periods, with_image=True),
            quota.checks(alice, limits, periods),
            None,
        )
        with pytest.raises(QuotaExceeded) as caught:
            await store.submit_job(
                _job("b", alice, BackendKind.LOCAL),
                quota.reservations(decision, periods, with_image=True),
                quota.checks(alice, limits, periods),
                None,
            )
        assert caught.value.resets_at is not None
        assert caught.value.resets_at.timestamp() == periods.day_resets_at.timestamp()
        now[0] = periods.day_resets_at.timestamp() + 1  # the next day: a new allowance, no cron involved
        tomorrow = quota.periods()
        await store.submit_job(
            _job("c", alice, BackendKind.LOCAL),
            quota.reservations(decision, tomorrow, with_image=True),
            quota.checks(alice, limits, tomorrow),
            None,
        )
    finally:
        await store.close()


async def test_admin_overrides_grants_and_reset(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(
        tiers={"default": {"images_per_day": 1}, "patron": {"roles": ["r-patron"], "images_per_day": 5}},
    )
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    admin = user("root", admin=True)
    alice = user("alice")
    first = await engine.submit(alice, ImageRequest("a red fox", "schnell"))
    await wait_terminal(engine, first.job_id)
    with pytest.raises(QuotaExceeded):
        await engine.submit(alice, ImageRequest("a red fox again", "schnell"))

    view = await engine.admin_quota_grant(admin, alice.user_key, Resource.IMAGES, 1)
    assert view.lines[0].remaining == 1
    second = await engine.submit(alice, ImageRequest("a red fox again", "schnell"))
    await wait_terminal(engine, second.job_id)

    view = await engine.admin_quota_set(admin, alice.user_key, "images_per_day", "10")
    assert view.limits.images_per_day == 10 and "override" in view.limits.tier
    view = await engine.admin_quota_reset(admin, alice.user_key)
    assert view.lines[0].used == 0
    view = await engine.admin_quota_set(admin, alice.user_key, "images_per_day", "tier")
    assert view.limits.images_per_day == 1

    patron = user("pat", roles=("r-patron",))
    assert (await engine.quota_view(patron)).limits.tier == "patron"
    with pytest.raises(InvalidRequest):
        await engine.admin_quota_set(admin, alice.user_key, "images_per_week", "3")
    with pytest.raises(InvalidRequest):
        await engine.admin_quota_set(admin, alice.user_key, "api_usd_per_month", "lots")
    log = await engine._store.audit_log()
    assert {"quota.grant", "quota.set", "quota.reset"} <= {entry["action"] for entry in log}


async def test_a_cancelled_writer_never_leaves_a_transaction_open(tmp_path: Path) -> None:
    """Cancel a writer at every point of its transaction; the next write must still work."""
    from engine.models import AuditEntry

    store = await Store.open(tmp_path / "cancel.db")
    try:
        for yields_before_cancel in range(12):

            async def write() -> None:
                while True:
                    await store.audit(AuditEntry("t", "write"))

            task = asyncio.create_task(write())
            for _ in range(yields_before_cancel):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.audit(AuditEntry("t", "after cancel"))  # "cannot start a transaction within a transaction"
        assert len(await store.audit_log(action="after cancel")) == 12
    finally:
        await store.close()
