"""Online backups while jobs are written, restore round trips, pruning to N copies, damaged backups refused."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.backup import (
    backup,
    backup_dir,
    backup_every,
    backup_sync,
    integrity_problem,
    list_backups,
    prune,
    restore,
)
from engine.errors import InvalidRequest
from engine.models import BackendKind, ImageRequest
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend


def job_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}


async def submit_until(engine: Engine, stop: asyncio.Event, done: list[str]) -> None:
    index = 0
    while not stop.is_set():
        queued = await engine.submit(user(f"u{index}"), ImageRequest(f"a kite number {index}", "schnell"))
        done.append(queued.job_id)
        index += 1


async def test_backup_while_jobs_are_written_then_restore_round_trip(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(seconds_per_job=0.01)})
    directory = backup_dir(engine.settings.bot.state_dir)
    submitted: list[str] = []
    stop = asyncio.Event()
    writer = asyncio.create_task(submit_until(engine, stop, submitted))
    copies: list[tuple[Path, int]] = []
    for _ in range(3):  # each backup starts while the writer keeps submitting jobs
        while len(submitted) < 3 * (len(copies) + 1):
            await asyncio.sleep(0.005)
        before = len(submitted)  # committed before the backup starts, so surely in it
        copies.append((await backup(engine._store.path, directory, keep=100), before))
    stop.set()
    await writer
    for job_id in submitted:
        await wait_terminal(engine, job_id)
    final = await backup(engine._store.path, directory, keep=100)

    for path, before in copies:
        ids = job_ids(path)
        assert set(submitted[:before]) <= ids <= set(submitted)  # a consistent snapshot taken mid-stream
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert job_ids(final) == set(submitted)

    # Restore the final copy into a fresh database and into one holding other data: both equal the source.
    for target in (tmp_path / "fresh" / "restored.db", tmp_path / "other.db"):
        if target.name == "other.db":
            other = await Store.open(target)
            await other.close()
        restore(final, target)
        assert integrity_problem(target) is None
        store = await Store.open(target)
        try:
            assert {job.id for job in await store.jobs()} == set(submitted)
        finally:
            await store.close()


async def test_restore_over_the_stopped_bots_database(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(seconds_per_job=0.01)})
    first = await engine.submit(user(), ImageRequest("before the backup", "schnell"))
    await wait_terminal(engine, first.job_id)
    saved = await backup(engine._store.path, backup_dir(engine.settings.bot.state_dir), keep=7)
    later = await engine.submit(user(), ImageRequest("after the backup", "schnell"))
    await wait_terminal(engine, later.job_id)
    await engine.close()  # the bot is stopped before a restore

    restore(saved, engine._store.path)
    assert job_ids(engine._store.path) == {first.job_id}
    assert integrity_problem(engine._store.path) is None


def _seed(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
    return path


def test_keeps_the_newest_n(tmp_path: Path) -> None:
    source = _seed(tmp_path / "db.sqlite")
    directory = tmp_path / "backups"
    start = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    made = [backup_sync(source, directory, keep=3, now=start + timedelta(days=day)) for day in range(5)]
    assert [b.path for b in list_backups(directory)] == made[-3:]
    assert [b.path.name for b in list_backups(directory)] == [
        "flux-bot-20260103-030000.db",
        "flux-bot-20260104-030000.db",
        "flux-bot-20260105-030000.db",
    ]
    # Two backups in the same second both survive, in order; unrelated files are never pruned.
    (directory / "notes.txt").write_text("keep me")
    same = [backup_sync(source, directory, keep=3, now=start + timedelta(days=9)) for _ in range(2)]
    assert [b.path for b in list_backups(directory)] == [made[-1], *same]
    assert same[1].name == "flux-bot-20260110-030000-1.db"
    assert (directory / "notes.txt").exists()
    assert not list(directory.glob("*.partial"))
    assert prune(directory, 1) == [made[-1], same[0]]
    with pytest.raises(InvalidRequest):
        prune(directory, 0)


def test_damaged_or_missing_backups_are_refused(tmp_path: Path) -> None:
    database = _seed(tmp_path / "live.db")
    original = database.read_bytes()

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database at all" * 200)
    truncated = tmp_path / "truncated.db"
    good = backup_sync(database, tmp_path / "backups", keep=7)
    truncated.write_bytes(good.read_bytes()[:1000])
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")

    for bad in (tmp_path / "missing.db", garbage, truncated, foreign):
        with pytest.raises(InvalidRequest) as caught:
            restore(bad, database)
        assert str(bad) in caught.value.problem
        assert database.read_bytes() == original  # nothing was written

    with pytest.raises(InvalidRequest):
        restore(database, database)
    with pytest.raises(InvalidRequest):
        backup_sync(tmp_path / "no-such.db", tmp_path / "backups", keep=7)
    assert not (tmp_path / "no-such.db").exists()


class _FakeTime:
    """A clock and a sleep that moves it: the schedule is checked without waiting for it."""

    def __init__(self, start: datetime, stop_after_sleeps: int) -> None:
        self.at = start
        self.slept: list[float] = []
        self._stop_after = stop_after_sleeps

    def now(self) -> datetime:
        return self.at

    async def sleep(self, seconds: float) -> None:
        if len(self.slept) == self._stop_after:
            raise asyncio.CancelledError
        self.slept.append(seconds)
        self.at += timedelta(seconds=seconds)


async def test_scheduled_backups_keep_their_rhythm_across_restarts(tmp_path: Path) -> None:
    source = _seed(tmp_path / "db.sqlite")
    directory = tmp_path / "backups"
    day = 24 * 3600.0
    time = _FakeTime(datetime(2026, 1, 1, 3, 0, tzinfo=UTC), stop_after_sleeps=3)
    with pytest.raises(asyncio.CancelledError):
        await backup_every(source, directory, every_s=day, keep=2, sleep=time.sleep, now=time.now)
    # None yet: one at once; then one a day, pruned to the newest two.
    assert time.slept == [0.0, day, day]
    assert [b.path.name for b in list_backups(directory)] == [
        "flux-bot-20260102-030000.db",
        "flux-bot-20260103-030000.db",
    ]

    # Started again ten hours after the last one: the next is due in fourteen hours, not at once.
    restarted = _FakeTime(datetime(2026, 1, 3, 13, 0, tzinfo=UTC), stop_after_sleeps=1)
    with pytest.raises(asyncio.CancelledError):
        await backup_every(source, directory, every_s=day, keep=2, sleep=restarted.sleep, now=restarted.now)
    assert restarted.slept == [14 * 3600.0]


async def test_a_failed_scheduled_backup_is_logged_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    time = _FakeTime(datetime(2026, 1, 1, 3, 0, tzinfo=UTC), stop_after_sleeps=3)
    with pytest.raises(asyncio.CancelledError):
        await backup_every(
            tmp_path / "gone.db", tmp_path / "backups", every_s=60.0, keep=2, sleep=time.sleep, now=time.now
        )
    assert time.slept == [0.0, 60.0, 0.0]
    assert "scheduled backup of" in caplog.text and "no database at" in caplog.text
    assert list_backups(tmp_path / "backups") == []
