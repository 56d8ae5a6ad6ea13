"""The GPU pool: one lane over its members, with their capacity, health and load combined, and tokens kept apart."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.backends.base import Backend, Requeue, Resumption, Unresumable
from engine.backends.gpu_probe import GpuReading
from engine.backends.local.supervisor import WorkerInfo
from engine.backends.pool import GpuPool, Member
from engine.config import Secrets, Settings
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    Finished,
    Mode,
    ResolvedRequest,
    ResumeToken,
    Submitted,
)
from engine.telemetry import WorkerPool
from tests.fakes.backends import ScriptedBackend

MODELS = Settings().models


def request(model: str = "schnell") -> ResolvedRequest:
    return ResolvedRequest("a lamp", model, 1024, 1024, "1:1", 4, None, 1, Mode.RELAX)


@dataclass
class _Supervised(ScriptedBackend):
    """A member that also reports worker processes and GPUs, as the in-host supervisor does."""

    recycled: int = 0
    infos: list[WorkerInfo] = field(default_factory=list)
    readings: list[GpuReading] = field(default_factory=list)

    @property
    def recycles(self) -> int:
        return self.recycled

    def workers(self) -> list[WorkerInfo]:
        return self.infos

    def gpu_readings(self) -> list[GpuReading]:
        return self.readings


@dataclass
class _Remote(ScriptedBackend):
    """A member that hands jobs to something remote: it yields a token, and `resume` continues from one."""

    resumed: list[ResumeToken | None] = field(default_factory=list)

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        yield Submitted(ResumeToken('{"sequence":7}', 0, "nothing is billed"))
        async with aclosing(super().run(job)) as events:
            async for event in events:
                yield event

    def resume(self, job: BackendJob) -> Resumption:
        self.resumed.append(job.resume)
        return super().run(job)


async def events_of(generator: AsyncGenerator[BackendEvent, None]) -> list[BackendEvent]:
    async with aclosing(generator) as events:
        return [event async for event in events]


def test_one_member_is_the_lane_as_it_is() -> None:
    member = ScriptedBackend(slots=2, seconds_per_job=3.0)
    pool = GpuPool([Member("in-host", member)], MODELS)
    assert isinstance(pool, Backend) and pool.kind is BackendKind.LOCAL
    assert pool.capacity() == 2
    assert pool.status(4, request()) == member.status(4, request())
    assert pool.estimate_seconds(request()) == 3.0
    assert pool.supports("schnell", MODELS["schnell"]) and not pool.supports("pro", MODELS["pro"])


def test_capacity_and_status_combine_the_members() -> None:
    fast = ScriptedBackend(slots=2, seconds_per_job=2.0)
    slow = ScriptedBackend(slots=3, seconds_per_job=5.0)
    broken = ScriptedBackend(slots=4, healthy=False)
    pool = GpuPool([Member("a", fast), Member("b", slow), Member("c", broken)], MODELS)
    assert pool.capacity() == 9
    status = pool.status(10, request())
    assert isinstance(status, BackendStatus) and status.healthy
    # Only healthy members' slots serve; a job takes their times weighted by their slots (it goes to a free slot,
    # not to the fastest one).
    assert (status.capacity, status.ahead) == (5, 10)
    assert status.run_s == pytest.approx((2 * 2.0 + 3 * 5.0) / 5)
    assert status.wait_s == pytest.approx(status.run_s * 10 / 5)
    assert status.detail.startswith("a: ") and "; c: " in status.detail
    assert not GpuPool([Member("c", broken)], MODELS).status(0).healthy
    assert not GpuPool([Member("b", broken), Member("c", broken)], MODELS).status(0).healthy


async def test_a_job_goes_to_the_healthy_member_with_the_most_free_slots() -> None:
    small, large, down = ScriptedBackend(slots=1), ScriptedBackend(slots=3), ScriptedBackend(slots=8, healthy=False)
    pool = GpuPool([Member("small", small), Member("large", large), Member("down", down)], MODELS)
    events = await events_of(pool.run(BackendJob("j1", request())))
    assert isinstance(events[-1], Finished)
    assert (small.started, large.started, down.started) == ([], ["j1"], [])


async def test_a_model_no_member_serves_fails_at_once() -> None:
    pool = GpuPool([Member("in-host", ScriptedBackend())], MODELS)
    (failed,) = await events_of(pool.run(BackendJob("j1", request("pro"))))
    assert isinstance(failed, Failed) and "no GPU worker serves 'pro'" in failed.detail


async def test_a_members_token_comes_back_to_that_member() -> None:
    local, remote = ScriptedBackend(), _Remote()
    pool = GpuPool([Member("in-host", local), Member("gpu-host-1", remote)], MODELS)
    local.healthy = False  # so the job goes to the remote member
    events = await events_of(pool.run(BackendJob("j1", request())))
    submitted = events[0]
    assert isinstance(submitted, Submitted) and isinstance(events[-1], Finished)
    assert submitted.resume.billing == "nothing is billed"  # the billing fields stay readable to the scheduler
    resumed = pool.resume(BackendJob("j1", request(), resume=submitted.resume))
    assert not isinstance(resumed, Requeue | Unresumable)
    assert isinstance((await events_of(resumed))[-1], Finished)
    assert remote.resumed == [ResumeToken('{"sequence":7}', 0, "nothing is billed")]  # unwrapped again


def test_a_job_without_a_token_or_with_a_foreign_one_is_answered_by_the_pool() -> None:
    pool = GpuPool([Member("in-host", ScriptedBackend())], MODELS)
    assert isinstance(pool.resume(BackendJob("j1", request())), Requeue)
    gone = ResumeToken('{"member":"gpu-host-9","state":{}}', 0, "")
    answer = pool.resume(BackendJob("j1", request(), resume=gone))
    assert isinstance(answer, Unresumable) and "'gpu-host-9'" in answer.reason
    garbage = pool.resume(BackendJob("j1", request(), resume=ResumeToken('{"sequence":7}')))
    assert isinstance(garbage, Unresumable) and "cannot be read" in garbage.reason


def test_operators_see_the_supervised_members_workers() -> None:
    worker = WorkerInfo(0, 123, "cuda:0", 4, False, 900.0, 950.0)
    reading = GpuReading(0, 61, 30 << 30, 80 << 30)
    supervised = _Supervised(recycled=2, infos=[worker], readings=[reading])
    pool = GpuPool([Member("in-host", supervised), Member("remote", ScriptedBackend())], MODELS)
    assert isinstance(pool, WorkerPool)  # what telemetry reads the GPU lane's workers through
    assert (pool.recycles, pool.workers(), pool.gpu_readings()) == (2, [worker], [reading])


def test_members_need_distinct_names() -> None:
    with pytest.raises(ValueError, match="distinct"):
        GpuPool([Member("a", ScriptedBackend()), Member("a", ScriptedBackend())], MODELS)
    with pytest.raises(ValueError, match="at least one"):
        GpuPool([], MODELS)


async def test_the_factory_builds_the_gpu_lane_as_a_pool_over_the_in_host_supervisor(tmp_path: Path) -> None:
    from engine.backends.factory import IN_HOST, build_backends
    from engine.backends.local.supervisor import LocalBackend

    settings = Settings.model_validate(
        {"bot": {"state_dir": str(tmp_path)}, "local": {"model": str(tmp_path / "weights"), "device": "cpu"}}
    )
    backends, demo = await build_backends(settings, Secrets())  # built, not started: no worker process runs
    lane = backends[BackendKind.LOCAL]
    assert isinstance(lane, GpuPool) and not demo
    assert [(member.name, type(member.backend)) for member in lane.members] == [(IN_HOST, LocalBackend)]
    assert lane.capacity() == 1
