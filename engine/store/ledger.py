"""The ledger's SQL: reservations, closes and grants, each line added to its running totals in the same transaction.

Every function runs on the connection's thread inside the caller's transaction or read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from engine.ledger import (
    Close,
    LimitCheck,
    OpenReservation,
    Reservation,
    Scope,
    ScopeKind,
    Totals,
    TotalsDifference,
    UsageKey,
    period_key,
    scopes_of,
)
from engine.models import BackendKind, Resource, SpendRow

# One row's change: (scope kind, scope key, resource, period, posted, pending, granted).
_Delta = tuple[str, str, str, str, int, int, int]

_ADD_TO_TOTALS = (
    "INSERT INTO usage (scope_kind, scope_key, resource, period, posted, pending, granted)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope_kind, scope_key, resource, period) DO UPDATE SET"
    " posted = posted + excluded.posted, pending = pending + excluded.pending, granted = granted + excluded.granted"
)


def _deltas(
    user_key: str, guild_key: str | None, resource: Resource, day: str, month: str, change: Totals
) -> list[_Delta]:
    """The change of one line to every scope it counts in (a grant lifts only its user's own limits)."""
    period = period_key(resource, day, month)
    scopes = [Scope.user(user_key)] if change.granted else scopes_of(user_key, guild_key)
    return [
        (s.kind.value, s.key or "", resource.value, period, change.posted, change.pending, change.granted)
        for s in scopes
    ]


def usages(db: sqlite3.Connection, keys: Sequence[UsageKey]) -> list[int]:
    """What each (scope, resource, period) has used, in the order asked: posted + pending - the user's grants."""
    found: dict[tuple[str, str, str, str], int] = {}
    wanted = [(scope.kind.value, scope.key or "", resource.value, period) for scope, resource, period in keys]
    for kind, key, resource, period in dict.fromkeys(wanted):
        row = db.execute(
            "SELECT posted + pending - granted FROM usage"
            " WHERE scope_kind = ? AND scope_key = ? AND resource = ? AND period = ?",
            (kind, key, resource, period),
        ).fetchone()
        found[(kind, key, resource, period)] = int(row[0]) if row else 0
    return [found[key] for key in wanted]


def check_limits(db: sqlite3.Connection, reservations: list[Reservation], checks: Iterable[LimitCheck]) -> None:
    """Raise the first refusal of these reservations against these limits (QuotaExceeded); else nothing."""
    wanted: dict[Resource, int] = {}
    for reservation in reservations:
        wanted[reservation.resource] = wanted.get(reservation.resource, 0) + reservation.amount
    counted = [check for check in checks if wanted.get(check.resource, 0) != 0]
    used = usages(db, [(check.scope, check.resource, check.period_key) for check in counted])
    for check, so_far in zip(counted, used, strict=True):
        refusal = check.refusal(so_far, wanted[check.resource])
        if refusal is not None:
            raise refusal


def insert_reservations(
    db: sqlite3.Connection,
    job_id: str,
    user_key: str,
    guild_key: str | None,
    reservations: Iterable[Reservation],
    now: float,
) -> None:
    reservations = list(reservations)
    db.executemany(
        "INSERT INTO ledger (entry, job_id, user_key, guild_key, backend, resource, amount, day, month,"
        " created_at) VALUES ('reserve', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                job_id,
                user_key,
                guild_key,
                r.backend.value if r.backend else None,
                r.resource.value,
                r.amount,
                r.day,
                r.month,
                now,
            )
            for r in reservations
        ],
    )
    db.executemany(
        _ADD_TO_TOTALS,
        [
            delta
            for r in reservations
            for delta in _deltas(user_key, guild_key, r.resource, r.day, r.month, Totals(pending=r.amount))
        ],
    )


def open_reservations(db: sqlite3.Connection, job_id: str) -> list[OpenReservation]:
    rows = db.execute(
        "SELECT r.id, r.resource, r.amount, r.backend FROM ledger r LEFT JOIN ledger c ON c.ref = r.id"
        " WHERE r.job_id = ? AND r.entry = 'reserve' AND c.id IS NULL ORDER BY r.id",
        (job_id,),
    ).fetchall()
    return [OpenReservation(row[0], Resource(row[1]), row[2], BackendKind(row[3]) if row[3] else None) for row in rows]


def close_reservations(db: sqlite3.Connection, closes: Iterable[Close], now: float) -> None:
    """Settle or void each reservation; a reservation closed twice fails the transaction (ledger_one_close)."""
    deltas: list[_Delta] = []
    for close in closes:
        row = db.execute(
            "SELECT user_key, guild_key, resource, amount, day, month FROM ledger WHERE id = ? AND entry = 'reserve'",
            (close.reservation_id,),
        ).fetchone()
        if row is None:
            continue
        settled = 0 if close.amount is None else close.amount
        # The reservation's own user, guild, period and backend are copied so every line stands on its own.
        db.execute(
            "INSERT INTO ledger (entry, ref, job_id, user_key, guild_key, backend, resource, amount, day, month,"
            " reason, created_at)"
            " SELECT ?, id, job_id, user_key, guild_key, backend, resource, ?, day, month, ?, ?"
            " FROM ledger WHERE id = ?",
            ("void" if close.amount is None else "settle", settled, close.reason, now, close.reservation_id),
        )
        change = Totals(posted=settled, pending=-row["amount"])
        deltas += _deltas(
            row["user_key"], row["guild_key"], Resource(row["resource"]), row["day"], row["month"], change
        )
    db.executemany(_ADD_TO_TOTALS, deltas)


def grant(
    db: sqlite3.Connection,
    user_key: str,
    resource: Resource,
    amount: int,
    day: str,
    month: str,
    reason: str,
    now: float,
) -> None:
    db.execute(
        "INSERT INTO ledger (entry, user_key, resource, amount, day, month, reason, created_at)"
        " VALUES ('grant', ?, ?, ?, ?, ?, ?, ?)",
        (user_key, resource.value, amount, day, month, reason, now),
    )
    db.executemany(_ADD_TO_TOTALS, _deltas(user_key, None, resource, day, month, Totals(granted=amount)))


def posted(db: sqlite3.Connection, job_id: str, resource: Resource) -> int:
    """What this job's settle lines of `resource` add up to (its cost, for money)."""
    row = db.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE job_id = ? AND entry = 'settle' AND resource = ?",
        (job_id, resource.value),
    ).fetchone()
    return int(row[0])


# ---- the running totals recomputed from the lines (the migration's backfill and the consistency check) ----


def totals_from_ledger(db: sqlite3.Connection) -> dict[tuple[str, str, str, str], Totals]:
    """Every (scope kind, scope key, resource, period)'s totals as the ledger's lines add up, zero rows left out."""
    rows = db.execute(
        "SELECT r.user_key, r.guild_key, r.resource, r.day, r.month,"
        " SUM(CASE WHEN r.entry = 'reserve' AND c.entry = 'settle' THEN c.amount ELSE 0 END),"
        " SUM(CASE WHEN r.entry = 'reserve' AND c.id IS NULL THEN r.amount ELSE 0 END),"
        " SUM(CASE WHEN r.entry = 'grant' THEN r.amount ELSE 0 END)"
        " FROM ledger r LEFT JOIN ledger c ON c.ref = r.id WHERE r.entry IN ('reserve', 'grant')"
        " GROUP BY r.user_key, r.guild_key, r.resource, r.day, r.month"
    ).fetchall()
    sums: dict[tuple[str, str, str, str], list[int]] = {}
    for user_key, guild_key, resource, day, month, posted_, pending, granted in rows:
        reserved = Totals(posted=posted_, pending=pending)
        given = Totals(granted=granted)
        for change in (reserved, given):
            if change == Totals():
                continue
            for kind, key, res, period, *amounts in _deltas(
                user_key, guild_key, Resource(resource), day, month, change
            ):
                total = sums.setdefault((kind, key, res, period), [0, 0, 0])
                for i, amount in enumerate(amounts):
                    total[i] += amount
    return {key: Totals(*values) for key, values in sums.items() if any(values)}


def stored_totals(db: sqlite3.Connection) -> dict[tuple[str, str, str, str], Totals]:
    rows = db.execute(
        "SELECT scope_kind, scope_key, resource, period, posted, pending, granted FROM usage"
        " WHERE posted <> 0 OR pending <> 0 OR granted <> 0"
    ).fetchall()
    return {(row[0], row[1], row[2], row[3]): Totals(row[4], row[5], row[6]) for row in rows}


def rebuild_totals(db: sqlite3.Connection) -> None:
    """Replace every running total with what the ledger's lines add up to."""
    db.execute("DELETE FROM usage")
    db.executemany(
        "INSERT INTO usage (scope_kind, scope_key, resource, period, posted, pending, granted)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(*key, t.posted, t.pending, t.granted) for key, t in totals_from_ledger(db).items()],
    )


def totals_differences(db: sqlite3.Connection) -> list[TotalsDifference]:
    """Each running total that differs from the ledger's lines (none in a consistent database)."""
    stored, expected = stored_totals(db), totals_from_ledger(db)
    return [
        TotalsDifference(
            Scope(ScopeKind(kind), key or None),
            Resource(resource),
            period,
            stored.get((kind, key, resource, period), Totals()),
            expected.get((kind, key, resource, period), Totals()),
        )
        for kind, key, resource, period in sorted(stored.keys() | expected.keys())
        if stored.get((kind, key, resource, period)) != expected.get((kind, key, resource, period))
    ]


# ---- reads for the admin views ----


def spend_report(db: sqlite3.Connection, month: str) -> list[SpendRow]:
    """Per user and backend for one month: images made, money posted, money still pending."""
    rows = db.execute(
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
    ).fetchall()
    return [SpendRow(row["user_key"], row["backend"], row["images"], row["usd"], row["pending"]) for row in rows]


def job_ledger(db: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    return [dict(row) for row in db.execute("SELECT * FROM ledger WHERE job_id = ? ORDER BY id", (job_id,))]


def ledger_totals(db: sqlite3.Connection) -> dict[str, int]:
    """Posted amounts by resource over all time (for consistency checks and stats)."""
    rows = db.execute(
        "SELECT r.resource, COALESCE(SUM(c.amount), 0) FROM ledger r JOIN ledger c ON c.ref = r.id"
        " WHERE c.entry = 'settle' GROUP BY r.resource"
    ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


def insert_settled(
    db: sqlite3.Connection, reservations: Sequence[tuple[str, str, str | None, Reservation]], now: float
) -> None:
    """Reserve and settle at once, at the reserved amounts, (job id, user key, guild key, reservation) each: ended
    jobs written in bulk, with their running totals, in a few statements however many there are."""
    first_new = db.execute("SELECT COALESCE(MAX(id), 0) FROM ledger").fetchone()[0]
    db.executemany(
        "INSERT INTO ledger (entry, job_id, user_key, guild_key, backend, resource, amount, day, month,"
        " created_at) VALUES ('reserve', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (job_id, user_key, guild_key, r.backend.value if r.backend else None, r.resource.value, r.amount, r.day,
             r.month, now)
            for job_id, user_key, guild_key, r in reservations
        ],
    )  # fmt: skip
    db.execute(
        "INSERT INTO ledger (entry, ref, job_id, user_key, guild_key, backend, resource, amount, day, month,"
        " reason, created_at) SELECT 'settle', id, job_id, user_key, guild_key, backend, resource, amount,"
        " day, month, 'done', created_at FROM ledger WHERE id > ? AND entry = 'reserve'",
        (first_new,),
    )
    sums: dict[tuple[str, str, str, str], int] = {}
    for _, user_key, guild_key, r in reservations:
        for kind, key, resource, period, *_ in _deltas(user_key, guild_key, r.resource, r.day, r.month, Totals()):
            sums[(kind, key, resource, period)] = sums.get((kind, key, resource, period), 0) + r.amount
    db.executemany(_ADD_TO_TOTALS, [(*key, amount, 0, 0) for key, amount in sums.items()])
