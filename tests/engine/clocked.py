"""Jobs at chosen times with chosen outcomes, through the real engine: for tests of what happens across days and hours
(the admin report, the alerts).

A fake clock is the engine's clock; each job is submitted at a given moment and the scripted backend moves the clock
on by the job's latency while it "runs", so created_at, finished_at and the ledger's day and month columns are what
they would have been. Jobs run one at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from engine.config import Secrets, Settings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    FailureReason,
    Finished,
    ImageRequest,
    JobEvent,
    Mode,
    Progress,
)
from engine.service import Engine
from engine.store import Store
from tests.conftest import user, wait_terminal
from tests.fakes.backends import ScriptedBackend, fail, tiny_png


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Outcome:
    latency_s: float = 1.0
    failure: FailureReason | None = None  # ends the job (never retried or rerouted)
    charged_micros: int = 0  # what the provider bills for the failure
    cost_micros: int = 0  # what a finished job costs (API jobs)
    hang: bool = False  # never finishes: for cancelling


@dataclass
class ClockedJobs:
    clock: Clock = field(default_factory=Clock)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    engines: list[Engine] = field(default_factory=list)
    backends: dict[BackendKind, ScriptedBackend] = field(default_factory=dict)

    def plan(self, job: BackendJob, attempt: int) -> list[BackendEvent]:
        outcome = self.outcomes[job.job_id]
        self.clock.now += outcome.latency_s
        if outcome.hang:
            return [Progress(1, 2)]  # no result: the backend's gate holds it until it is cancelled
        if outcome.failure is not None:
            return fail(outcome.failure, charged=outcome.charged_micros, retryable=False)
        return [Finished(tiny_png(), "image/png", job.request.seed, cost_micros=outcome.cost_micros, gpu_ms=1000)]

    async def open(self, settings: Settings) -> Engine:
        """A started engine on the settings' database (a second call on the same settings is a restart)."""
        # The gate is never opened: it only holds the jobs whose outcome is to hang.
        self.backends = {kind: ScriptedBackend(kind, plan=self.plan, gate=asyncio.Event()) for kind in BackendKind}
        store = await Store.open(settings.bot.database_path)
        engine = Engine(settings, Secrets(), store, self.backends, clock=self.clock)
        await engine.start()
        self.engines.append(engine)
        return engine

    async def submit(self, engine: Engine, at: datetime, model: str, outcome: Outcome, name: str = "alice") -> str:
        """Submit at `at`; schnell runs locally, any other model on the API. Returns the job id."""
        self.clock.now = at.timestamp()
        mode = Mode.RELAX if model == "schnell" else Mode.FAST
        queued = await engine.submit(user(name), ImageRequest(f"a cat for {name}", model, mode=mode))
        self.outcomes[queued.job_id] = outcome  # before any await: the backend reads it once the job is dispatched
        return queued.job_id

    async def run(self, engine: Engine, at: datetime, model: str, outcome: Outcome, name: str = "alice") -> JobEvent:
        """Submit at `at` and wait for the job's end; its terminal event."""
        return await wait_terminal(engine, await self.submit(engine, at, model, outcome, name))

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()
