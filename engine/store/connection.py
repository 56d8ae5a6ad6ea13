"""The one aiosqlite connection of a process, and the only use of aiosqlite's internals.

Every store method runs its whole body as one function on the connection's thread (one hand-over, not one per
statement); an asyncio lock makes the transactions take turns inside the process and `BEGIN IMMEDIATE` makes each
exclusive against other processes (the admin CLI) on the same file, so a reserve that reads usage and writes a
reservation can never interleave with another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")


class Connection:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA synchronous=NORMAL")
        # Room for the indexes a submit touches once a month holds a million ledger lines (the default is 2 MiB).
        await db.execute("PRAGMA cache_size=-65536")
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread: one hand-over, however many statements `fn` runs.

        Each hand-over to aiosqlite's thread and back costs far more than a small statement, so every method runs
        its whole body this way rather than awaiting statement by statement. aiosqlite offers no public call for
        it, so this is the one place that uses its private `Connection._execute` and `_conn` (aiosqlite 0.22): an
        upgrade that changes them breaks here, and every test that opens a Store shows it.
        """
        connection = self._db._conn  # as aiosqlite's own calls do: a closed one raises "no active connection"
        run: Callable[[Callable[[], T]], Awaitable[T]] = self._db._execute
        return await run(lambda: fn(connection))

    async def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run `body` in one transaction: BEGIN IMMEDIATE, body, COMMIT (ROLLBACK on any error), one hand-over.

        A caller cancelled while it waits does not stop the function on the thread (nothing can): it still runs to
        its COMMIT or ROLLBACK, before whatever is handed over next, so a transaction is never left open, and no
        statement of another caller ever runs inside it. The lock hands transactions over one at a time, so a
        read (which needs no lock) waits behind one transaction at most, not behind a line of them.
        """
        async with self._lock:
            return await self.on_thread(partial(in_transaction, body))

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        # No lock: a read is one function on the same thread as every whole transaction, so it never sees half of one.
        return await self.on_thread(lambda db: db.execute(sql, params).fetchall())


def in_transaction(body: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = body(db)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.OperationalError):  # a failed COMMIT may have ended it already
            db.execute("ROLLBACK")
        raise
    return result
