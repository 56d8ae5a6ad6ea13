"""The SQL of users, the audit log, the admins' controls, and the reads of the admin report and the alerts.

Every function runs on the connection's thread inside the caller's transaction or read.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from engine.models import AuditEntry, BackendKind, JobState, UserRecord


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


def ensure_user(
    db: sqlite3.Connection, user_key: str, display_name: str | None, now: float, roles: tuple[str, ...] | None = None
) -> None:
    db.execute(
        "INSERT INTO users (user_key, display_name, roles, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT(user_key) DO UPDATE SET display_name = COALESCE(excluded.display_name, users.display_name),"
        " roles = CASE WHEN ? THEN excluded.roles ELSE users.roles END",
        (user_key, display_name, json.dumps(list(roles or ())), now, now, roles is not None),
    )


def user_from_row(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        user_key=row["user_key"],
        display_name=row["display_name"],
        roles=tuple(json.loads(row["roles"])),
        banned=bool(row["banned"]),
        overrides=json.loads(row["overrides"]),
        settings=json.loads(row["settings"]),
    )


def audit(db: sqlite3.Connection, entry: AuditEntry, now: float) -> None:
    db.execute(
        "INSERT INTO audit (at, actor, action, subject, job_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (now, entry.actor, entry.action, entry.subject, entry.job_id, json.dumps(entry.detail or {})),
    )


def set_control(db: sqlite3.Connection, name: str, value: str) -> None:
    db.execute(
        "INSERT INTO controls (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def posted_spend_by_day(db: sqlite3.Connection, first_day: str, last_day: str) -> list[DaySpend]:
    """Money posted (settled) per ledger day and backend, first_day..last_day inclusive ("YYYY-MM-DD").

    A settle line carries its reservation's day, so money counts on the day the quotas count it.
    """
    rows = db.execute(
        "SELECT day, backend, SUM(amount) FROM ledger WHERE entry = 'settle' AND resource = 'usd_micros'"
        " AND month BETWEEN ? AND ? AND day BETWEEN ? AND ? AND backend IS NOT NULL GROUP BY day, backend",
        (first_day[:7], last_day[:7], first_day, last_day),
    ).fetchall()
    return [DaySpend(row[0], BackendKind(row[1]), int(row[2])) for row in rows]


def posted_spend(db: sqlite3.Connection, month: str) -> int:
    """All money posted (settled) in one month ("YYYY-MM"): the whole bot's running total."""
    row = db.execute(
        "SELECT posted FROM usage WHERE scope_kind = 'global' AND scope_key = '' AND resource = 'usd_micros'"
        " AND period = ?",
        (month,),
    ).fetchone()
    return int(row[0]) if row else 0


def ended_jobs(db: sqlite3.Connection, since: float, until: float) -> list[EndedJob]:
    """Jobs that reached a terminal state in [since, until), oldest first."""
    # Named: without statistics SQLite would rather walk jobs_by_state for `state IN`, i.e. every job ever.
    rows = db.execute(
        "SELECT state, backend, created_at, finished_at FROM jobs INDEXED BY jobs_by_end"
        " WHERE finished_at >= ? AND finished_at < ? AND state IN ('done','failed','cancelled')"
        " ORDER BY finished_at",
        (since, until),
    ).fetchall()
    return [EndedJob(JobState(row[0]), BackendKind(row[1]), row[2], row[3]) for row in rows]


def ended_counts(db: sqlite3.Connection, since: float) -> dict[JobState, int]:
    """How many jobs reached each terminal state since `since` (states with none are left out)."""
    rows = db.execute(
        "SELECT state, COUNT(*) FROM jobs INDEXED BY jobs_by_end"
        " WHERE finished_at >= ? AND state IN ('done','failed','cancelled') GROUP BY state",
        (since,),
    ).fetchall()
    return {JobState(row[0]): int(row[1]) for row in rows}
