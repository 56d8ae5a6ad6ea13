"""The running totals: kept with every ledger line, backfilled by their migration, checked against the ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.ledger import Close, Reservation, Scope, Totals
from engine.models import AuditEntry, BackendKind, Job, JobState, Mode, Platform, Requester, ResolvedRequest, Resource
from engine.store import Store
from engine.store.schema import MIGRATIONS, statements

DAY, MONTH = "2026-11-26", "2026-11"
ALICE = Requester(Platform.DISCORD, "alice", guild_id="g1")
BOB = Requester(Platform.DISCORD, "bob", guild_id="g1")


def _job(job_id: str, who: Requester) -> Job:
    request = ResolvedRequest("p", "pro", 1024, 1024, "1:1", 28, None, 1, Mode.AUTO)
    return Job(job_id, who, request, JobState.QUEUED, BackendKind.API, "test", created_at=0.0)


def _reservations(usd: int) -> list[Reservation]:
    return [
        Reservation(Resource.IMAGES, 1, BackendKind.API, DAY, MONTH),
        Reservation(Resource.USD_MICROS, usd, BackendKind.API, DAY, MONTH),
    ]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "store.db", clock=lambda: 1_790_000_000.0)
    try:
        yield opened
    finally:
        await opened.close()


def _totals(path: Path, kind: str, key: str, resource: Resource, period: str) -> Totals:
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT posted, pending, granted FROM usage WHERE scope_kind = ? AND scope_key = ? AND resource = ?"
            " AND period = ?",
            (kind, key, resource.value, period),
        ).fetchone()
    return Totals(*row) if row else Totals()


async def test_reserve_settle_void_and_grant_move_the_totals_of_every_scope(store: Store) -> None:
    await store.submit_job(_job("a1", ALICE), _reservations(40_000), [], None)
    await store.submit_job(_job("b1", BOB), _reservations(25_000), [], None)
    for kind, key in (("user", ALICE.user_key), ("guild", "discord:g1"), ("global", "")):
        assert _totals(store.path, kind, key, Resource.USD_MICROS, MONTH).pending > 0
    assert _totals(store.path, "guild", "discord:g1", Resource.USD_MICROS, MONTH) == Totals(pending=65_000)
    assert _totals(store.path, "user", ALICE.user_key, Resource.IMAGES, DAY) == Totals(pending=1)

    # Alice's job settles below its estimate; Bob's is voided.
    alice = await store.open_reservations("a1")
    closes = [Close(r.id, 30_000 if r.resource is Resource.USD_MICROS else 1, "done") for r in alice]
    assert await store.finish_job("a1", JobState.DONE, closes, now=2.0)
    bob = await store.open_reservations("b1")
    assert await store.finish_job("b1", JobState.FAILED, [Close(r.id, None, "failed") for r in bob], now=3.0)
    assert _totals(store.path, "global", "", Resource.USD_MICROS, MONTH) == Totals(posted=30_000)
    assert _totals(store.path, "user", BOB.user_key, Resource.USD_MICROS, MONTH) == Totals()
    assert (await store.get_job("a1")).cost_micros == 30_000  # the cost is what its settle lines add up to
    assert await store.posted("a1", Resource.USD_MICROS) == 30_000

    # A grant lifts only its user's own limit, never the server's or everyone's.
    await store.grant(ALICE.user_key, Resource.USD_MICROS, 50_000, DAY, MONTH, "gift", AuditEntry("admin", "grant"))
    assert _totals(store.path, "user", ALICE.user_key, Resource.USD_MICROS, MONTH) == Totals(30_000, 0, 50_000)
    assert _totals(store.path, "guild", "discord:g1", Resource.USD_MICROS, MONTH) == Totals(posted=30_000)
    assert await store.usage(Scope.user(ALICE.user_key), Resource.USD_MICROS, MONTH) == -20_000
    assert await store.usage(Scope.everyone(), Resource.USD_MICROS, MONTH) == 30_000
    assert await store.posted_spend(MONTH) == 30_000
    assert await store.verify_totals() == []


async def test_a_reservation_closed_twice_changes_neither_the_ledger_nor_the_totals(store: Store) -> None:
    await store.submit_job(_job("a1", ALICE), _reservations(40_000), [], None)
    [_, usd] = await store.open_reservations("a1")
    assert await store.finish_job("a1", JobState.DONE, [Close(usd.id, 40_000, "done")], now=2.0)
    before = _totals(store.path, "global", "", Resource.USD_MICROS, MONTH)
    with pytest.raises(sqlite3.IntegrityError):
        await store.reroute(
            "a1", BackendKind.API, "again", [Close(usd.id, 1, "twice")], [], [], estimated_cost_micros=0,
            estimated_gpu_ms=0, now=3.0,
        )  # fmt: skip
    assert _totals(store.path, "global", "", Resource.USD_MICROS, MONTH) == before
    assert await store.verify_totals() == []


async def test_verify_totals_names_a_total_that_drifted_from_the_ledger(store: Store) -> None:
    await store.submit_job(_job("a1", ALICE), _reservations(40_000), [], None)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE usage SET pending = pending + 7 WHERE scope_kind = 'guild' AND resource = 'usd_micros'")
    [difference] = await store.verify_totals()
    assert (difference.scope, difference.resource, difference.period) == (
        Scope.guild("discord:g1"),
        Resource.USD_MICROS,
        MONTH,
    )
    assert difference.stored == Totals(pending=40_007) and difference.from_ledger == Totals(pending=40_000)
    assert "guild discord:g1, usd_micros, 2026-11" in str(difference)


async def test_the_migration_backfills_the_totals_of_an_existing_ledger(tmp_path: Path) -> None:
    """A database made before the running totals (schema 4) opens with totals equal to its ledger's lines."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA foreign_keys=ON")
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:4], start=1):
        assert isinstance(script, str)
        for statement in statements(script):
            old.execute(statement)
        old.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    for who in ("discord:alice", "discord:bob"):
        old.execute("INSERT INTO users (user_key, created_at, updated_at) VALUES (?, 0, 0)", (who,))
    columns = "id, user_key, platform, user_id, prompt, model, width, height, aspect_ratio, steps, seed, mode, state,"
    columns += " backend, reason, created_at"
    lines = [  # (job, user, entry, ref, resource, amount)
        ("j1", "discord:alice", "reserve", None, "usd_micros", 40_000),
        ("j1", "discord:alice", "settle", 1, "usd_micros", 30_000),
        ("j2", "discord:bob", "reserve", None, "usd_micros", 25_000),  # still pending
        ("j3", "discord:bob", "reserve", None, "images", 1),
        ("j3", "discord:bob", "void", 4, "images", 0),
        (None, "discord:alice", "grant", None, "usd_micros", 5_000),
    ]
    for job_id in ("j1", "j2", "j3"):
        owner = next(line[1] for line in lines if line[0] == job_id)
        old.execute(
            f"INSERT INTO jobs ({columns}) VALUES (?, ?, 'discord', 'x', 'p', 'pro', 1024, 1024, '1:1', 28, 1,"
            " 'auto', 'done', 'api', 'test', 0)",
            (job_id, owner),
        )
    for job_id, who, entry, ref, resource, amount in lines:
        old.execute(
            "INSERT INTO ledger (entry, ref, job_id, user_key, guild_key, resource, amount, day, month, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (entry, ref, job_id, who, None if entry == "grant" else "discord:g1", resource, amount, DAY, MONTH),
        )
    old.close()

    store = await Store.open(path)
    try:
        assert await store.verify_totals() == []
        assert await store.usage(Scope.guild("discord:g1"), Resource.USD_MICROS, MONTH) == 55_000
        assert await store.usage(Scope.user("discord:alice"), Resource.USD_MICROS, MONTH) == 25_000
        assert await store.usage(Scope.user("discord:bob"), Resource.IMAGES, DAY) == 0
        assert await store.usage(Scope.everyone(), Resource.USD_MICROS, MONTH) == 55_000
    finally:
        await store.close()
