"""The contract between the scheduler and whatever makes images.

A backend knows nothing of queues, users or money rules: it is handed one `BackendJob` at a time and yields
`BackendEvent`s, always ending with exactly one `Finished` or `Failed`. It never raises for a failed generation;
an exception out of `run` is a bug, and the scheduler turns it into `Failed(INTERNAL)` with the job id logged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

from engine.config import ModelSettings
from engine.models import BackendEvent, BackendJob, BackendKind, BackendStatus, ResolvedRequest


@runtime_checkable
class Backend(Protocol):
    kind: BackendKind

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        """Can this backend make images with this model at all (capability, not load)?"""
        ...

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        """Health and load now; `eta_s` for a new job of this shape with `queued_ahead` jobs before it."""
        ...

    def capacity(self) -> int:
        """How many jobs the scheduler may hand over at once."""
        ...

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        """Expected generation time of one job, from measurements where there are any."""
        ...

    def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        """Make the image. Cancelling the consuming task cancels the work."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
