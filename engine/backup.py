"""Online SQLite backups with the sqlite3 backup API, and restore.

`backup` copies the live database (WAL mode: the bot keeps writing meanwhile) into
`<state_dir>/backups/flux-bot-YYYYmmdd-HHMMSS.db` on a worker thread, checks the copy, and keeps the newest N.
A copy is written under a `.partial` name and renamed only when complete, so a crash never leaves a half backup
that would count as one of the N.

`restore` overwrites the database with a backup. **The bot must be stopped first** (`systemctl stop flux-bot`):
whether another process has the file open cannot be detected reliably, and a running bot would keep serving from
its own connection and write over the restored state. The backup is checked before anything is written, and the
restored database is checked again afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

BACKUP_DIR = "backups"
_NAME = re.compile(r"^flux-bot-(\d{8}-\d{6})(?:-(\d+))?\.db$")


def backup_dir(state_dir: Path) -> Path:
    return state_dir / BACKUP_DIR


@dataclass(frozen=True)
class BackupFile:
    path: Path
    taken_at: datetime


def list_backups(directory: Path) -> list[BackupFile]:
    """The finished backups in `directory`, oldest first (other files are ignored)."""
    found: list[tuple[str, int, Path]] = []
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_file():
                found.append((match[1], int(match[2] or 0), entry))
    found.sort()
    return [BackupFile(path, datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=UTC)) for stamp, _, path in found]


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups; the deleted paths."""
    if keep < 1:
        raise InvalidRequest("keep must be at least 1 backup", field="keep")
    doomed = [backup.path for backup in list_backups(directory)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _connect(path: Path, mode: str) -> sqlite3.Connection:
    # mode=ro / rw never creates the file, so a mistyped path fails instead of yielding an empty database.
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=30)


def _integrity_problem(db: sqlite3.Connection) -> str | None:
    rows = db.execute("PRAGMA integrity_check").fetchall()
    if [tuple(row) for row in rows] != [("ok",)]:
        return "; ".join(str(row[0]) for row in rows[:5]) or "no answer"
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is None:
        return "not a flux-bot database (no schema_version table)"
    return None


def integrity_problem(database_path: Path) -> str | None:
    """What `PRAGMA integrity_check` finds wrong with the database file, read-only; None when it is sound."""
    with contextlib.closing(_connect(database_path, "ro")) as db:
        return _integrity_problem(db)


def backup_sync(database_path: Path, directory: Path, *, keep: int, now: datetime | None = None) -> Path:
    """Copy `database_path` into `directory` now and prune to `keep` copies; the new backup's path."""
    if keep < 1:
        raise InvalidRequest("keep must be at least 1 backup", field="keep")
    if not database_path.is_file():
        raise InvalidRequest(f"no database at {database_path}", field="database")
    directory.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    target = directory / f"flux-bot-{stamp}.db"
    counter = 0
    while target.exists():
        counter += 1
        target = directory / f"flux-bot-{stamp}-{counter}.db"
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with (
            contextlib.closing(_connect(database_path, "ro")) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            src.backup(dst)  # pages=-1: one step under one read transaction, a consistent snapshot
            problem = _integrity_problem(dst)
        if problem is not None:
            raise InvalidRequest(f"the backup of {database_path} failed its check: {problem}", field="database")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    prune(directory, keep)
    return target


async def backup(database_path: Path, directory: Path, *, keep: int, now: datetime | None = None) -> Path:
    """`backup_sync` on a worker thread, so the event loop keeps serving while the copy runs."""
    return await asyncio.to_thread(backup_sync, database_path, directory, keep=keep, now=now)


def seconds_until_due(directory: Path, every_s: float, now: datetime) -> float:
    """How long until the next scheduled backup: counted from the newest backup, so a restart keeps the rhythm."""
    backups = list_backups(directory)
    if not backups:
        return 0.0
    age = (now - backups[-1].taken_at).total_seconds()
    return max(0.0, every_s - age)


async def backup_every(
    database_path: Path,
    directory: Path,
    *,
    every_s: float,
    keep: int,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Until cancelled: a backup every `every_s` seconds. A failed backup is logged and tried again next time."""
    while True:
        await sleep(seconds_until_due(directory, every_s, now()))
        try:
            path = await backup(database_path, directory, keep=keep, now=now())
        except (OSError, sqlite3.Error, InvalidRequest) as exc:
            log.error("scheduled backup of %s failed: %s; next try in %.0f s", database_path, exc, every_s)
            await sleep(every_s)
        else:
            log.info("scheduled backup written: %s", path)


def restore(backup_path: Path, database_path: Path) -> None:
    """Replace the database at `database_path` with `backup_path`. Stop the bot first (see the module docstring).

    Raises InvalidRequest, and writes nothing, when the backup is missing, is not an SQLite database, fails
    `PRAGMA integrity_check`, or is not a flux-bot database.
    """
    if not backup_path.is_file():
        raise InvalidRequest(f"no backup file at {backup_path}", field="backup")
    if backup_path.resolve() == database_path.resolve():
        raise InvalidRequest("the backup and the database are the same file", field="backup")
    try:
        problem = integrity_problem(backup_path)
    except sqlite3.DatabaseError as exc:
        raise InvalidRequest(f"backup {backup_path} is not a usable SQLite database: {exc}", field="backup") from exc
    if problem is not None:
        raise InvalidRequest(f"backup {backup_path} is damaged: {problem}", field="backup")
    database_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(_connect(backup_path, "ro")) as src,
        contextlib.closing(sqlite3.connect(database_path, timeout=30)) as dst,
    ):
        src.backup(dst)
        after = _integrity_problem(dst)
    if after is not None:
        raise InvalidRequest(f"the restored database {database_path} failed its check: {after}", field="database")
