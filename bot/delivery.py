"""Delivery helpers shared by the chat front-ends: throttled progress edits and repeating a job's options."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from engine.models import Job


class ThrottledEditor:
    """Sends at most one progress edit per interval and always the latest one; older pending states are dropped."""

    def __init__(self, send: Callable[[str, bytes | None], Awaitable[None]], interval_s: float) -> None:
        self._send = send
        self._interval_s = interval_s
        self._latest: tuple[str, bytes | None] | None = None
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="discord progress edits")

    def update(self, text: str, preview: bytes | None) -> None:
        self._latest = (text, preview)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            latest, self._latest = self._latest, None
            if latest is not None:
                async with self._sending:
                    await self._send(*latest)
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """Stop after the edit in flight (so it cannot land on top of the final message); drop what is pending."""
        async with self._sending:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def same_options(job: Job, seed: str | None) -> dict[str, str]:
    """The options of an earlier job, for Reroll, Vary and Edit prompt (which change only the seed or prompt)."""
    r = job.request
    options = {"model": r.model, "aspect": r.aspect_ratio, "steps": str(r.steps), "mode": r.mode.value}
    if r.guidance is not None:
        options["guidance"] = str(r.guidance)
    if seed is not None:
        options["seed"] = seed
    return options
