"""The schema: its migrations, applied in order at open, each once, each in one transaction.

A migration is a SQL script or, where the data must be computed with the code's own rules, a function on the
connection. A released migration is never edited: a change of schema is a new one at the end.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from engine.errors import ConfigError
from engine.store.ledger import rebuild_totals

log = logging.getLogger(__name__)

Migration = str | Callable[[sqlite3.Connection], None]


def _running_totals(db: sqlite3.Connection) -> None:
    """5: running totals per (scope, resource, period), kept in the same transactions as the ledger's lines, so a
    limit check reads one row instead of summing the month; filled here from the ledger as it stands."""
    for statement in statements(USAGE_TABLE):
        db.execute(statement)
    rebuild_totals(db)


USAGE_TABLE = """
    CREATE TABLE usage (
        scope_kind TEXT NOT NULL CHECK (scope_kind IN ('user','guild','global')),
        scope_key  TEXT NOT NULL,  -- the user or guild key; '' for global
        resource   TEXT NOT NULL CHECK (resource IN ('images','gpu_ms','usd_micros')),
        period     TEXT NOT NULL,  -- '2026-11-26' for a resource counted per day, '2026-11' per month
        posted     INTEGER NOT NULL DEFAULT 0,  -- settled lines, at their settled amounts
        pending    INTEGER NOT NULL DEFAULT 0,  -- open reservations
        granted    INTEGER NOT NULL DEFAULT 0,  -- an admin's grants (user scopes only)
        PRIMARY KEY (scope_kind, scope_key, resource, period)
    ) WITHOUT ROWID;
"""

MIGRATIONS: tuple[Migration, ...] = (
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
    _running_totals,
    # 6: image input: what the job makes of its input (generate, edit, vary), the input by its sha256 (a chat URL
    # expires and was never filled), and a variation's strength
    """
    ALTER TABLE jobs RENAME COLUMN input_image_url TO input_image;
    ALTER TABLE jobs ADD COLUMN task TEXT NOT NULL DEFAULT 'generate' CHECK (task IN ('generate','edit','vary'));
    ALTER TABLE jobs ADD COLUMN strength REAL;
    UPDATE jobs SET input_image = NULL;
    """,
    # 7: the review step: a done job's image may be held for an admin, then approved or rejected
    """
    ALTER TABLE jobs ADD COLUMN review TEXT NOT NULL DEFAULT '' CHECK (review IN ('','held','approved','rejected'));
    ALTER TABLE jobs ADD COLUMN review_reason TEXT;  -- in general terms, for the requester
    ALTER TABLE jobs ADD COLUMN review_detail TEXT;  -- for the admins: the phrase, the labels and their scores
    CREATE INDEX jobs_held ON jobs (finished_at) WHERE review = 'held';
    """,
    # 8: whether the job was asked for in an age-restricted channel, which the review step reads when it ends
    """
    ALTER TABLE jobs ADD COLUMN age_restricted INTEGER NOT NULL DEFAULT 0;
    """,
    # 9: every place a result was posted (for a take-down), and a taken-down job's reason
    """
    CREATE TABLE postings (
        id         INTEGER PRIMARY KEY,
        job_id     TEXT NOT NULL REFERENCES jobs(id),
        platform   TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        message_id TEXT,  -- Discord: the message id; Slack: the message ts
        file_id    TEXT,  -- Slack: the uploaded file's id
        posted_at  REAL NOT NULL
    );
    CREATE INDEX postings_by_job ON postings (job_id);
    ALTER TABLE jobs ADD COLUMN taken_down TEXT;  -- the reason, once an admin took the image down everywhere
    """,
    # 10: the style a job runs with, and the text its template made of the prompt (the model's input)
    """
    ALTER TABLE jobs ADD COLUMN style TEXT;
    ALTER TABLE jobs ADD COLUMN styled_prompt TEXT NOT NULL DEFAULT '';
    """,
    # 11: prompts the policy refused that their requester may appeal to an admin
    """
    CREATE TABLE appeals (
        id          TEXT PRIMARY KEY,
        user_key    TEXT NOT NULL,
        requester   TEXT NOT NULL,  -- JSON: platform, ids, roles, display name, age-restricted channel
        request     TEXT NOT NULL,  -- JSON: the ImageRequest's options as asked (no image bytes)
        input_image TEXT,           -- the sha256 of its stored input image, if any
        rule        TEXT NOT NULL,
        matched     TEXT,
        state       TEXT NOT NULL CHECK (state IN ('refused','pending','allowed','denied')),
        created_at  REAL NOT NULL,
        decided_by  TEXT,
        reason      TEXT,
        job_id      TEXT
    );
    CREATE INDEX appeals_pending ON appeals (created_at) WHERE state = 'pending';
    """,
)


def statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which contain ';') whole."""
    found, current = [], []
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if not stripped.strip():
            continue
        current.append(stripped)
        text = " ".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            found.append(text)
            current = []
    return found


def migrate(db: sqlite3.Connection, path: Path) -> list[int]:
    """Apply the migrations this database has not had (inside the caller's transaction); the versions applied."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] if row and row[0] is not None else 0
    if current > len(MIGRATIONS):
        raise ConfigError(str(path), "schema version", f"{current} is newer than this flux-bot knows: upgrade flux-bot")
    applied = []
    for version, migration in enumerate(MIGRATIONS[current:], start=current + 1):
        if isinstance(migration, str):
            for statement in statements(migration):
                db.execute(statement)
        else:
            migration(db)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        applied.append(version)
    return applied
