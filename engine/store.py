"""The only module that speaks SQL: migrations, users, jobs, the append-only ledger, the audit log, controls.

One aiosqlite connection serves the process. Every method runs its whole body as one function on that
connection's thread (one hand-over, not one per statement); an asyncio lock makes the transactions take turns
inside the process and `BEGIN IMMEDIATE` makes each exclusive against other processes (the admin CLI) on the same
file, so a reserve that reads usage and writes a reservation can never interleave with another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from engine.errors import JobNotFound, QuotaExceeded
from engine.models import (
    BackendKind,
    FailureReason,
    Job,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    Resource,
    ResumeToken,
)

log = logging.getLogger("flux_bot.store")

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE users (
        user_key     TEXT PRIMARY KEY,
        display_name TEXT,
        roles        TEXT NOT NULL DEFAULT '[]',  -- the chat roles seen last, so admin views find the user's tier
        banned       INTEGER NOT NULL DEFAULT 0,
        overrides    TEXT NOT NULL DEFAULT '{}',  -- JSON: limits an admin set for this user
        settings     TEXT NOT NULL DEFAULT '{}',  -- JSON: the user's own defaults (model, aspect, mode)
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    );
    CREATE TABLE jobs (
        id                    TEXT PRIMARY KEY,
        user_key              TEXT NOT NULL REFERENCES users(user_key),
        guild_key             TEXT,
        platform              TEXT NOT NULL,
        user_id               TEXT NOT NULL,
        guild_id              TEXT,
        channel_id            TEXT,
        display_name          TEXT,
        roles                 TEXT NOT NULL DEFAULT '[]',
        is_admin              INTEGER NOT NULL DEFAULT 0,
        prompt                TEXT NOT NULL,
        model                 TEXT NOT NULL,
        width                 INTEGER NOT NULL,
        height                INTEGER NOT NULL,
        aspect_ratio          TEXT NOT NULL,
        steps                 INTEGER NOT NULL,
        guidance              REAL,
        seed                  INTEGER NOT NULL,
        mode                  TEXT NOT NULL,
        input_image_url       TEXT,
        state                 TEXT NOT NULL CHECK (state IN ('queued','running','done','failed','cancelled')),
        backend               TEXT NOT NULL CHECK (backend IN ('local','api')),
        reason                TEXT NOT NULL,
        attempts              INTEGER NOT NULL DEFAULT 0,
        local_attempts        INTEGER NOT NULL DEFAULT 0,
        estimated_cost_micros INTEGER NOT NULL DEFAULT 0,
        estimated_gpu_ms      INTEGER NOT NULL DEFAULT 0,
        task_id               TEXT,
        polling_url           TEXT,
        task_cost_micros      INTEGER,
        created_at            REAL NOT NULL,
        started_at            REAL,
        finished_at           REAL,
        failure_reason        TEXT,
        error                 TEXT,
        cost_micros           INTEGER NOT NULL DEFAULT 0,
        result_path           TEXT,
        delivered             INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_state ON jobs (state, backend, created_at);
    CREATE INDEX jobs_by_user ON jobs (user_key, state);
    CREATE INDEX jobs_undelivered ON jobs (delivered, state);

    -- Append-only. A 'reserve' line is pending until one 'settle' (posted at the actual amount) or 'void' line
    -- names it in `ref`; 'grant' lines are an admin's extra allowance for one user in one period.
    CREATE TABLE ledger (
        id         INTEGER PRIMARY KEY,
        entry      TEXT NOT NULL CHECK (entry IN ('reserve','settle','void','grant')),
        ref        INTEGER REFERENCES ledger(id),
        job_id     TEXT REFERENCES jobs(id),
        user_key   TEXT NOT NULL,
        guild_key  TEXT,
        backend    TEXT,
        resource   TEXT NOT NULL CHECK (resource IN ('images','gpu_ms','usd_micros')),
        amount     INTEGER NOT NULL,
        day        TEXT NOT NULL,
        month      TEXT NOT NULL,
        reason     TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        CHECK ((entry IN ('settle','void')) = (ref IS NOT NULL))
    );
    -- A reservation is closed at most once: a job can never be settled twice.
    CREATE UNIQUE INDEX ledger_one_close ON ledger (ref) WHERE ref IS NOT NULL;
    CREATE INDEX ledger_user_month ON ledger (user_key, resource, month);
    CREATE INDEX ledger_user_day ON ledger (user_key, resource, day);
    CREATE INDEX ledger_guild_month ON ledger (guild_key, resource, month);
    CREATE INDEX ledger_resource_month ON ledger (resource, month);
    CREATE INDEX ledger_job ON ledger (job_id);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        at         REAL NOT NULL,
        actor      TEXT NOT NULL,
        action     TEXT NOT NULL,
        subject    TEXT,
        job_id     TEXT,
        detail     TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_by_action ON audit (action, at);

    CREATE TABLE controls (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: the admin report and the failure-rate alert read jobs by when they ended (covering: no table lookups)
    """
    CREATE INDEX jobs_by_end ON jobs (finished_at, state, backend, created_at);
    """,
    # 3: the image retention's hourly sweep reads the results still on disk, oldest first, without walking every job
    """
    CREATE INDEX jobs_with_result ON jobs (finished_at) WHERE result_path IS NOT NULL;
    """,
    # 4: one opaque resume token per job in place of BFL's task columns, and a backend column whose CHECK admits any
    # kind, so that a new kind of backend needs no migration (the code writes only BackendKind values). SQLite cannot
    # change a CHECK, so the table is rebuilt: copied aside, dropped, created anew and filled again, in one transaction.
    # The ledger's lines name their jobs; with foreign keys deferred, the commit checks that each still finds its
    # job (a copy renamed into place would leave those checks failing), and any failure rolls the whole step back.
    """
    PRAGMA defer_foreign_keys = ON;
    CREATE TEMP TABLE jobs_before_resume_token AS SELECT * FROM jobs;
    DROP TABLE jobs;
    CREATE TABLE jobs (
        id                    TEXT PRIMARY KEY,
        user_key              TEXT NOT NULL REFERENCES users(user_key),
        guild_key             TEXT,
        platform              TEXT NOT NULL,
        user_id               TEXT NOT NULL,
        guild_id              TEXT,
        channel_id            TEXT,
        display_name          TEXT,
        roles                 TEXT NOT NULL DEFAULT '[]',
        is_admin              INTEGER NOT NULL DEFAULT 0,
        prompt                TEXT NOT NULL,
        model                 TEXT NOT NULL,
        width                 INTEGER NOT NULL,
        height                INTEGER NOT NULL,
        aspect_ratio          TEXT NOT NULL,
        steps                 INTEGER NOT NULL,
        guidance              REAL,
        seed                  INTEGER NOT NULL,
        mode                  TEXT NOT NULL,
        input_image_url       TEXT,
        state                 TEXT NOT NULL CHECK (state IN ('queued','running','done','failed','cancelled')),
        backend               TEXT NOT NULL CHECK (backend <> ''),
        reason                TEXT NOT NULL,
        attempts              INTEGER NOT NULL DEFAULT 0,
        local_attempts        INTEGER NOT NULL DEFAULT 0,
        estimated_cost_micros INTEGER NOT NULL DEFAULT 0,
        estimated_gpu_ms      INTEGER NOT NULL DEFAULT 0,
        resume_token          TEXT,  -- JSON (models.ResumeToken): how the backend continues the job after a restart
        created_at            REAL NOT NULL,
        started_at            REAL,
        finished_at           REAL,
        failure_reason        TEXT,
        error                 TEXT,
        cost_micros           INTEGER NOT NULL DEFAULT 0,
        result_path           TEXT,
        delivered             INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO jobs (
        id, user_key, guild_key, platform, user_id, guild_id, channel_id, display_name, roles, is_admin, prompt, model,
        width, height, aspect_ratio, steps, guidance, seed, mode, input_image_url, state, backend, reason, attempts,
        local_attempts, estimated_cost_micros, estimated_gpu_ms, resume_token, created_at, started_at, finished_at,
        failure_reason, error, cost_micros, result_path, delivered
    )
    SELECT
        id, user_key, guild_key, platform, user_id, guild_id, channel_id, display_name, roles, is_admin, prompt, model,
        width, height, aspect_ratio, steps, guidance, seed, mode, input_image_url, state, backend, reason, attempts,
        local_attempts, estimated_cost_micros, estimated_gpu_ms,
        CASE WHEN task_id IS NOT NULL AND polling_url IS NOT NULL THEN json_object(
            'state', json_object(
                'task_id', task_id, 'polling_url', polling_url, 'cost_micros', COALESCE(task_cost_micros, 0)
            ),
            'billed_micros', COALESCE(task_cost_micros, 0),
            'billing', 'BFL bills its task ' || task_id
        ) END,
        created_at, started_at, finished_at, failure_reason, error, cost_micros, result_path, delivered
    FROM jobs_before_resume_token;
    DROP TABLE jobs_before_resume_token;
    CREATE INDEX jobs_by_state ON jobs (state, backend, created_at);
    CREATE INDEX jobs_by_user ON jobs (user_key, state);
    CREATE INDEX jobs_undelivered ON jobs (delivered, state);
    CREATE INDEX jobs_by_end ON jobs (finished_at, state, backend, created_at);
    CREATE INDEX jobs_with_result ON jobs (finished_at) WHERE result_path IS NOT NULL;
    """,
)


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose usage a limit counts: one user, one guild/workspace, or everyone (key None for global)."""

    kind: str  # "user" | "guild" | "global"
    key: str | None


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit that a reservation must stay within, checked inside the reserving transaction."""

    name: str  # user-facing name: "images per day", "API budget this month", ...
    scope: Scope
    resource: Resource
    period_key: str  # "2026-11-26" or "2026-11", matching resource.period
    limit: int
    resets_at: float | None

    def refusal(self, used: int, amount: int) -> QuotaExceeded | None:
        """The refusal when `amount` more on top of `used` would cross this limit, else None."""
        if used + amount <= self.limit:
            return None
        return QuotaExceeded(
            self.name,
            unit=self.resource.value,
            limit_value=self.limit,
            remaining=max(0, self.limit - used),
            resets_at=None if self.resets_at is None else datetime.fromtimestamp(self.resets_at, UTC),
            scope=self.scope.kind,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    resource: Resource
    amount: int
    backend: BackendKind | None
    day: str
    month: str


@dataclass(frozen=True, slots=True)
class OpenReservation:
    id: int
    resource: Resource
    amount: int
    backend: BackendKind | None


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the dispatcher's fair pick needs of a queued job (the queue comes oldest first)."""

    id: str
    user_key: str


@dataclass(frozen=True, slots=True)
class Close:
    """How one open reservation ends: settled at `amount` or voided (amount None)."""

    reservation_id: int
    amount: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_key: str
    display_name: str | None
    roles: tuple[str, ...]
    banned: bool
    overrides: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    actor: str
    action: str
    subject: str | None = None
    job_id: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SpendRow:
    user_key: str
    backend: str
    images: int
    usd_micros: int
    pending_usd_micros: int


_JOB_COLUMNS = (
    "id, user_key, guild_key, platform, user_id, guild_id, channel_id, display_name, roles, is_admin, prompt, model,"
    " width, height, aspect_ratio, steps, guidance, seed, mode, input_image_url, state, backend, reason, attempts,"
    " local_attempts, estimated_cost_micros, estimated_gpu_ms, resume_token, created_at,"
    " started_at, finished_at, failure_reason, error, cost_micros, result_path, delivered"
)


def _job_from_row(row: sqlite3.Row) -> Job:
    requester = Requester(
        platform=Platform(row["platform"]),
        user_id=row["user_id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        roles=tuple(json.loads(row["roles"])),
        is_admin=bool(row["is_admin"]),
        display_name=row["display_name"],
    )
    request = ResolvedRequest(
        prompt=row["prompt"],
        model=row["model"],
        width=row["width"],
        height=row["height"],
        aspect_ratio=row["aspect_ratio"],
        steps=row["steps"],
        guidance=row["guidance"],
        seed=row["seed"],
        mode=Mode(row["mode"]),
        input_image_url=row["input_image_url"],
    )
    token = row["resume_token"]
    return Job(
        id=row["id"],
        requester=requester,
        request=request,
        state=JobState(row["state"]),
        backend=BackendKind(row["backend"]),
        reason=row["reason"],
        created_at=row["created_at"],
        attempts=row["attempts"],
        local_attempts=row["local_attempts"],
        estimated_cost_micros=row["estimated_cost_micros"],
        estimated_gpu_ms=row["estimated_gpu_ms"],
        resume=ResumeToken.from_json(token) if token else None,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        failure_reason=FailureReason(row["failure_reason"]) if row["failure_reason"] else None,
        error=row["error"],
        cost_micros=row["cost_micros"],
        result_path=row["result_path"],
        delivered=bool(row["delivered"]),
    )


# Whose use, of what, in which period ("2026-11-26" or "2026-11", matching the resource's period).
UsageKey = tuple[Scope, Resource, str]


def _user_from_row(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        user_key=row["user_key"],
        display_name=row["display_name"],
        roles=tuple(json.loads(row["roles"])),
        banned=bool(row["banned"]),
        overrides=json.loads(row["overrides"]),
        settings=json.loads(row["settings"]),
    )


INSERT_JOB = f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * 36)})"


def job_row(job: Job) -> tuple[Any, ...]:
    """The parameters of INSERT_JOB for a new job (also what bench/engine_overhead.py's raw sqlite3 baseline writes)."""
    requester = job.requester
    r = job.request
    return (
        job.id,
        requester.user_key,
        requester.guild_key,
        requester.platform.value,
        requester.user_id,
        requester.guild_id,
        requester.channel_id,
        requester.display_name,
        json.dumps(list(requester.roles)),
        int(requester.is_admin),
        r.prompt,
        r.model,
        r.width,
        r.height,
        r.aspect_ratio,
        r.steps,
        r.guidance,
        r.seed,
        r.mode.value,
        r.input_image_url,
        job.state.value,
        job.backend.value,
        job.reason,
        job.attempts,
        job.local_attempts,
        job.estimated_cost_micros,
        job.estimated_gpu_ms,
        None,
        job.created_at,
        None,
        None,
        None,
        None,
        0,
        None,
        0,
    )


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA synchronous=NORMAL")
        store = cls(db, path)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        def migrate(db: sqlite3.Connection) -> list[int]:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] if row and row[0] is not None else 0
            if current > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {current}, newer than this flux-bot knows")
            applied = []
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in _statements(script):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                applied.append(version)
            return applied

        for version in await self._tx(migrate):
            log.info("database %s migrated to schema version %d", self.path, version)

    async def _on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread: one hand-over, however many statements `fn` runs.

        Each hand-over to aiosqlite's thread and back costs far more than a small statement, so every method runs
        its whole body this way rather than awaiting statement by statement. aiosqlite offers no public call for
        it, so this is the one place that uses its private `Connection._execute` and `_conn` (aiosqlite 0.22): an
        upgrade that changes them breaks here, and every test that opens a Store shows it.
        """
        connection = self._db._conn  # as aiosqlite's own calls do: a closed one raises "no active connection"
        run: Callable[[Callable[[], T]], Awaitable[T]] = self._db._execute
        return await run(lambda: fn(connection))

    async def _tx(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run `body` in one transaction: BEGIN IMMEDIATE, body, COMMIT (ROLLBACK on any error), one hand-over.

        A caller cancelled while it waits does not stop the function on the thread (nothing can): it still runs to
        its COMMIT or ROLLBACK, before whatever is handed over next, so a transaction is never left open, and no
        statement of another caller ever runs inside it. The lock hands transactions over one at a time, so a
        read (which needs no lock) waits behind one transaction at most, not behind a line of them.
        """
        async with self._lock:
            return await self._on_thread(partial(_in_transaction, body))

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        # No lock: a read is one function on the same thread as every whole transaction, so it never sees half of one.
        return await self._on_thread(lambda db: db.execute(sql, params).fetchall())

    # ---- users ----

    async def get_user(self, user_key: str) -> UserRecord | None:
        rows = await self._read("SELECT * FROM users WHERE user_key = ?", (user_key,))
        return _user_from_row(rows[0]) if rows else None

    async def user_and_usages(self, user_key: str, keys: Sequence[UsageKey]) -> tuple[UserRecord | None, list[int]]:
        """The stored user and what each (scope, resource, period) has used (as `usages`), read at one moment."""

        def read(db: sqlite3.Connection) -> tuple[sqlite3.Row | None, list[int]]:
            return db.execute("SELECT * FROM users WHERE user_key = ?", (user_key,)).fetchone(), _usages(db, keys)

        row, used = await self._on_thread(read)
        return (_user_from_row(row) if row is not None else None), used

    async def update_user(
        self,
        user_key: str,
        *,
        display_name: str | None = None,
        banned: bool | None = None,
        overrides: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        def update(db: sqlite3.Connection) -> None:
            _ensure_user(db, user_key, display_name)
            if banned is not None:
                db.execute("UPDATE users SET banned = ? WHERE user_key = ?", (int(banned), user_key))
            if overrides is not None:
                db.execute("UPDATE users SET overrides = ? WHERE user_key = ?", (json.dumps(overrides), user_key))
            if settings is not None:
                db.execute("UPDATE users SET settings = ? WHERE user_key = ?", (json.dumps(settings), user_key))
            db.execute("UPDATE users SET updated_at = ? WHERE user_key = ?", (time.time(), user_key))
            if audit:
                _audit(db, audit)

        await self._tx(update)

    # ---- jobs ----

    async def submit_job(
        self,
        job: Job,
        reservations: Iterable[Reservation],
        checks: Iterable[LimitCheck],
        max_active_jobs: int | None,
        audit: AuditEntry | None = None,
    ) -> None:
        """Insert the job and its reservations if every limit holds, all in one transaction; else QuotaExceeded."""
        requester = job.requester
        reservations = list(reservations)
        checks = list(checks)
        row = job_row(job)

        def submit(db: sqlite3.Connection) -> None:
            _ensure_user(db, requester.user_key, requester.display_name, requester.roles)
            if max_active_jobs is not None:
                active = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE user_key = ? AND state IN ('queued','running')",
                    (requester.user_key,),
                ).fetchone()[0]
                if active >= max_active_jobs:
                    raise QuotaExceeded(
                        "jobs at once", unit="jobs", limit_value=max_active_jobs, remaining=0, resets_at=None
                    )
            _check_limits(db, reservations, checks)
            db.execute(INSERT_JOB, row)
            _insert_reservations(db, job.id, requester.user_key, requester.guild_key, reservations)
            if audit:
                _audit(db, audit)

        await self._tx(submit)

    async def get_job(self, job_id: str) -> Job:
        rows = await self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return _job_from_row(rows[0])

    async def jobs(
        self,
        *,
        states: Iterable[JobState] | None = None,
        user_key: str | None = None,
        backend: BackendKind | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            state_list = [s.value for s in states]
            where.append(f"state IN ({', '.join('?' * len(state_list))})")
            params.extend(state_list)
        if user_key is not None:
            where.append("user_key = ?")
            params.append(user_key)
        if backend is not None:
            where.append("backend = ?")
            params.append(backend.value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if newest_first else "ASC"
        rows = await self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs {clause} ORDER BY created_at {order}, id {order} LIMIT ?",
            (*params, limit),
        )
        return [_job_from_row(row) for row in rows]

    async def queued(self, backend: BackendKind, limit: int = 1000) -> list[QueuedJob]:
        """The queue of one backend, oldest first, as little as the dispatcher's pick needs (no Job objects)."""
        rows = await self._read(
            "SELECT id, user_key FROM jobs WHERE state = 'queued' AND backend = ? ORDER BY created_at, id LIMIT ?",
            (backend.value, limit),
        )
        return [QueuedJob(row[0], row[1]) for row in rows]

    async def count_jobs(self, state: JobState, backend: BackendKind | None = None) -> int:
        if backend is None:
            rows = await self._read("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,))
        else:
            rows = await self._read(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND backend = ?", (state.value, backend.value)
            )
        return int(rows[0][0])

    async def mark_running(self, job_id: str, now: float) -> Job:
        """queued -> running, counting the attempt; returns the updated job."""

        def mark(db: sqlite3.Connection) -> sqlite3.Row:
            cursor = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1,"
                " local_attempts = local_attempts + (backend = 'local'), started_at = ?"
                " WHERE id = ? AND state = 'queued'",
                (now, job_id),
            )
            if cursor.rowcount != 1:
                raise JobNotFound(job_id)
            row: sqlite3.Row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row

        return _job_from_row(await self._tx(mark))

    async def store_resume_token(self, job_id: str, token: ResumeToken) -> None:
        """Remember how to continue a job handed to something remote before waiting on it, so that a restart
        resumes it instead of submitting it again."""
        await self._tx(
            lambda db: db.execute("UPDATE jobs SET resume_token = ? WHERE id = ?", (token.to_json(), job_id))
        )

    async def open_reservations(self, job_id: str) -> list[OpenReservation]:
        return await self._on_thread(lambda db: _open_reservations(db, job_id))

    async def finish_job(
        self,
        job_id: str,
        state: JobState,
        closes: Iterable[Close],
        *,
        now: float,
        cost_micros: int = 0,
        failure_reason: FailureReason | None = None,
        error: str | None = None,
        result_path: str | None = None,
        audit: AuditEntry | None = None,
    ) -> bool:
        """Move a non-terminal job to a terminal state and close its reservations in one transaction.

        Returns False (and changes nothing) when the job had already ended: a terminal state is reached once.
        """
        assert state.terminal
        closes = list(closes)

        def finish(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, cost_micros = ?, failure_reason = ?, error = ?,"
                " result_path = ? WHERE id = ? AND state IN ('queued','running')",
                (
                    state.value,
                    now,
                    cost_micros,
                    failure_reason.value if failure_reason else None,
                    error,
                    result_path,
                    job_id,
                ),
            )
            if cursor.rowcount != 1:
                return False
            _close(db, closes, now)
            if audit:
                _audit(db, audit)
            return True

        return await self._tx(finish)

    async def reroute(
        self,
        job_id: str,
        backend: BackendKind,
        reason: str,
        closes: Iterable[Close],
        reservations: Iterable[Reservation],
        checks: Iterable[LimitCheck],
        *,
        estimated_cost_micros: int,
        estimated_gpu_ms: int,
        now: float,
    ) -> None:
        """Put a failed attempt back in the queue on `backend` with fresh reservations (QuotaExceeded if no room)."""
        closes = list(closes)
        reservations = list(reservations)
        checks = list(checks)

        def reroute(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT user_key, guild_key FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            _close(db, closes, now)
            _check_limits(db, reservations, checks)
            db.execute(
                "UPDATE jobs SET state = 'queued', backend = ?, reason = ?, estimated_cost_micros = ?,"
                " estimated_gpu_ms = ?, resume_token = NULL"
                " WHERE id = ? AND state IN ('queued','running')",
                (backend.value, reason, estimated_cost_micros, estimated_gpu_ms, job_id),
            )
            _insert_reservations(db, job_id, row["user_key"], row["guild_key"], reservations, now=now)

        await self._tx(reroute)

    async def requeue(self, job_id: str, reason: str) -> None:
        """running -> queued on the same backend, keeping its reservations (a local job caught in a restart)."""
        await self._tx(
            lambda db: db.execute(
                "UPDATE jobs SET state = 'queued', reason = ? WHERE id = ? AND state = 'running'",
                (reason, job_id),
            )
        )

    async def mark_delivered(self, job_id: str) -> None:
        await self._tx(lambda db: db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,)))

    async def undelivered(self) -> list[Job]:
        rows = await self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE delivered = 0 AND state IN ('done','failed','cancelled')"
            " ORDER BY finished_at"
        )
        return [_job_from_row(row) for row in rows]

    # ---- stored images (engine/retention.py) ----

    async def stored_results(self, finished_before: float | None = None) -> list[StoredResult]:
        """The jobs whose image is still on disk, oldest first: all of them, or those that ended before a moment."""
        where = "" if finished_before is None else " AND finished_at < ?"
        rows = await self._read(
            "SELECT id, result_path, finished_at FROM jobs INDEXED BY jobs_with_result"
            f" WHERE result_path IS NOT NULL{where} ORDER BY finished_at",
            () if finished_before is None else (finished_before,),
        )
        return [StoredResult(row[0], row[1], row[2]) for row in rows]

    async def forget_results(self, removals: Sequence[AuditEntry]) -> list[str]:
        """Record that these jobs' images were removed from disk: result_path cleared, one audit line each.

        One transaction for the lot (a first sweep may remove thousands); returns the jobs that had an image.
        """

        def forget(db: sqlite3.Connection) -> list[str]:
            forgotten = []
            for audit in removals:
                cursor = db.execute(
                    "UPDATE jobs SET result_path = NULL WHERE id = ? AND result_path IS NOT NULL", (audit.job_id,)
                )
                if cursor.rowcount == 1:
                    _audit(db, audit)
                    forgotten.append(str(audit.job_id))
            return forgotten

        return await self._tx(forget)

    # ---- ledger ----

    async def usage(self, scope: Scope, resource: Resource, period_key: str) -> int:
        return (await self.usages([(scope, resource, period_key)]))[0]

    async def usages(self, keys: Sequence[UsageKey]) -> list[int]:
        """What each (scope, resource, period) has used so far, in the order asked, read at one moment."""
        return await self._on_thread(lambda db: _usages(db, keys))

    async def grant(
        self,
        user_key: str,
        resource: Resource,
        amount: int,
        day: str,
        month: str,
        reason: str,
        audit: AuditEntry,
    ) -> None:
        def grant(db: sqlite3.Connection) -> None:
            _ensure_user(db, user_key, None)
            db.execute(
                "INSERT INTO ledger (entry, user_key, resource, amount, day, month, reason, created_at)"
                " VALUES ('grant', ?, ?, ?, ?, ?, ?, ?)",
                (user_key, resource.value, amount, day, month, reason, time.time()),
            )
            _audit(db, audit)

        await self._tx(grant)

    async def spend_report(self, month: str) -> list[SpendRow]:
        """Per user and backend for one month: images made, money posted, money still pending."""
        rows = await self._read(
            """
            SELECT r.user_key AS user_key, COALESCE(r.backend, '-') AS backend,
                   SUM(CASE WHEN r.resource = 'images' AND c.entry = 'settle' THEN c.amount ELSE 0 END) AS images,
                   SUM(CASE WHEN r.resource = 'usd_micros' AND c.entry = 'settle' THEN c.amount ELSE 0 END) AS usd,
                   SUM(CASE WHEN r.resource = 'usd_micros' AND c.id IS NULL THEN r.amount ELSE 0 END) AS pending
            FROM ledger r LEFT JOIN ledger c ON c.ref = r.id
            WHERE r.entry = 'reserve' AND r.month = ?
            GROUP BY r.user_key, r.backend
            ORDER BY usd DESC, r.user_key
            """,
            (month,),
        )
        return [SpendRow(row["user_key"], row["backend"], row["images"], row["usd"], row["pending"]) for row in rows]

    async def job_ledger(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self._read("SELECT * FROM ledger WHERE job_id = ? ORDER BY id", (job_id,))
        return [dict(row) for row in rows]

    async def ledger_totals(self) -> dict[str, int]:
        """Posted amounts by resource over all time (for consistency checks and stats)."""
        rows = await self._read(
            "SELECT r.resource, COALESCE(SUM(c.amount), 0) FROM ledger r JOIN ledger c ON c.ref = r.id"
            " WHERE c.entry = 'settle' GROUP BY r.resource"
        )
        return {row[0]: int(row[1]) for row in rows}

    # ---- audit and controls ----

    async def audit(self, entry: AuditEntry) -> None:
        await self._tx(lambda db: _audit(db, entry))

    async def audit_log(self, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if action is None:
            rows = await self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = await self._read("SELECT * FROM audit WHERE action = ? ORDER BY id DESC LIMIT ?", (action, limit))
        return [dict(row) for row in rows]

    async def get_control(self, name: str) -> str | None:
        rows = await self._read("SELECT value FROM controls WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def set_control(self, name: str, value: str, audit: AuditEntry) -> None:
        def set_control(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO controls (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
            _audit(db, audit)

        await self._tx(set_control)

    # ---- operations: the admin report and the alerts (engine/report.py, engine/alerts.py) ----

    async def posted_spend_by_day(self, first_day: str, last_day: str) -> list[DaySpend]:
        """Money posted (settled) per ledger day and backend, first_day..last_day inclusive ("YYYY-MM-DD").

        A settle line carries its reservation's day, so money counts on the day the quotas count it.
        """
        rows = await self._read(
            "SELECT day, backend, SUM(amount) FROM ledger WHERE entry = 'settle' AND resource = 'usd_micros'"
            " AND month BETWEEN ? AND ? AND day BETWEEN ? AND ? AND backend IS NOT NULL GROUP BY day, backend",
            (first_day[:7], last_day[:7], first_day, last_day),
        )
        return [DaySpend(row[0], BackendKind(row[1]), int(row[2])) for row in rows]

    async def posted_spend(self, month: str) -> int:
        """All money posted (settled) in one month ("YYYY-MM"): what the spend alerts compare with the cap."""
        rows = await self._read(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE entry = 'settle' AND resource = 'usd_micros'"
            " AND month = ?",
            (month,),
        )
        return int(rows[0][0])

    async def ended_jobs(self, since: float, until: float) -> list[EndedJob]:
        """Jobs that reached a terminal state in [since, until), oldest first."""
        # Named: without statistics SQLite would rather walk jobs_by_state for `state IN`, i.e. every job ever.
        rows = await self._read(
            "SELECT state, backend, created_at, finished_at FROM jobs INDEXED BY jobs_by_end"
            " WHERE finished_at >= ? AND finished_at < ? AND state IN ('done','failed','cancelled')"
            " ORDER BY finished_at",
            (since, until),
        )
        return [EndedJob(JobState(row[0]), BackendKind(row[1]), row[2], row[3]) for row in rows]

    async def ended_counts(self, since: float) -> dict[JobState, int]:
        """How many jobs reached each terminal state since `since` (states with none are left out)."""
        rows = await self._read(
            "SELECT state, COUNT(*) FROM jobs INDEXED BY jobs_by_end"
            " WHERE finished_at >= ? AND state IN ('done','failed','cancelled') GROUP BY state",
            (since,),
        )
        return {JobState(row[0]): int(row[1]) for row in rows}


@dataclass(frozen=True, slots=True)
class StoredResult:
    job_id: str
    path: str
    finished_at: float


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: str
    backend: BackendKind
    usd_micros: int


@dataclass(frozen=True, slots=True)
class EndedJob:
    state: JobState
    backend: BackendKind
    created_at: float
    finished_at: float


# ---- end of the operations section ----


# ---- helpers that run on the connection's thread, inside a caller's transaction or read ----


def _in_transaction(body: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body(db)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.OperationalError):  # a failed COMMIT may have ended it already
            db.execute("ROLLBACK")
        raise
    return result


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which contain ';') whole."""
    statements, current = [], []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if not stripped.strip():
            continue
        current.append(stripped)
        text = " ".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            statements.append(text)
            current = []
    return statements


def _ensure_user(
    db: sqlite3.Connection, user_key: str, display_name: str | None, roles: tuple[str, ...] | None = None
) -> None:
    now = time.time()
    db.execute(
        "INSERT INTO users (user_key, display_name, roles, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT(user_key) DO UPDATE SET display_name = COALESCE(excluded.display_name, users.display_name),"
        " roles = CASE WHEN ? THEN excluded.roles ELSE users.roles END",
        (user_key, display_name, json.dumps(list(roles or ())), now, now, roles is not None),
    )


_SCOPE_FILTERS = {"user": "r.user_key = ?", "guild": "r.guild_key = ?", "global": "1 = 1"}


def _usages(db: sqlite3.Connection, keys: Sequence[UsageKey]) -> list[int]:
    """Spend in a period = posted + pending - the user's grants (grants only lift a user's own limits).

    One grouped query per scope and period (the day's images and GPU time together), not one sum per resource:
    a reservation counts at its settled amount, 0 once voided, its reserved amount while open; a user's grant
    line counts negatively.
    """
    groups: dict[tuple[Scope, str, str], list[Resource]] = {}
    for scope, resource, period_key in keys:
        groups.setdefault((scope, resource.period.value, period_key), []).append(resource)
    used: dict[UsageKey, int] = {}
    for (scope, period, period_key), resources in groups.items():
        names = list(dict.fromkeys(resource.value for resource in resources))
        entries = "('reserve','grant')" if scope.kind == "user" else "('reserve')"
        params: list[Any] = [*names, period_key]
        if scope.kind != "global":
            params.append(scope.key)
        sums = dict(
            db.execute(
                "SELECT r.resource, SUM(CASE WHEN r.entry = 'grant' THEN -r.amount WHEN c.entry = 'settle'"
                " THEN c.amount WHEN c.entry = 'void' THEN 0 ELSE r.amount END)"
                " FROM ledger r LEFT JOIN ledger c ON c.ref = r.id"
                f" WHERE r.entry IN {entries} AND r.resource IN ({', '.join('?' * len(names))})"
                f" AND r.{period} = ? AND {_SCOPE_FILTERS[scope.kind]} GROUP BY r.resource",
                params,
            ).fetchall()
        )
        for resource in resources:
            used[(scope, resource, period_key)] = int(sums.get(resource.value) or 0)
    return [used[key] for key in keys]


def _check_limits(db: sqlite3.Connection, reservations: list[Reservation], checks: Iterable[LimitCheck]) -> None:
    wanted: dict[Resource, int] = {}
    for reservation in reservations:
        wanted[reservation.resource] = wanted.get(reservation.resource, 0) + reservation.amount
    counted = [check for check in checks if wanted.get(check.resource, 0) != 0]
    used = _usages(db, [(check.scope, check.resource, check.period_key) for check in counted])
    for check, so_far in zip(counted, used, strict=True):
        refusal = check.refusal(so_far, wanted[check.resource])
        if refusal is not None:
            raise refusal


def _insert_reservations(
    db: sqlite3.Connection,
    job_id: str,
    user_key: str,
    guild_key: str | None,
    reservations: Iterable[Reservation],
    *,
    now: float | None = None,
) -> None:
    stamp = time.time() if now is None else now
    db.executemany(
        "INSERT INTO ledger (entry, job_id, user_key, guild_key, backend, resource, amount, day, month,"
        " created_at) VALUES ('reserve', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                job_id,
                user_key,
                guild_key,
                reservation.backend.value if reservation.backend else None,
                reservation.resource.value,
                reservation.amount,
                reservation.day,
                reservation.month,
                stamp,
            )
            for reservation in reservations
        ],
    )


def _open_reservations(db: sqlite3.Connection, job_id: str) -> list[OpenReservation]:
    rows = db.execute(
        "SELECT r.id, r.resource, r.amount, r.backend FROM ledger r LEFT JOIN ledger c ON c.ref = r.id"
        " WHERE r.job_id = ? AND r.entry = 'reserve' AND c.id IS NULL ORDER BY r.id",
        (job_id,),
    ).fetchall()
    return [OpenReservation(row[0], Resource(row[1]), row[2], BackendKind(row[3]) if row[3] else None) for row in rows]


def _close(db: sqlite3.Connection, closes: Iterable[Close], now: float) -> None:
    # The reservation's own user, guild, period and backend are copied so every line stands on its own.
    db.executemany(
        "INSERT INTO ledger (entry, ref, job_id, user_key, guild_key, backend, resource, amount, day, month,"
        " reason, created_at)"
        " SELECT ?, id, job_id, user_key, guild_key, backend, resource, ?, day, month, ?, ?"
        " FROM ledger WHERE id = ? AND entry = 'reserve'",
        [
            (
                "void" if close.amount is None else "settle",
                0 if close.amount is None else close.amount,
                close.reason,
                now,
                close.reservation_id,
            )
            for close in closes
        ],
    )


def _audit(db: sqlite3.Connection, entry: AuditEntry) -> None:
    db.execute(
        "INSERT INTO audit (at, actor, action, subject, job_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), entry.actor, entry.action, entry.subject, entry.job_id, json.dumps(entry.detail or {})),
    )
