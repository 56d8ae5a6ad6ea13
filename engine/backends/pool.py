"""The GPU lane as one Backend: every GPU worker, whoever runs it, behind the one lane the router and scheduler see.

A member is a Backend with a name: the in-host supervisor (engine/backends/local/) and the GPU hosts on NATS
(engine/backends/nats.py). The pool's capacity is the members' live slots together, its status their health and
load combined (healthy while any member has a live slot for the model), a job's expected time the members' measured
times weighted by their slots, and a job goes to the healthy member that serves its model and has the most free
slots. A member that hands a job
to something remote yields a resume token; the pool wraps it with the member's name, so that after a restart
`resume` asks that same member to continue it. A job with no token was held by an in-host worker process, which
the restart ended with it: it is queued again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.backends.base import Backend, Requeue, Resumption, Unresumable
from engine.config import ModelSettings, StyleSettings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    ResolvedRequest,
    ResumeToken,
    Submitted,
)

if TYPE_CHECKING:
    from engine.backends.gpu_probe import GpuReading
    from engine.backends.local.supervisor import WorkerInfo

log = logging.getLogger(__name__)


@runtime_checkable
class Supervisor(Protocol):
    """A member that runs worker processes, and reports them to operators (the in-host supervisor)."""

    @property
    def recycles(self) -> int: ...

    def workers(self) -> list[WorkerInfo]: ...

    def gpu_readings(self) -> list[GpuReading]: ...


@runtime_checkable
class ServesStyles(Protocol):
    """A member whose workers load styles' LoRA adapters (the in-host supervisor, the GPU hosts)."""

    def style_slots(self) -> list[tuple[str, int, tuple[str, ...]]]: ...

    async def reload_styles(self, styles: Mapping[str, StyleSettings]) -> None: ...


@dataclass(frozen=True, slots=True)
class Member:
    """One part of the lane: `name` is stable across restarts, since stored resume tokens name it."""

    name: str
    backend: Backend


class GpuPool:
    """Backend for BackendKind.LOCAL, the GPU lane, over its members (see the module docstring)."""

    kind = BackendKind.LOCAL

    def __init__(self, members: Sequence[Member], models: Mapping[str, ModelSettings]) -> None:
        if not members:
            raise ValueError("a GPU pool needs at least one member")
        names = [member.name for member in members]
        if len(set(names)) != len(names):
            raise ValueError(f"GPU pool members need distinct names, got {names}")
        self.members = tuple(members)
        self._models = models
        self._running = {member.name: 0 for member in members}

    # ---- the Backend protocol ----

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return any(member.backend.supports(model_name, model) for member in self.members)

    def capacity(self) -> int:
        return sum(member.backend.capacity() for member in self.members)

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        """A job's time on the lane: the members' measured times weighted by their slots, since a job goes to
        whichever member has a free slot, not to the fastest."""
        serving = self._serving(request.model) or list(self.members)
        serving = [member for member in serving if member.backend.status(0, request).healthy] or serving
        weighted = [(member.backend.capacity(), member.backend.estimate_seconds(request)) for member in serving]
        slots = sum(count for count, _ in weighted)
        if slots == 0:
            return min(seconds for _, seconds in weighted)
        return sum(count * seconds for count, seconds in weighted) / slots

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        if request is not None and not self._serving(request.model):
            model = self._models.get(request.model)
            name = model.display_name if model else request.model
            detail = f"nothing serves {name}"
            if model is not None and model.needs_input_image:
                detail = "its Kontext weights are not set up ([local] kontext_model)"
            return BackendStatus(kind=self.kind, healthy=False, ahead=queued_ahead, serves_model=False, detail=detail)
        if len(self.members) == 1:
            return self.members[0].backend.status(queued_ahead, request)
        statuses = [member.backend.status(0, request) for member in self.members]
        if not any(status.serves_model for status in statuses):  # e.g. no member has the job's style
            detail = "; ".join(status.detail for status in statuses)
            return BackendStatus(kind=self.kind, healthy=False, ahead=queued_ahead, serves_model=False, detail=detail)
        healthy = [status for status in statuses if status.healthy]
        capacity = sum(status.capacity for status in healthy) or sum(status.capacity for status in statuses)
        run_s = self.estimate_seconds(request) if request else 0.0
        return BackendStatus(
            kind=self.kind,
            healthy=bool(healthy),
            # Each member knows only its own queue: the scheduler replaces this wait with its play-forward.
            wait_s=run_s * queued_ahead / max(capacity, 1),
            run_s=run_s,
            ahead=queued_ahead,
            in_flight=sum(status.in_flight for status in statuses),
            capacity=capacity,
            detail="; ".join(
                f"{member.name}: {status.detail}" for member, status in zip(self.members, statuses, strict=True)
            ),
        )

    async def start(self) -> None:
        for member in self.members:
            await member.backend.start()

    def detach(self) -> None:
        for member in self.members:
            member.backend.detach()

    async def close(self) -> None:
        for member in self.members:
            await member.backend.close()

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        member = self._pick(job.request)
        if member is None:
            yield Failed(FailureReason.BAD_REQUEST, f"no GPU worker serves {job.request.model!r}")
            return
        async for event in self._through(member, member.backend.run(job)):
            yield event

    def resume(self, job: BackendJob) -> Resumption:
        if job.resume is None:
            return Requeue("queued again after a restart")
        try:
            name, inner = _unwrap(job.resume)
        except ValueError as exc:
            return Unresumable(f"its stored resume token cannot be read ({exc})")
        member = next((m for m in self.members if m.name == name), None)
        if member is None:
            return Unresumable(f"the GPU workers {name!r} that held this job are no longer configured")
        resumed = member.backend.resume(replace(job, resume=inner))
        if isinstance(resumed, Requeue | Unresumable):
            return resumed
        return self._through(member, resumed)

    # ---- operators' view of the members that supervise worker processes ----

    @property
    def recycles(self) -> int:
        return sum(supervisor.recycles for supervisor in self._supervisors())

    def workers(self) -> list[WorkerInfo]:
        return [worker for supervisor in self._supervisors() for worker in supervisor.workers()]

    def gpu_readings(self) -> list[GpuReading]:
        return [reading for supervisor in self._supervisors() for reading in supervisor.gpu_readings()]

    def style_slots(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """(where, slots, LoRA styles loaded there) across the members, for `/admin styles`."""
        return [slot for member in self._styled() for slot in member.style_slots()]

    async def reload_styles(self, styles: Mapping[str, StyleSettings]) -> None:
        for member in self._styled():
            await member.reload_styles(styles)

    # ---- inside ----

    def _styled(self) -> list[ServesStyles]:
        return [member.backend for member in self.members if isinstance(member.backend, ServesStyles)]

    def _serving(self, model_name: str) -> list[Member]:
        model = self._models.get(model_name)
        if model is None:
            return []
        return [member for member in self.members if member.backend.supports(model_name, model)]

    def _pick(self, request: ResolvedRequest) -> Member | None:
        """The member for a new job: healthy and serving its model, with the most free slots (the first on a tie)."""
        serving = self._serving(request.model)
        if len(serving) <= 1:
            return serving[0] if serving else None
        healthy = [member for member in serving if member.backend.status(0, request).healthy] or serving
        return max(healthy, key=lambda member: member.backend.capacity() - self._running[member.name])

    async def _through(
        self, member: Member, events: AsyncGenerator[BackendEvent, None]
    ) -> AsyncGenerator[BackendEvent, None]:
        """A member's events, counted against its slots, with its resume tokens wrapped in its name."""
        self._running[member.name] += 1
        try:
            async with aclosing(events) as member_events:
                async for event in member_events:
                    if isinstance(event, Submitted):
                        yield Submitted(_wrap(member.name, event.resume))
                    else:
                        yield event
        finally:
            self._running[member.name] -= 1

    def _supervisors(self) -> list[Supervisor]:
        return [member.backend for member in self.members if isinstance(member.backend, Supervisor)]


def _wrap(name: str, token: ResumeToken) -> ResumeToken:
    state = {"member": name, "state": json.loads(token.state)}
    return replace(token, state=json.dumps(state, separators=(",", ":")))


def _unwrap(token: ResumeToken) -> tuple[str, ResumeToken]:
    state = json.loads(token.state)
    if not isinstance(state, dict) or not isinstance(name := state.get("member"), str) or "state" not in state:
        raise ValueError(f"not a GPU pool token: {token.state[:200]!r}")
    return name, replace(token, state=json.dumps(state["state"], separators=(",", ":")))
