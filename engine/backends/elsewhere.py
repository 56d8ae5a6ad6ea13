"""The GPU lane as `flux-bot admin` sees it: served by the running bot's process, never by the CLI's own.

A job the CLI queues (an appeal an admin allows, a style's test render) is routed as any submit is, and so needs
a GPU lane to route to; the CLI starts no worker, so this stands in for the bot's lane: idle, with the configured
speed. The job is written to the database and the running bot's scheduler, which polls it, runs it there (with
the router's failover if the lane is not as assumed).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from engine.backends.base import Requeue, Resumption
from engine.config import ModelSettings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    ResolvedRequest,
)


class RunningBotsLane:
    kind = BackendKind.LOCAL

    def __init__(self, models: Mapping[str, ModelSettings]) -> None:
        self._models = dict(models)

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return model.local

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        run_s = self.estimate_seconds(request) if request else 0.0
        detail = "the running bot's GPU lane (seen from the admin CLI)"
        return BackendStatus(self.kind, healthy=True, run_s=run_s, ahead=queued_ahead, detail=detail)

    def capacity(self) -> int:
        return 0  # this process dispatches nothing

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        model = self._models.get(request.model)
        return request.steps * model.local_seconds_per_step if model else 0.0

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        yield Failed(FailureReason.INTERRUPTED, "the admin CLI runs no job: the running bot does", retryable=True)

    def resume(self, job: BackendJob) -> Resumption:
        return Requeue("the admin CLI runs no job: the running bot does")

    async def start(self) -> None:
        return None

    def detach(self) -> None:
        return None

    async def close(self) -> None:
        return None
