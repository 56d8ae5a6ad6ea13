"""An in-process backend whose behaviour each test scripts: the stand-in for a GPU in engine tests.

It implements the real Backend protocol, so the scheduler, quota and service code under test run unchanged; only
the image making is replaced. A `gate` holds jobs mid-generation so a test can stop the engine while jobs run.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field

from PIL import Image

from engine.backends.base import Requeue, Resumption, Unresumable
from engine.config import ModelSettings, StyleSettings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    Finished,
    Progress,
    ResolvedRequest,
    Started,
)


def tiny_png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


Plan = Callable[[BackendJob, int], list[BackendEvent] | None]
"""Given the job and how many times this backend has seen it, the events to yield (None: the default success)."""


@dataclass
class ScriptedBackend:
    kind: BackendKind = BackendKind.LOCAL
    slots: int = 1
    healthy: bool = True
    seconds_per_job: float = 2.0
    steps: int = 3
    plan: Plan | None = None
    gate: asyncio.Event | None = None  # when set (not None), each job waits for it after its first progress step
    seen: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    started: list[str] = field(default_factory=list)
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    styles: tuple[str, ...] = ()  # the LoRA styles its "workers" have loaded, as a supervisor reports them
    reloaded: list[tuple[str, ...]] = field(default_factory=list)  # the style names of each reload_styles

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return model.local if self.kind is BackendKind.LOCAL else model.api_endpoint is not None

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        waves = (queued_ahead + self.in_flight) / self.slots
        return BackendStatus(
            kind=self.kind,
            healthy=self.healthy,
            wait_s=self.seconds_per_job * waves,
            run_s=self.seconds_per_job,
            ahead=queued_ahead,
            in_flight=self.in_flight,
            capacity=self.slots,
        )

    def capacity(self) -> int:
        return self.slots

    def style_slots(self) -> list[tuple[str, int, tuple[str, ...]]]:
        return [("scripted workers", self.slots, self.styles)]

    async def reload_styles(self, styles: Mapping[str, StyleSettings]) -> None:
        self.styles = tuple(name for name, style in styles.items() if style.gpu_only)
        self.reloaded.append(tuple(styles))

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        return self.seconds_per_job

    async def start(self) -> None:
        return None

    def detach(self) -> None:
        return None  # nothing it runs outlives this process

    async def close(self) -> None:
        return None

    def resume(self, job: BackendJob) -> Resumption:
        """As the real backends do: a GPU job starts over; an API job follows its stored task with the script."""
        if self.kind is BackendKind.LOCAL:
            return Requeue("queued again after a restart")
        if job.resume is None:
            return Unresumable("flux-bot stopped before the API confirmed this job")
        return self.run(job)

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        attempt = self.seen.get(job.job_id, 0) + 1
        self.seen[job.job_id] = attempt
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.append(job.job_id)
        self.started_event.set()
        try:
            yield Started(self.kind)
            scripted = self.plan(job, attempt) if self.plan else None
            if scripted is not None:
                for event in scripted:
                    await asyncio.sleep(0)
                    yield event
                if self.gate is not None and not isinstance(scripted[-1], (Finished, Failed)):
                    await self.gate.wait()  # a script with no result hangs here, as a stuck generation would
                return
            for step in range(1, self.steps + 1):
                yield Progress(step, self.steps)
                if step == 1 and self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(0)
            cost = 40_000 if self.kind is BackendKind.API else 0
            yield Finished(tiny_png(), "image/png", job.request.seed, cost_micros=cost, gpu_ms=1500)
        finally:
            self.in_flight -= 1


def fail(reason: FailureReason, charged: int = 0, retryable: bool = True) -> list[BackendEvent]:
    return [Failed(reason, f"scripted {reason.value}", charged_micros=charged, retryable=retryable)]
