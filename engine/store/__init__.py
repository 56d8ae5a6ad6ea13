"""The only package that speaks SQL: one `Store` over the connection, the schema, and the SQL of jobs, the ledger
and operations.

A Store method is one hand-over to the connection's thread: a read, or one transaction that composes the modules'
functions (a submit writes the job, its reservations with their running totals, and its audit line together).
Every write takes its time from the injected clock.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import JobNotFound, QuotaExceeded
from engine.ledger import Close, LimitCheck, OpenReservation, Reservation, Scope, TotalsDifference, UsageKey
from engine.models import (
    Appeal,
    AppealState,
    AuditEntry,
    AuditRecord,
    BackendKind,
    FailureReason,
    Job,
    JobState,
    Platform,
    Posting,
    Resource,
    ResumeToken,
    Review,
    SpendRow,
    UserRecord,
)
from engine.store import appeals, jobs, ledger, ops
from engine.store.connection import Connection
from engine.store.jobs import INSERT_JOB, JOB_COLUMNS, QueuedJob, StoredResult, job_from_row, job_row
from engine.store.ops import DaySpend, EndedJob
from engine.store.schema import migrate

__all__ = [
    "INSERT_JOB",
    "Connection",
    "DaySpend",
    "EndedJob",
    "QueuedJob",
    "Store",
    "StoredResult",
    "job_row",
    "totals_differences_in",
]

log = logging.getLogger(__name__)


class Store:
    def __init__(self, connection: Connection, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._connection = connection
        self._clock = clock
        self.path = path

    @classmethod
    async def open(cls, path: Path, clock: Callable[[], float] = time.time) -> Store:
        store = cls(await Connection.open(path), path, clock)
        try:
            for version in await store._connection.transaction(lambda db: migrate(db, path)):
                log.info("database %s migrated to schema version %d", path, version)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._connection.close()

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await self._connection.read(sql, params)

    # ---- users ----

    async def get_user(self, user_key: str) -> UserRecord | None:
        rows = await self._read("SELECT * FROM users WHERE user_key = ?", (user_key,))
        return ops.user_from_row(rows[0]) if rows else None

    async def user_and_usages(self, user_key: str, keys: Sequence[UsageKey]) -> tuple[UserRecord | None, list[int]]:
        """The stored user and what each (scope, resource, period) has used (as `usages`), read at one moment."""

        def read(db: sqlite3.Connection) -> tuple[sqlite3.Row | None, list[int]]:
            row = db.execute("SELECT * FROM users WHERE user_key = ?", (user_key,)).fetchone()
            return row, ledger.usages(db, keys)

        row, used = await self._connection.on_thread(read)
        return (ops.user_from_row(row) if row is not None else None), used

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
            now = self._clock()
            ops.ensure_user(db, user_key, display_name, now)
            if banned is not None:
                db.execute("UPDATE users SET banned = ? WHERE user_key = ?", (int(banned), user_key))
            if overrides is not None:
                db.execute("UPDATE users SET overrides = ? WHERE user_key = ?", (json.dumps(overrides), user_key))
            if settings is not None:
                db.execute("UPDATE users SET settings = ? WHERE user_key = ?", (json.dumps(settings), user_key))
            db.execute("UPDATE users SET updated_at = ? WHERE user_key = ?", (now, user_key))
            if audit:
                ops.audit(db, audit, now)

        await self._connection.transaction(update)

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
            now = self._clock()
            ops.ensure_user(db, requester.user_key, requester.display_name, now, requester.roles)
            if max_active_jobs is not None and jobs.count_active(db, requester.user_key) >= max_active_jobs:
                raise QuotaExceeded(
                    "jobs at once", unit="jobs", limit_value=max_active_jobs, remaining=0, resets_at=None
                )
            ledger.check_limits(db, reservations, checks)
            db.execute(INSERT_JOB, row)
            ledger.insert_reservations(db, job.id, requester.user_key, requester.guild_key, reservations, now)
            if audit:
                ops.audit(db, audit, now)

        await self._connection.transaction(submit)

    async def add_settled_jobs(self, ended: Sequence[Job], reservations: Callable[[Job], list[Reservation]]) -> None:
        """Insert ended jobs with their reservations settled at the reserved amounts, all in one transaction: a
        month of history in seconds, with its running totals (the ledger benchmark builds its databases so)."""

        def add(db: sqlite3.Connection) -> None:
            now = self._clock()
            for user_key in dict.fromkeys(job.requester.user_key for job in ended):
                ops.ensure_user(db, user_key, None, now)
            db.executemany(INSERT_JOB, [job_row(job) for job in ended])
            lines = [
                (job.id, job.requester.user_key, job.requester.guild_key, reservation)
                for job in ended
                for reservation in reservations(job)
            ]
            ledger.insert_settled(db, lines, now)

        await self._connection.transaction(add)

    async def held_jobs(self, limit: int = 100) -> list[Job]:
        """Done jobs whose image waits for an admin's review, oldest first."""
        rows = await self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE review = 'held' ORDER BY finished_at, id LIMIT ?", (limit,)
        )
        return [job_from_row(row) for row in rows]

    async def decide_review(self, job_id: str, decision: Review, audit: AuditEntry) -> bool:
        """A held job approved or rejected, with its audit line, in one transaction; False when it was not held
        (decided already, by another admin or another button). An approved image is delivered anew: its
        `delivered` flag is cleared so the delivery path takes it."""
        assert decision in (Review.APPROVED, Review.REJECTED)

        def decide(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE jobs SET review = ?, delivered = 0 WHERE id = ? AND review = 'held'",
                (decision.value, job_id),
            )
            if cursor.rowcount != 1:
                return False
            ops.audit(db, audit, self._clock())
            return True

        return await self._connection.transaction(decide)

    async def record_posting(self, posting: Posting) -> None:
        await self._connection.transaction(
            lambda db: db.execute(
                "INSERT INTO postings (job_id, platform, channel_id, message_id, file_id, posted_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    posting.job_id,
                    posting.platform.value,
                    posting.channel_id,
                    posting.message_id,
                    posting.file_id,
                    self._clock(),
                ),
            )
        )

    async def postings(self, job_id: str) -> list[Posting]:
        rows = await self._read(
            "SELECT job_id, platform, channel_id, message_id, file_id FROM postings WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [Posting(row[0], Platform(row[1]), row[2], row[3], row[4]) for row in rows]

    async def take_down(self, job_id: str, reason: str, audit: AuditEntry) -> None:
        """Keep the job's record with the take-down's reason and its audit line (the image goes separately)."""

        def record(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET taken_down = ? WHERE id = ?", (reason, job_id))
            ops.audit(db, audit, self._clock())

        await self._connection.transaction(record)

    async def input_images_in_use(self) -> set[str]:
        """The input images of jobs still queued or running, and of appeals an admin may yet allow (a refusal not
        yet appealed for a day, after which nobody still waits for it): retention must leave these."""
        rows = await self._read(
            "SELECT input_image FROM jobs WHERE state IN ('queued','running') AND input_image IS NOT NULL"
            " UNION SELECT input_image FROM appeals WHERE input_image IS NOT NULL"
            " AND (state = 'pending' OR (state = 'refused' AND created_at > ?))",
            (self._clock() - 86_400,),
        )
        return {row[0] for row in rows}

    # ---- appeals ----

    async def add_refusal(self, appeal: Appeal, audit: AuditEntry) -> None:
        """A refused prompt its requester may appeal, with the policy's audit line, in one transaction."""

        def add(db: sqlite3.Connection) -> None:
            appeals.insert(db, appeal)
            ops.audit(db, audit, self._clock())

        await self._connection.transaction(add)

    async def get_appeal(self, appeal_id: str) -> Appeal | None:
        rows = await self._read(f"SELECT {appeals.APPEAL_COLUMNS} FROM appeals WHERE id = ?", (appeal_id,))
        return appeals.appeal_from_row(rows[0]) if rows else None

    async def pending_appeals(self, limit: int = 100) -> list[Appeal]:
        rows = await self._read(
            f"SELECT {appeals.APPEAL_COLUMNS} FROM appeals WHERE state = 'pending' ORDER BY created_at LIMIT ?",
            (limit,),
        )
        return [appeals.appeal_from_row(row) for row in rows]

    async def move_appeal(
        self,
        appeal_id: str,
        before: AppealState,
        after: AppealState,
        audit: AuditEntry,
        *,
        reason: str | None = None,
        job_id: str | None = None,
    ) -> bool:
        """An appeal from `before` to `after` with its audit line; False when it was no longer in `before`."""

        def move(db: sqlite3.Connection) -> bool:
            moved = appeals.move(
                db, appeal_id, before, after, decided_by=audit.actor if after is not AppealState.PENDING else None,
                reason=reason, job_id=job_id,
            )  # fmt: skip
            if moved:
                ops.audit(db, audit, self._clock())
            return moved

        return await self._connection.transaction(move)

    async def get_job(self, job_id: str) -> Job:
        rows = await self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return job_from_row(rows[0])

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
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY created_at {order}, rowid {order} LIMIT ?",
            (*params, limit),
        )
        return [job_from_row(row) for row in rows]

    async def queued(self, backend: BackendKind, limit: int = 1000) -> list[QueuedJob]:
        """The queue of one backend, oldest first, as little as the dispatcher's pick needs (no Job objects)."""
        rows = await self._read(
            # rowid breaks a tie in the order of submission (two jobs within one tick of the clock).
            "SELECT id, user_key FROM jobs WHERE state = 'queued' AND backend = ? ORDER BY created_at, rowid LIMIT ?",
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
            row: sqlite3.Row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row

        return job_from_row(await self._connection.transaction(mark))

    async def store_resume_token(self, job_id: str, token: ResumeToken) -> None:
        """Remember how to continue a job handed to something remote before waiting on it, so that a restart
        resumes it instead of submitting it again."""
        await self._connection.transaction(
            lambda db: db.execute("UPDATE jobs SET resume_token = ? WHERE id = ?", (token.to_json(), job_id))
        )

    async def open_reservations(self, job_id: str) -> list[OpenReservation]:
        return await self._connection.on_thread(lambda db: ledger.open_reservations(db, job_id))

    async def finish_job(
        self,
        job_id: str,
        state: JobState,
        closes: Iterable[Close],
        *,
        now: float,
        failure_reason: FailureReason | None = None,
        error: str | None = None,
        result_path: str | None = None,
        audit: AuditEntry | None = None,
        review: Review = Review.NONE,
        review_reason: str | None = None,
        review_detail: str | None = None,
    ) -> bool:
        """Move a non-terminal job to a terminal state and close its reservations in one transaction; the job's
        cost is what its settle lines of money then add up to.

        Returns False (and changes nothing) when the job had already ended: a terminal state is reached once.
        """
        assert state.terminal
        closes = list(closes)

        def finish(db: sqlite3.Connection) -> bool:
            if not jobs.is_active(db, job_id):
                return False
            ledger.close_reservations(db, closes, now)
            jobs.finish(
                db, job_id, state, now, failure_reason, error, result_path, review, review_reason, review_detail
            )
            if audit:
                ops.audit(db, audit, now)
            return True

        return await self._connection.transaction(finish)

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
            ledger.close_reservations(db, closes, now)
            ledger.check_limits(db, reservations, checks)
            db.execute(
                "UPDATE jobs SET state = 'queued', backend = ?, reason = ?, estimated_cost_micros = ?,"
                " estimated_gpu_ms = ?, resume_token = NULL"
                " WHERE id = ? AND state IN ('queued','running')",
                (backend.value, reason, estimated_cost_micros, estimated_gpu_ms, job_id),
            )
            ledger.insert_reservations(db, job_id, row["user_key"], row["guild_key"], reservations, now)

        await self._connection.transaction(reroute)

    async def requeue(self, job_id: str, reason: str) -> None:
        """running -> queued on the same backend, keeping its reservations (a local job caught in a restart)."""
        await self._connection.transaction(
            lambda db: db.execute(
                "UPDATE jobs SET state = 'queued', reason = ? WHERE id = ? AND state = 'running'",
                (reason, job_id),
            )
        )

    async def mark_delivered(self, job_id: str) -> None:
        await self._connection.transaction(
            lambda db: db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))
        )

    async def undelivered(self) -> list[Job]:
        rows = await self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE delivered = 0 AND state IN ('done','failed','cancelled')"
            " ORDER BY finished_at"
        )
        return [job_from_row(row) for row in rows]

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
            now = self._clock()
            forgotten = []
            for entry in removals:
                cursor = db.execute(
                    "UPDATE jobs SET result_path = NULL WHERE id = ? AND result_path IS NOT NULL", (entry.job_id,)
                )
                if cursor.rowcount == 1:
                    ops.audit(db, entry, now)
                    forgotten.append(str(entry.job_id))
            return forgotten

        return await self._connection.transaction(forget)

    # ---- ledger ----

    async def usage(self, scope: Scope, resource: Resource, period_key: str) -> int:
        return (await self.usages([(scope, resource, period_key)]))[0]

    async def usages(self, keys: Sequence[UsageKey]) -> list[int]:
        """What each (scope, resource, period) has used so far, in the order asked, read at one moment."""
        return await self._connection.on_thread(lambda db: ledger.usages(db, keys))

    async def posted(self, job_id: str, resource: Resource) -> int:
        """What this job's settle lines of `resource` add up to: for money, what it has been charged so far."""
        return await self._connection.on_thread(lambda db: ledger.posted(db, job_id, resource))

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
            now = self._clock()
            ops.ensure_user(db, user_key, None, now)
            ledger.grant(db, user_key, resource, amount, day, month, reason, now)
            ops.audit(db, audit, now)

        await self._connection.transaction(grant)

    async def verify_totals(self) -> list[TotalsDifference]:
        """Recompute every running total from the ledger's lines and return each that differs (none: consistent)."""
        return await self._connection.on_thread(ledger.totals_differences)

    async def rebuild_totals(self) -> None:
        """Recompute every running total from the ledger's lines (what the migration that added them does)."""
        await self._connection.transaction(ledger.rebuild_totals)

    async def spend_report(self, month: str) -> list[SpendRow]:
        """Per user and backend for one month: images made, money posted, money still pending."""
        return await self._connection.on_thread(lambda db: ledger.spend_report(db, month))

    async def job_ledger(self, job_id: str) -> list[dict[str, Any]]:
        return await self._connection.on_thread(lambda db: ledger.job_ledger(db, job_id))

    async def ledger_totals(self) -> dict[str, int]:
        """Posted amounts by resource over all time (for consistency checks and stats)."""
        return await self._connection.on_thread(ledger.ledger_totals)

    # ---- audit and controls ----

    async def audit(self, entry: AuditEntry) -> None:
        await self._connection.transaction(lambda db: ops.audit(db, entry, self._clock()))

    async def audit_log(self, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if action is None:
            rows = await self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = await self._read("SELECT * FROM audit WHERE action = ? ORDER BY id DESC LIMIT ?", (action, limit))
        return [dict(row) for row in rows]

    async def audit_records(
        self, *, since: float | None = None, action: str | None = None, limit: int = 200
    ) -> list[AuditRecord]:
        """Audit lines newest first; `action` matches it exactly or as a family ("review" is every "review.*")."""
        where = ["at >= ?"]
        params: list[Any] = [since if since is not None else 0.0]
        if action:
            where.append("(action = ? OR action LIKE ?)")
            params += [action, f"{action}.%"]
        rows = await self._read(
            f"SELECT at, actor, action, subject, job_id, detail FROM audit WHERE {' AND '.join(where)}"
            " ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [AuditRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5] or "{}")) for row in rows]

    async def get_control(self, name: str) -> str | None:
        rows = await self._read("SELECT value FROM controls WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def set_control(self, name: str, value: str, audit: AuditEntry) -> None:
        def set_control(db: sqlite3.Connection) -> None:
            ops.set_control(db, name, value)
            ops.audit(db, audit, self._clock())

        await self._connection.transaction(set_control)

    # ---- operations: the admin report and the alerts (engine/report.py, engine/alerts.py) ----

    async def posted_spend_by_day(self, first_day: str, last_day: str) -> list[DaySpend]:
        """Money posted (settled) per ledger day and backend, first_day..last_day inclusive ("YYYY-MM-DD")."""
        return await self._connection.on_thread(lambda db: ops.posted_spend_by_day(db, first_day, last_day))

    async def posted_spend(self, month: str) -> int:
        """All money posted (settled) in one month ("YYYY-MM"): what the spend alerts compare with the cap."""
        return await self._connection.on_thread(lambda db: ops.posted_spend(db, month))

    async def ended_jobs(self, since: float, until: float) -> list[EndedJob]:
        """Jobs that reached a terminal state in [since, until), oldest first."""
        return await self._connection.on_thread(lambda db: ops.ended_jobs(db, since, until))

    async def ended_counts(self, since: float) -> dict[JobState, int]:
        """How many jobs reached each terminal state since `since` (states with none are left out)."""
        return await self._connection.on_thread(lambda db: ops.ended_counts(db, since))


def totals_differences_in(path: Path) -> list[TotalsDifference]:
    """The running totals of the database at `path` that differ from its ledger, read without migrating or writing
    it (doctor's check; the database must exist and be at the current schema)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return ledger.totals_differences(db)
    finally:
        db.close()
