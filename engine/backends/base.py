"""The contract between the scheduler and whatever makes images.

A backend knows nothing of queues, users or money rules: it is handed one `BackendJob` at a time and yields
`BackendEvent`s, always ending with exactly one `Finished` or `Failed`. It never raises for a failed generation;
an exception out of `run` is a bug, and the scheduler turns it into `Failed(INTERNAL)` with the job id logged.

A backend that hands a job to something remote (the BFL API, a GPU host) yields `Submitted` with a resume token
before it waits, and the scheduler stores that token with the job. After a restart, `resume` continues such a job
from its token: the scheduler asks each job's backend and has no case of its own for any of them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from engine.config import ModelSettings
from engine.models import BackendEvent, BackendJob, BackendKind, BackendStatus, ResolvedRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Requeue:
    """`resume`'s answer for a job that nothing outside this process held: it is queued again, from the start,
    while the job's local retries last (a GPU job that a restart cut off)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unresumable:
    """`resume`'s answer for a job that may have reached something remote which cannot be followed any more: it
    fails, and what its resume token says the remote bills is posted."""

    reason: str


# What `resume` gives back: the events of the continued job, or one of the two answers above.
Resumption = AsyncGenerator[BackendEvent, None] | Requeue | Unresumable


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

    def resume(self, job: BackendJob) -> Resumption:
        """Continue a job that an earlier process left running here; `job.resume` is the token it stored, if any.

        The events continue the job as `run`'s would (never submitting it to a remote a second time)."""
        ...

    async def start(self) -> None: ...

    def detach(self) -> None:
        """The scheduler is stopping and abandons the jobs running here, for the next start to resume: work
        handed to something remote is left running (not cancelled) when their event streams close from now on."""
        ...

    async def close(self) -> None: ...
