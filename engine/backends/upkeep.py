"""What backends that run work in the background share: their tasks, and the measured time of each job shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from engine.config import ModelSettings
from engine.models import ResolvedRequest

log = logging.getLogger(__name__)

EMA_WEIGHT = 0.3  # weight of the newest measurement in the moving average of seconds per job shape
# A first guess per step, before a model's own configured guess or anything is measured.
DEFAULT_SECONDS_PER_STEP: float = ModelSettings.model_fields["local_seconds_per_step"].default


class Tasks:
    """Background tasks kept referenced until they end (asyncio keeps only weak references), each failure logged."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task failed", self._owner, exc_info=task.exception())


Shape = tuple[str, str, int, int]


def shape_of(request: ResolvedRequest) -> Shape:
    """What a job's time depends on: its model, its style (LoRA adapters add their layers' work), its pixels and
    its steps."""
    return request.model, request.style or "", request.width * request.height, request.steps


class JobTimes:
    """The moving average of measured seconds per job shape."""

    def __init__(self) -> None:
        self._seconds: dict[Shape, float] = {}

    def get(self, request: ResolvedRequest) -> float | None:
        return self._seconds.get(shape_of(request))

    def add(self, request: ResolvedRequest, seconds: float) -> None:
        shape = shape_of(request)
        previous = self._seconds.get(shape)
        self._seconds[shape] = seconds if previous is None else previous + EMA_WEIGHT * (seconds - previous)
