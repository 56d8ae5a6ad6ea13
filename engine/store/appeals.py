"""The SQL of appeals: a refused prompt kept with its request, then appealed, allowed or denied."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict

from engine.models import Appeal, AppealState, ImageRequest, Mode, Platform, Requester, Task

APPEAL_COLUMNS = "id, requester, request, input_image, rule, matched, state, created_at, decided_by, reason, job_id"


def insert(db: sqlite3.Connection, appeal: Appeal) -> None:
    requester = asdict(appeal.requester)
    requester["platform"] = appeal.requester.platform.value
    request = asdict(appeal.request)
    del request["input_image"]  # bytes: the image is stored by content, its hash in input_image
    db.execute(
        f"INSERT INTO appeals (user_key, {APPEAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            appeal.requester.user_key,
            appeal.id,
            json.dumps(requester),
            json.dumps(request),
            appeal.input_image,
            appeal.rule,
            appeal.matched,
            appeal.state.value,
            appeal.created_at,
            appeal.decided_by,
            appeal.reason,
            appeal.job_id,
        ),
    )


def appeal_from_row(row: sqlite3.Row) -> Appeal:
    requester = json.loads(row["requester"])
    requester["platform"] = Platform(requester["platform"])
    requester["roles"] = tuple(requester["roles"])
    request = json.loads(row["request"])
    request["mode"] = Mode(request["mode"])
    request["task"] = Task(request["task"])
    return Appeal(
        id=row["id"],
        requester=Requester(**requester),
        request=ImageRequest(**request),
        rule=row["rule"],
        matched=row["matched"],
        state=AppealState(row["state"]),
        created_at=row["created_at"],
        input_image=row["input_image"],
        decided_by=row["decided_by"],
        reason=row["reason"],
        job_id=row["job_id"],
    )


def move(
    db: sqlite3.Connection,
    appeal_id: str,
    before: AppealState,
    after: AppealState,
    *,
    decided_by: str | None = None,
    reason: str | None = None,
    job_id: str | None = None,
) -> bool:
    """The appeal from `before` to `after`; False when it was not in `before` (decided meanwhile)."""
    cursor = db.execute(
        "UPDATE appeals SET state = ?, decided_by = COALESCE(?, decided_by), reason = COALESCE(?, reason),"
        " job_id = COALESCE(?, job_id) WHERE id = ? AND state = ?",
        (after.value, decided_by, reason, job_id, appeal_id, before.value),
    )
    return cursor.rowcount == 1
