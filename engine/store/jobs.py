"""The jobs table's SQL: rows to and from `Job`, the queue's reads.

Every function runs on the connection's thread inside the caller's transaction or read.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from engine.models import (
    BackendKind,
    FailureReason,
    Job,
    JobState,
    Mode,
    Platform,
    Requester,
    ResolvedRequest,
    ResumeToken,
    Review,
    Task,
)

JOB_COLUMNS = (
    "id, user_key, guild_key, platform, user_id, guild_id, channel_id, display_name, roles, is_admin, prompt, model,"
    " width, height, aspect_ratio, steps, guidance, seed, mode, input_image, state, backend, reason, attempts,"
    " local_attempts, estimated_cost_micros, estimated_gpu_ms, resume_token, created_at,"
    " started_at, finished_at, failure_reason, error, cost_micros, result_path, delivered, task, strength,"
    " review, review_reason, review_detail, age_restricted, taken_down, style, styled_prompt"
)


def job_from_row(row: sqlite3.Row) -> Job:
    requester = Requester(
        platform=Platform(row["platform"]),
        user_id=row["user_id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        roles=tuple(json.loads(row["roles"])),
        is_admin=bool(row["is_admin"]),
        display_name=row["display_name"],
        age_restricted=bool(row["age_restricted"]),
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
        task=Task(row["task"]),
        input_image=row["input_image"],
        strength=row["strength"],
        style=row["style"],
        styled_prompt=row["styled_prompt"],
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
        review=Review(row["review"]),
        review_reason=row["review_reason"],
        review_detail=row["review_detail"],
        taken_down=row["taken_down"],
    )


INSERT_JOB = f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 45)})"


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
        r.input_image,
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
        r.task.value,
        r.strength,
        Review.NONE.value,
        None,
        None,
        int(requester.age_restricted),
        None,
        r.style,
        r.styled_prompt,
    )


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the dispatcher's fair pick needs of a queued job (the queue comes oldest first)."""

    id: str
    user_key: str


@dataclass(frozen=True, slots=True)
class StoredResult:
    job_id: str
    path: str
    finished_at: float


def count_active(db: sqlite3.Connection, user_key: str) -> int:
    """The user's jobs that are queued or running."""
    row = db.execute(
        "SELECT COUNT(*) FROM jobs WHERE user_key = ? AND state IN ('queued','running')", (user_key,)
    ).fetchone()
    return int(row[0])


def is_active(db: sqlite3.Connection, job_id: str) -> bool:
    """Queued or running: not yet in a terminal state."""
    row = db.execute("SELECT 1 FROM jobs WHERE id = ? AND state IN ('queued','running')", (job_id,)).fetchone()
    return row is not None


def finish(
    db: sqlite3.Connection,
    job_id: str,
    state: JobState,
    now: float,
    failure_reason: FailureReason | None,
    error: str | None,
    result_path: str | None,
    review: Review = Review.NONE,
    review_reason: str | None = None,
    review_detail: str | None = None,
) -> bool:
    """A non-terminal job to its terminal state, its cost what its settle lines of money add up to (so the caller
    closes its reservations first), held for review where `review` says so; False (nothing changed) when it had
    already ended."""
    cursor = db.execute(
        "UPDATE jobs SET state = ?, finished_at = ?, failure_reason = ?, error = ?, result_path = ?,"
        " review = ?, review_reason = ?, review_detail = ?,"
        " cost_micros = (SELECT COALESCE(SUM(amount), 0) FROM ledger"
        " WHERE job_id = jobs.id AND entry = 'settle' AND resource = 'usd_micros')"
        " WHERE id = ? AND state IN ('queued','running')",
        (
            state.value,
            now,
            failure_reason.value if failure_reason else None,
            error,
            result_path,
            review.value,
            review_reason,
            review_detail,
            job_id,
        ),
    )
    return cursor.rowcount == 1
