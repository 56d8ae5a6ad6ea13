"""The bot's systemd watchdog: pings gated on the event loop and the database.

`Notifier` and `watchdog_interval_s` (the sd_notify protocol itself) are the engine's, shared with the worker units,
and offered by engine.service; they are re-exported here for the bot's callers.

`watchdog_loop` pings only after a cheap database round trip succeeds, and it runs on the event loop itself, so a
blocked loop or a database that does not answer sends nothing, and systemd restarts the unit after WatchdogSec.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from engine.service import Notifier, watchdog_interval_s

__all__ = ["Notifier", "watchdog_interval_s", "watchdog_loop"]

log = logging.getLogger(__name__)


class _Heartbeat(Protocol):
    async def heartbeat(self) -> None: ...


async def watchdog_loop(notifier: Notifier, engine: _Heartbeat, interval_s: float) -> None:
    """Until cancelled: every `interval_s`, ping the watchdog if a database SELECT answers within `interval_s`.

    The loop runs on the event loop, so while the loop is blocked nothing is sent; a database error or a timeout
    skips the ping (and says why in STATUS) rather than ending the loop.
    """
    healthy = True
    while True:
        try:
            await asyncio.wait_for(engine.heartbeat(), timeout=interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure means "the database does not answer": no ping this round
            if healthy:
                log.warning("watchdog: database round trip failed (%s); not pinging", exc or type(exc).__name__)
                notifier.status(f"database not answering: {exc or type(exc).__name__}")
            healthy = False
        else:
            if not healthy:
                log.info("watchdog: database answers again")
                notifier.status("serving")
            healthy = True
            notifier.watchdog()
        await asyncio.sleep(interval_s)
