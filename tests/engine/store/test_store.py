"""Store: one hand-over to SQLite's thread per method, grouped usage sums, whole transactions, the queue read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from engine.errors import QuotaExceeded
from engine.ledger import Close, LimitCheck, Reservation, Scope
from engine.models import (
    AuditEntry,
    BackendKind,
    ImageRequest,
    Job,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    Resource,
)
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend

DAY, OTHER_DAY, MONTH, OTHER_MONTH = "2026-11-26", "2026-11-25", "2026-11", "2026-10"


def _job(job_id: str, who: Requester, backend: BackendKind = BackendKind.API, created_at: float = 0.0) -> Job:
    request = ResolvedRequest("p", "pro", 1024, 1024, "1:1", 28, None, 1, Mode.AUTO)
    return Job(job_id, who, request, JobState.QUEUED, backend, "test", created_at=created_at)


def _usd(amount: int, *, day: str = DAY, month: str = MONTH) -> Reservation:
    return Reservation(Resource.USD_MICROS, amount, BackendKind.API, day, month)


def _images(amount: int, *, day: str = DAY) -> Reservation:
    return Reservation(Resource.IMAGES, amount, BackendKind.LOCAL, day, day[:7])


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "store.db")
    try:
        yield opened
    finally:
        await opened.close()


async def _settle_all(store: Store, job_id: str, amount: int | None) -> None:
    closes = [Close(r.id, amount, "t") for r in await store.open_reservations(job_id)]
    assert await store.finish_job(job_id, JobState.DONE, closes, now=1.0)


async def test_usage_counts_posted_and_pending_and_grants_lift_only_their_user(store: Store) -> None:
    """Every kind of ledger line, in and out of the period and scope, against sums worked out by hand."""
    alice = Requester(Platform.DISCORD, "alice", guild_id="g1")
    bob = Requester(Platform.DISCORD, "bob", guild_id="g1")
    carol = Requester(Platform.DISCORD, "carol", guild_id="g2")
    await store.submit_job(_job("settled", alice), [_usd(300), _images(1)], [], None)
    await _settle_all(store, "settled", 120)  # posted at 120 (and 120 images: one amount for both closes)
    await store.submit_job(_job("voided", alice), [_usd(500), _images(1)], [], None)
    await _settle_all(store, "voided", None)  # counts 0
    await store.submit_job(_job("pending", alice), [_usd(70), _images(1)], [], None)  # counts as reserved
    await store.submit_job(_job("yesterday", alice), [_usd(11, day=OTHER_DAY), _images(1, day=OTHER_DAY)], [], None)
    await store.submit_job(_job("last-month", alice), [_usd(1_000, day="2026-10-31", month=OTHER_MONTH)], [], None)
    await store.submit_job(_job("bob", bob), [_usd(40)], [], None)
    await store.submit_job(_job("carol", carol), [_usd(5)], [], None)
    grant = AuditEntry("admin", "quota.grant", alice.user_key)
    await store.grant(alice.user_key, Resource.USD_MICROS, 25, DAY, MONTH, "t", grant)
    await store.grant(alice.user_key, Resource.IMAGES, 2, DAY, MONTH, "t", grant)
    await store.grant(alice.user_key, Resource.IMAGES, 9, OTHER_DAY, MONTH, "t", grant)

    a, g1 = Scope("user", alice.user_key), Scope("guild", alice.guild_key)
    keys = [
        (a, Resource.USD_MICROS, MONTH),
        (a, Resource.IMAGES, DAY),
        (a, Resource.GPU_MS, DAY),
        (Scope("global", None), Resource.USD_MICROS, MONTH),
        (g1, Resource.USD_MICROS, MONTH),
        (a, Resource.USD_MICROS, OTHER_MONTH),
        (a, Resource.IMAGES, DAY),  # asked twice: answered twice, in place
    ]
    expected = [
        120 + 0 + 70 + 11 - 25,  # alice's month: posted + pending + yesterday's, less her grant
        120 + 0 + 1 - 2,  # alice's day: today's image lines only, less today's grant
        0,
        120 + 0 + 70 + 11 + 40 + 5,  # everyone's month: grants lift no shared budget
        120 + 0 + 70 + 11 + 40,  # guild g1: alice and bob
        1_000,
        120 + 0 + 1 - 2,
    ]
    assert await store.usages(keys) == expected
    assert [await store.usage(*key) for key in keys] == expected  # the one-key form agrees
    record, used = await store.user_and_usages(alice.user_key, keys)
    assert record is not None and record.user_key == alice.user_key and used == expected
    nobody = (Scope("user", "discord:nobody"), Resource.USD_MICROS, MONTH)
    assert await store.user_and_usages("discord:nobody", [nobody]) == (None, [0])


async def test_a_refused_reservation_writes_nothing_and_the_next_one_works(store: Store) -> None:
    """The limit check raises inside the transaction after the user upsert: all of it is rolled back."""
    alice = Requester(Platform.DISCORD, "alice", guild_id="g1", display_name="Alice")
    check = LimitCheck(
        "your API budget this month", Scope("user", alice.user_key), Resource.USD_MICROS, MONTH, 100, 7.0
    )
    with pytest.raises(QuotaExceeded) as caught:
        await store.submit_job(_job("big", alice), [_usd(101)], [check], None)
    assert (caught.value.limit, caught.value.remaining) == ("your API budget this month", 100)
    assert caught.value.resets_at is not None and caught.value.resets_at.timestamp() == 7.0
    assert await store.get_user(alice.user_key) is None
    assert await store.jobs(states=list(JobState)) == []
    assert await store.job_ledger("big") == []

    await store.submit_job(_job("fits", alice), [_usd(100)], [check], None)
    assert [job.id for job in await store.jobs()] == ["fits"]
    assert check.refusal(100, 1) is not None and check.refusal(99, 1) is None


async def test_the_dispatchers_queue_is_one_backends_queued_jobs_oldest_first(store: Store) -> None:
    alice, bob = Requester(Platform.DISCORD, "alice"), Requester(Platform.DISCORD, "bob")
    for job_id, who, backend, created_at in [
        ("b-late", bob, BackendKind.LOCAL, 3.0),
        ("a-early", alice, BackendKind.LOCAL, 1.0),
        ("a-running", alice, BackendKind.LOCAL, 0.5),
        ("b-api", bob, BackendKind.API, 0.1),
        ("a-tie-2", alice, BackendKind.LOCAL, 2.0),
        ("a-tie-1", alice, BackendKind.LOCAL, 2.0),
    ]:
        await store.submit_job(_job(job_id, who, backend, created_at), [], [], None)
    await store.mark_running("a-running", 4.0)
    local = await store.queued(BackendKind.LOCAL)
    assert [(q.id, q.user_key) for q in local] == [
        ("a-early", alice.user_key),
        ("a-tie-2", alice.user_key),  # submitted first, in the same tick of the clock
        ("a-tie-1", alice.user_key),
        ("b-late", bob.user_key),
    ]
    # The same order as the full read it replaces.
    full = await store.jobs(states=[JobState.QUEUED], backend=BackendKind.LOCAL)
    assert [q.id for q in local] == [job.id for job in full]
    assert [q.id for q in await store.queued(BackendKind.LOCAL, limit=2)] == ["a-early", "a-tie-2"]
    assert [q.id for q in await store.queued(BackendKind.API)] == ["b-api"]


class HandOvers:
    """Counts calls into aiosqlite's thread (the real `Connection._execute` still runs each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = aiosqlite.Connection._execute

        async def counted(connection: aiosqlite.Connection, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await real(connection, fn, *args, **kwargs)

        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)

    async def of(self, call: Awaitable[Any]) -> int:
        before = self.count
        await call
        return self.count - before


async def test_every_store_method_is_one_hand_over(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many statements a transaction or read runs, it crosses to SQLite's thread once."""
    hand_overs = HandOvers(monkeypatch)
    alice = Requester(Platform.DISCORD, "alice", guild_id="g1")
    user_scope = Scope("user", alice.user_key)
    checks = [
        LimitCheck("images", user_scope, Resource.IMAGES, DAY, 10, None),
        LimitCheck("usd", user_scope, Resource.USD_MICROS, MONTH, 10_000, None),
        LimitCheck("global", Scope("global", None), Resource.USD_MICROS, MONTH, 10_000, None),
        LimitCheck("guild", Scope("guild", alice.guild_key), Resource.USD_MICROS, MONTH, 10_000, None),
    ]
    audit = AuditEntry("t", "policy.allow", alice.user_key, "j1")
    assert await hand_overs.of(store.submit_job(_job("j1", alice), [_usd(100), _images(1)], checks, 3, audit)) == 1
    assert await hand_overs.of(store.user_and_usages(alice.user_key, [(c.scope, c.resource, DAY) for c in checks])) == 1
    assert await hand_overs.of(store.queued(BackendKind.API)) == 1
    assert await hand_overs.of(store.mark_running("j1", 1.0)) == 1
    open_ = await store.open_reservations("j1")
    closes = [Close(r.id, None, "failed") for r in open_ if r.resource is Resource.USD_MICROS]
    reroute = store.reroute(
        "j1",
        BackendKind.LOCAL,
        "local after the API failed",
        closes,
        [Reservation(Resource.GPU_MS, 5_000, BackendKind.LOCAL, DAY, MONTH)],
        checks,
        estimated_cost_micros=0,
        estimated_gpu_ms=5_000,
        now=2.0,
    )
    assert await hand_overs.of(reroute) == 1
    assert await hand_overs.of(store.mark_running("j1", 3.0)) == 1
    closes = [Close(r.id, r.amount, "done") for r in await store.open_reservations("j1")]
    assert await hand_overs.of(store.finish_job("j1", JobState.DONE, closes, now=4.0, audit=audit)) == 1
    assert await hand_overs.of(store.get_job("j1")) == 1
    assert (await store.get_job("j1")).state is JobState.DONE
    assert [(line["entry"], line["resource"]) for line in await store.job_ledger("j1")] == [
        ("reserve", "usd_micros"),
        ("reserve", "images"),
        ("void", "usd_micros"),
        ("reserve", "gpu_ms"),
        ("settle", "images"),
        ("settle", "gpu_ms"),
    ]


async def test_a_submit_reads_the_user_and_the_ledger_once(
    make_engine: EngineFactory, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limits and use are read once per submit (for the ban, the pre-check and the router), then reserved."""
    settings = make_settings(limits={"guild_api_usd_per_month": "5", "global_api_usd_per_month": "50"})
    engine = await make_engine(
        {BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: ScriptedBackend(kind=BackendKind.API)}, settings
    )
    calls: dict[str, int] = {}
    for name in ("get_user", "usages", "user_and_usages"):
        real = getattr(Store, name)

        def spy(real: Any = real, name: str = name) -> Callable[..., Any]:
            async def counted(*args: Any, **kwargs: Any) -> Any:
                calls[name] = calls.get(name, 0) + 1
                return await real(*args, **kwargs)

            return counted

        monkeypatch.setattr(Store, name, spy())
    for mode in (Mode.AUTO, Mode.FAST):
        calls.clear()
        queued = await engine.submit(user(), ImageRequest("a lighthouse", "dev", mode=mode))
        assert calls == {"user_and_usages": 1}, mode
        await wait_terminal(engine, queued.job_id)


async def test_the_pre_check_refuses_as_the_reserve_would(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    """Standing.ensure_room and the reserving transaction give the same refusal for the same use."""
    settings = make_settings(tiers={"default": {"images_per_day": 2}})
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    alice = user()
    for n in range(2):
        await wait_terminal(engine, (await engine.submit(alice, ImageRequest(f"fox {n}", "schnell"))).job_id)
    with pytest.raises(QuotaExceeded) as by_submit:
        await engine.submit(alice, ImageRequest("fox 3", "schnell"))
    standing = await engine._quota.standing(alice)
    periods = standing.periods
    with pytest.raises(QuotaExceeded) as by_reserve:
        await engine._store.submit_job(
            _job("direct", alice, BackendKind.LOCAL), [_images(1, day=periods.day)], standing.checks, None
        )
    for caught in (by_submit.value, by_reserve.value):
        assert (caught.limit, caught.remaining, caught.resets_at) == (
            "your images per day",
            0,
            periods.day_resets_at,
        )
    assert str(by_submit.value) == str(by_reserve.value)
    assert standing.room().images == 0
    await engine.admin_quota_grant(user("root", admin=True), alice.user_key, Resource.IMAGES, 1)
    assert (await engine._quota.standing(alice)).room().images == 1


async def test_the_resume_token_migration_keeps_every_job_and_ledger_line(tmp_path: Path) -> None:
    """A database of schema 3 (BFL's task columns, a backend CHECK of two kinds) opens with one resume token per
    stored task, a backend column that admits other kinds, and every ledger line still bound to its job."""
    import json
    import sqlite3

    from engine.backends.bfl import RemoteTask
    from engine.store.schema import MIGRATIONS, statements

    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA foreign_keys=ON")
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:3], start=1):
        for statement in statements(script):
            old.execute(statement)
        old.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    old.execute("INSERT INTO users (user_key, created_at, updated_at) VALUES ('discord:alice', 0, 0)")
    columns = (
        "id, user_key, platform, user_id, prompt, model, width, height, aspect_ratio, steps, seed, mode, state,"
        " backend, reason, task_id, polling_url, task_cost_micros, created_at"
    )
    for job_id, backend, state, task in (
        ("japi", "api", "running", ("t-1", "https://api.eu.bfl.ai/v1/get_result?id=t-1", 25_000)),
        ("jlocal", "local", "running", (None, None, None)),
        ("jdone", "api", "done", ("t-2", "https://api.us.bfl.ai/v1/get_result?id=t-2", None)),
    ):
        old.execute(
            f"INSERT INTO jobs ({columns}) VALUES (?, 'discord:alice', 'discord', 'alice', 'p', 'pro', 1024, 1024,"
            " '1:1', 28, 1, 'auto', ?, ?, 'test', ?, ?, ?, 0)",
            (job_id, state, backend, *task),
        )
        old.execute(
            "INSERT INTO ledger (entry, job_id, user_key, resource, amount, day, month, created_at)"
            " VALUES ('reserve', ?, 'discord:alice', 'images', 1, '2026-11-26', '2026-11', 0)",
            (job_id,),
        )
    old.close()

    store = await Store.open(path)
    try:
        api_job, local_job, done_job = [await store.get_job(job_id) for job_id in ("japi", "jlocal", "jdone")]
        assert api_job.resume is not None and local_job.resume is None and done_job.resume is not None
        task = RemoteTask.from_token(api_job.resume)
        assert task == RemoteTask("t-1", "https://api.eu.bfl.ai/v1/get_result?id=t-1", 25_000)
        assert (api_job.resume.billed_micros, api_job.resume.billing) == (25_000, "BFL bills its task t-1")
        assert RemoteTask.from_token(done_job.resume).cost_micros == 0  # no cost stored: nothing known billed
        assert [len(await store.job_ledger(job_id)) for job_id in ("japi", "jlocal", "jdone")] == [1, 1, 1]
    finally:
        await store.close()

    check = sqlite3.connect(path, isolation_level=None)
    try:
        check.execute("PRAGMA foreign_keys=ON")
        job_columns = {row[1] for row in check.execute("PRAGMA table_info(jobs)")}
        assert "resume_token" in job_columns and not {"task_id", "polling_url", "task_cost_micros"} & job_columns
        indexes = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'jobs'")}
        assert {"jobs_by_state", "jobs_by_user", "jobs_undelivered", "jobs_by_end", "jobs_with_result"} <= indexes
        stored = json.loads(check.execute("SELECT resume_token FROM jobs WHERE id = 'japi'").fetchone()[0])
        assert stored["state"]["task_id"] == "t-1"  # readable with json_extract, for an operator
        check.execute("UPDATE jobs SET backend = 'nats' WHERE id = 'jdone'")  # a kind the old CHECK refused
        with pytest.raises(sqlite3.IntegrityError):
            check.execute("UPDATE jobs SET backend = '' WHERE id = 'jdone'")
        with pytest.raises(sqlite3.IntegrityError):  # the ledger's lines are still bound to their jobs
            check.execute(
                "INSERT INTO ledger (entry, job_id, user_key, resource, amount, day, month, created_at)"
                " VALUES ('reserve', 'jnone', 'discord:alice', 'images', 1, '2026-11-26', '2026-11', 0)"
            )
    finally:
        check.close()
