"""BflBackend against the fake BFL API on loopback, through the real aiohttp client.

Time is injected: `FakeTime.sleep` records each delay and moves `FakeTime.clock` forward without waiting, so
backoff, Retry-After and the total timeout are asserted exactly. Real time is spent only where a real socket
timeout is the point (a hung POST or poll), with sub-second timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
from PIL import Image

from engine.backends.base import Backend, Requeue, Unresumable
from engine.backends.bfl import BflBackend, RemoteTask, build_payload
from engine.config import BflSettings, ModelSettings
from engine.errors import BackendUnavailable, InvalidRequest
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    Failed,
    FailureReason,
    Finished,
    Mode,
    Progress,
    ResolvedRequest,
    ResumeToken,
    Started,
    Submitted,
    Task,
)
from tests.fakes.bfl_server import API_KEY, FakeBfl, Host, Reply

MODELS = {
    "dev": ModelSettings(
        display_name="FLUX.1 [dev]", api_endpoint="flux-dev", price_credits=Decimal("2.5"), default_guidance=3.0
    ),
    "pro": ModelSettings(display_name="FLUX1.1 [pro]", api_endpoint="flux-pro-1.1", price_credits=Decimal(4)),
    "ultra": ModelSettings(
        display_name="ultra", api_endpoint="flux-pro-1.1-ultra", price_credits=Decimal(6), sizing="aspect"
    ),
    "kontext": ModelSettings(display_name="Kontext", api_endpoint="flux-kontext-pro", price_credits=Decimal(4)),
    "kontext-max": ModelSettings(display_name="Kontext max", api_endpoint="flux-kontext-max", price_credits=8),
    "schnell": ModelSettings(display_name="schnell", local=True),
}
PRO_PRICE = 40_000  # 4 credits


class FakeTime:
    """An injected clock and sleep: sleeping records the delay and advances the clock at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still let other tasks run, as a real sleep would


def request(model: str = "pro", **changes: Any) -> ResolvedRequest:
    fields: dict[str, Any] = {
        "prompt": "a red fox in the snow",
        "model": model,
        "width": 1024,
        "height": 768,
        "aspect_ratio": "4:3",
        "steps": 28,
        "guidance": 3.0,
        "seed": 42,
        "mode": Mode.FAST,
    }
    fields.update(changes)
    return ResolvedRequest(**fields)


def job(model: str = "pro", *, resume: RemoteTask | None = None, **changes: Any) -> BackendJob:
    token = resume.token() if resume is not None else None
    return BackendJob(job_id="jtest0001", request=request(model, **changes), resume=token)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBfl]:
    async with FakeBfl() as server:
        yield server


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@asynccontextmanager
async def backend(
    api_url: str, time: FakeTime, *, key: str | None = API_KEY, **settings: Any
) -> AsyncIterator[BflBackend]:
    values: dict[str, Any] = {"api_url": api_url, "request_timeout_s": 5.0, "poll_interval_s": 0.5}
    values.update(settings)
    bfl = BflBackend(BflSettings(**values), MODELS, key, clock=time.clock, sleep=time.sleep)
    await bfl.start()
    try:
        yield bfl
    finally:
        await bfl.close()


async def run_job(bfl: BflBackend, backend_job: BackendJob) -> list[BackendEvent]:
    """The events of a new job, or of one resumed after a restart when it carries a resume token."""
    if backend_job.resume is None:
        job_events = bfl.run(backend_job)
    else:
        resumed = bfl.resume(backend_job)
        assert not isinstance(resumed, Requeue | Unresumable), resumed
        job_events = resumed
    async with aclosing(job_events) as events:
        return [event async for event in events]


def only_failure(events: list[BackendEvent]) -> Failed:
    assert isinstance(events[-1], Failed), events
    assert sum(isinstance(e, Failed | Finished) for e in events) == 1
    return events[-1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- the happy path ----


async def test_events_in_order_with_cost_image_and_headers(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls = 2
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job("pro"))

    submitted, started, finished = events[0], events[1], events[-1]
    assert isinstance(submitted, Submitted)
    assert RemoteTask.from_token(submitted.resume).cost_micros == PRO_PRICE
    assert RemoteTask.from_token(submitted.resume).polling_url.startswith(fake.api_url + "/v1/get_result?id=")
    assert isinstance(started, Started) and started.backend is BackendKind.API
    assert isinstance(finished, Finished)
    assert (finished.mime, finished.seed, finished.cost_micros) == ("image/png", 42, PRO_PRICE)
    assert Image.open(io.BytesIO(finished.image)).size == (8, 8)

    [post] = [r for r in fake.requests if r.method == "POST"]
    assert post.path == "/v1/flux-pro-1.1" and post.had_key
    assert post.body == build_payload("flux-pro-1.1", request("pro"), BflSettings())
    assert all(p.had_key for p in fake.polls()) and len(fake.polls()) == 3
    [download] = fake.downloads()
    assert not download.had_key, "the signed result URL must not get the API key"
    assert download.host == fake.hostport("region")


async def test_progress_accepts_fractions_and_percentages(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls, fake.progress = 5, [0.1, 0.5, 0.5, 80, 1.0]
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    assert [e for e in events if isinstance(e, Progress)] == [
        Progress(10, 100),
        Progress(50, 100),
        Progress(80, 100),
        Progress(100, 100),
    ]
    assert isinstance(events[-1], Finished)


async def test_cost_missing_from_answer_falls_back_to_model_price(fake: FakeBfl, clock: FakeTime) -> None:
    fake.cost = None
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job("dev"))
    assert isinstance(events[0], Submitted) and RemoteTask.from_token(events[0].resume).cost_micros == 25_000
    assert isinstance(events[-1], Finished) and events[-1].cost_micros == 25_000


async def test_fractional_cost_is_exact(fake: FakeBfl, clock: FakeTime) -> None:
    fake.cost = "2.5"
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job("dev"))
    assert isinstance(events[-1], Finished) and events[-1].cost_micros == 25_000


async def test_mime_follows_content_type(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock, output_format="jpeg") as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished) and events[-1].mime == "image/jpeg"
    assert Image.open(io.BytesIO(events[-1].image)).format == "JPEG"


async def test_polls_only_the_returned_regional_host(fake: FakeBfl, clock: FakeTime) -> None:
    fake.poll_host, fake.pending_polls = "region", 3
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished)
    assert {p.host for p in fake.polls()} == {fake.hostport("region")}
    assert len(fake.polls()) == 4


# ---- final statuses of a task ----


@pytest.mark.parametrize("status", ["Request Moderated", "Content Moderated"])
async def test_moderated_is_final_and_free(fake: FakeBfl, clock: FakeTime, status: str) -> None:
    fake.final_status, fake.pending_polls = status, 1
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    failed = only_failure(events)
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.MODERATED, 0, False)
    assert status in failed.detail
    assert not fake.downloads()


@pytest.mark.parametrize(
    ("status", "reason"), [("Error", FailureReason.SERVER_ERROR), ("Task not found", FailureReason.TASK_NOT_FOUND)]
)
async def test_error_and_lost_task_are_retryable_and_free(
    fake: FakeBfl, clock: FakeTime, status: str, reason: FailureReason
) -> None:
    fake.final_status = status
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (reason, 0, True)


NOT_FOUND = Reply(200, {"id": "task-0001", "status": "Task not found", "result": None})


@pytest.mark.parametrize("not_found", [NOT_FOUND, Reply(404, {"detail": "Not Found"})], ids=["status", "http-404"])
async def test_task_not_found_right_after_submit_is_polled_through(
    fake: FakeBfl, clock: FakeTime, not_found: Reply
) -> None:
    # BFL's eventual consistency: the cluster that owns a new task may not know it for the first polls.
    fake.poll_script.extend([not_found] * 4)
    async with backend(fake.api_url, clock, task_not_found_grace_s=30.0) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished) and events[-1].cost_micros == PRO_PRICE
    assert len(fake.polls()) == 5
    assert fake.billed() == {"task-0001": Decimal(4)}


async def test_task_not_found_past_the_grace_window_is_lost_and_free(fake: FakeBfl, clock: FakeTime) -> None:
    fake.final_status = "Task not found"
    async with backend(fake.api_url, clock, task_not_found_grace_s=30.0) as bfl:
        started_at = clock.now
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.TASK_NOT_FOUND, 0, True)
    assert "still after 30 s of polling" in failed.detail
    assert clock.now - started_at >= 30.0
    assert fake.billed() == {}


async def test_task_not_found_until_the_total_timeout_counts_as_billed(fake: FakeBfl, clock: FakeTime) -> None:
    # A grace as long as the whole timeout: the task is never believed lost, so it ends as a billed timeout.
    fake.poll_script.extend([NOT_FOUND] * 1000)
    async with backend(fake.api_url, clock, task_not_found_grace_s=60.0, total_timeout_s=20.0) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros) == (FailureReason.TIMEOUT, PRO_PRICE)


async def test_total_timeout_is_charged_and_polls_back_off(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls = 10**6
    async with backend(fake.api_url, clock, total_timeout_s=10, poll_max_interval_s=2.0) as bfl:
        started_at = clock.now
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.TIMEOUT and failed.retryable
    assert failed.charged_micros == PRO_PRICE
    assert "did not finish in 10 s; BFL still bills this request" in failed.detail
    assert clock.now - started_at == pytest.approx(10.0)
    assert clock.sleeps[:5] == pytest.approx([0.5, 0.75, 1.125, 1.6875, 2.0])
    assert max(clock.sleeps) <= 2.0


async def test_hung_polls_end_in_timeout(fake: FakeBfl, clock: FakeTime) -> None:
    fake.poll_script = [Reply.hang(30)] * 50
    async with backend(fake.api_url, clock, request_timeout_s=0.2, total_timeout_s=2) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.TIMEOUT and failed.charged_micros == PRO_PRICE
    assert "last poll" in failed.detail
    assert fake.count("POST") == 1


async def test_poll_faults_are_retried_honouring_retry_after(fake: FakeBfl, clock: FakeTime) -> None:
    fake.poll_script = [
        Reply(429, retry_after="7"),
        Reply(500),
        Reply(503),
        Reply.hang(30),  # a slow poll past the request timeout
        Reply(drop=True),
        Reply(drop=True),  # two: aiohttp quietly retries a GET once on a dropped connection
    ]
    async with backend(fake.api_url, clock, request_timeout_s=0.3) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished)
    assert clock.sleeps[0] == 7.0
    assert fake.count("POST") == 1


async def test_slow_poll_within_the_request_timeout_is_fine(fake: FakeBfl, clock: FakeTime) -> None:
    fake.poll_script = [Reply(delay_s=0.05)]
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished) and len(fake.polls()) == 1


# ---- the submit ----


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_post_5xx_is_never_replayed(fake: FakeBfl, clock: FakeTime, status: int) -> None:
    fake.post_script = [Reply(status)]
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    failed = only_failure(events)
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.SERVER_ERROR, 0, True)
    assert fake.count("POST") == 1 and not fake.polls()
    assert not any(isinstance(e, Submitted) for e in events)


async def test_post_read_timeout_is_never_replayed_and_may_bill(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply.hang(30)]
    async with backend(fake.api_url, clock, request_timeout_s=0.3) as bfl:
        failed = only_failure(await run_job(bfl, job("pro")))
    assert (failed.reason, failed.retryable) == (FailureReason.TIMEOUT, True)
    assert failed.charged_micros == PRO_PRICE
    assert "may still bill" in failed.detail
    assert fake.count("POST") == 1


async def test_dropped_post_is_never_replayed(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply(drop=True)] * 3
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.SERVER_ERROR and failed.charged_micros == PRO_PRICE
    assert fake.count("POST") == 1


async def test_post_429_honours_retry_after(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply(429, retry_after="3"), Reply(429, retry_after="0.5")]
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished)
    assert clock.sleeps[:2] == [3.0, 0.5]
    assert fake.count("POST") == 3


async def test_post_429_backs_off_1_2_4_then_gives_up(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply(429)] * 4
    async with backend(fake.api_url, clock, max_retries=3) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.RATE_LIMITED, 0, True)
    assert fake.count("POST") == 4


async def test_post_429_then_accepted_after_backoff(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply(429)] * 3
    async with backend(fake.api_url, clock, max_retries=3) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished)
    assert clock.sleeps[:3] == [1.0, 2.0, 4.0]


async def test_account_task_limit_429_is_retried_then_reported(fake: FakeBfl, clock: FakeTime) -> None:
    fake.active_limit = 1
    fake.add_task()  # another client of the same account holds the only active task
    async with backend(fake.api_url, clock, max_retries=2) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert clock.sleeps == [1.0, 1.0]  # the fake's Retry-After, not the default backoff
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.RATE_LIMITED, 0, True)
    assert fake.count("POST") == 3


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(402, {"detail": "Insufficient credits"}), FailureReason.OUT_OF_CREDITS),
        (Reply(403, {"detail": "Not authenticated"}), FailureReason.AUTH),
        (Reply.validation_error("Input should be a multiple of 32", loc="width"), FailureReason.BAD_REQUEST),
        (Reply(400, {"detail": [{"loc": ["body"], "msg": "bad body", "type": "x"}]}), FailureReason.BAD_REQUEST),
    ],
)
async def test_post_refusals(fake: FakeBfl, clock: FakeTime, reply: Reply, reason: FailureReason) -> None:
    fake.post_script = [reply]
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (reason, 0, False)
    assert fake.count("POST") == 1 and not fake.polls()
    if reply.status == 422:
        assert "Input should be a multiple of 32" in failed.detail and "width" in failed.detail


async def test_wrong_key_is_auth(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock, key="wrong") as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.AUTH and not failed.retryable


async def test_accepted_answer_without_polling_url(fake: FakeBfl, clock: FakeTime) -> None:
    fake.post_script = [Reply(200, {"id": "abc", "cost": 4})]
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.SERVER_ERROR and failed.charged_micros == PRO_PRICE
    assert fake.count("POST") == 1


async def test_connection_refused_is_free_and_retryable(clock: FakeTime) -> None:
    async with backend(f"http://127.0.0.1:{closed_port()}", clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.SERVER_ERROR, 0, True)


async def test_missing_key_fails_without_http(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock, key=None) as bfl:
        events = await run_job(bfl, job())
        assert not bfl.status(0).healthy
    assert events == [Failed(FailureReason.AUTH, "no BFL_API_KEY is set")]
    assert fake.requests == []


@pytest.mark.parametrize("model", ["schnell", "nope"])
async def test_model_without_endpoint_fails_without_http(fake: FakeBfl, clock: FakeTime, model: str) -> None:
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job(model)))
    assert failed.reason is FailureReason.BAD_REQUEST and not failed.retryable
    assert fake.requests == []


async def test_invalid_request_fails_without_http(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job("dev", width=1000))
    failed = only_failure(events)
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.BAD_REQUEST, 0, False)
    assert "width" in failed.detail and len(events) == 1
    assert fake.requests == []


# ---- the result download ----


async def test_expired_sample_url(fake: FakeBfl, clock: FakeTime) -> None:
    fake.sample_status = 403
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (
        FailureReason.DOWNLOAD_FAILED,
        PRO_PRICE,
        True,
    )
    assert "403" in failed.detail and "sig=" not in failed.detail  # the signed URL stays out of messages
    assert len(fake.downloads()) == 1


async def test_sample_network_failure(fake: FakeBfl, clock: FakeTime) -> None:
    fake.sample_script = [Reply(drop=True)] * 20
    async with backend(fake.api_url, clock, max_retries=1) as bfl:
        failed = only_failure(await run_job(bfl, job()))
    assert failed.reason is FailureReason.DOWNLOAD_FAILED and failed.charged_micros == PRO_PRICE


async def test_sample_5xx_is_retried(fake: FakeBfl, clock: FakeTime) -> None:
    fake.sample_script = [Reply(503)]
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job())
    assert isinstance(events[-1], Finished) and len(fake.downloads()) == 2


# ---- restart recovery ----


@pytest.mark.parametrize("owner", ["api", "region"])
async def test_resume_polls_without_posting(fake: FakeBfl, clock: FakeTime, owner: Host) -> None:
    fake.poll_host = owner
    fake.pending_polls = 1
    task_id, polling_url = fake.add_task()
    resume = RemoteTask(task_id=task_id, polling_url=polling_url, cost_micros=12_345)
    async with backend(fake.api_url, clock) as bfl:
        events = await run_job(bfl, job(resume=resume))
    assert fake.count("POST") == 0
    assert not any(isinstance(e, Submitted) for e in events)
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Finished) and events[-1].cost_micros == 12_345
    assert {p.host for p in fake.polls()} == {fake.hostport(owner)}


async def test_resume_of_a_forgotten_task(fake: FakeBfl, clock: FakeTime) -> None:
    resume = RemoteTask(task_id="gone", polling_url=f"{fake.api_url}/v1/get_result?id=gone", cost_micros=40_000)
    async with backend(fake.api_url, clock) as bfl:
        failed = only_failure(await run_job(bfl, job(resume=resume)))
    assert (failed.reason, failed.charged_micros, failed.retryable) == (FailureReason.TASK_NOT_FOUND, 0, True)
    assert fake.count("POST") == 0


def test_resume_without_a_stored_task_gives_up_rather_than_submitting_again(clock: FakeTime) -> None:
    """A job cut off before BFL's answer was stored may have been accepted: a second submit could bill twice."""
    bfl = BflBackend(BflSettings(), MODELS, API_KEY, clock=clock.clock, sleep=clock.sleep)
    unconfirmed = bfl.resume(job())
    assert isinstance(unconfirmed, Unresumable) and "before the API confirmed" in unconfirmed.reason
    foreign = bfl.resume(BackendJob("jtest0001", request("pro"), resume=ResumeToken('{"sequence":7}')))
    assert isinstance(foreign, Unresumable) and "cannot be read" in foreign.reason


def test_a_task_survives_its_resume_token() -> None:
    task = RemoteTask("t-1", "https://api.eu.bfl.ai/v1/get_result?id=t-1", 25_000)
    token = ResumeToken.from_json(task.token().to_json())
    assert RemoteTask.from_token(token) == task
    assert (token.billed_micros, token.billing) == (25_000, "BFL bills its task t-1")


# ---- concurrency and cancellation ----


async def test_concurrency_cap_holds(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls = 3
    async with backend(fake.api_url, clock, max_concurrency=3) as bfl:
        seen: list[int] = []

        async def one(n: int) -> list[BackendEvent]:
            events = []
            async with aclosing(bfl.run(job(seed=n))) as stream:
                async for event in stream:
                    seen.append(bfl.status(0).in_flight)
                    events.append(event)
            return events

        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(12))), 10)
    assert all(isinstance(events[-1], Finished) for events in results)
    assert fake.count("POST") == 12
    assert 1 < fake.max_active <= 3
    assert max(seen) <= 3
    assert bfl.status(0).in_flight == 0


async def test_cancellation_releases_the_slot(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls, fake.progress = 10**6, [0.1, 0.2]
    async with backend(fake.api_url, clock, max_concurrency=1, total_timeout_s=10**6) as bfl:
        events: list[BackendEvent] = []
        polling = asyncio.Event()

        async def consume() -> None:
            async for event in bfl.run(job()):
                events.append(event)
                if isinstance(event, Progress) and event.step == 20:
                    polling.set()  # the generator is now between polls, holding the only slot

        task = asyncio.create_task(consume())
        await asyncio.wait_for(polling.wait(), 5)
        assert bfl.status(0).in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bfl.status(0).in_flight == 0
        assert not any(isinstance(e, Failed | Finished) for e in events)

        fake.pending_polls = 0  # the next task is quick; it gets the only slot
        second = await asyncio.wait_for(run_job(bfl, job()), 5)
    assert isinstance(second[-1], Finished)


# ---- credits, status, estimates ----


async def test_credits_in_micros(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock) as bfl:
        assert await bfl.credits() == 12_345_000
    [call] = fake.requests
    assert (call.path, call.had_key) == ("/v1/credits", True)


async def test_credits_failures_say_why(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock, key="wrong") as bfl:
        with pytest.raises(BackendUnavailable, match="refused the API key"):
            await bfl.credits()
    async with backend(fake.api_url, clock) as bfl:
        fake.credits_script = [Reply(503)]
        with pytest.raises(BackendUnavailable, match="HTTP 503"):
            await bfl.credits()
        fake.credits_script = [Reply(200, {"nothing": True})]
        with pytest.raises(BackendUnavailable, match="without a number"):
            await bfl.credits()
    async with backend(fake.api_url, clock, key=None) as bfl:
        with pytest.raises(BackendUnavailable, match="BFL_API_KEY"):
            await bfl.credits()
    async with backend(f"http://127.0.0.1:{closed_port()}", clock) as bfl:
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            await bfl.credits()


async def test_health_turns_off_after_repeated_server_errors_and_recovers(fake: FakeBfl, clock: FakeTime) -> None:
    async with backend(fake.api_url, clock) as bfl:
        assert bfl.status(0).healthy
        fake.post_script = [Reply(500)] * 5
        for _ in range(4):
            await run_job(bfl, job())
        assert bfl.status(0).healthy  # four in a row are bad luck, not an outage
        await run_job(bfl, job())
        status = bfl.status(0)
        assert not status.healthy and "server_error" in status.detail
        clock.now += 61  # after the cool-down the router may try again
        assert bfl.status(0).healthy
        events = await run_job(bfl, job())
        assert isinstance(events[-1], Finished)
        assert bfl.status(0).healthy


async def test_moderation_does_not_count_against_health(fake: FakeBfl, clock: FakeTime) -> None:
    fake.final_status = "Content Moderated"
    async with backend(fake.api_url, clock) as bfl:
        for _ in range(6):
            await run_job(bfl, job())
        assert bfl.status(0).healthy


async def test_status_eta_and_estimates(fake: FakeBfl, clock: FakeTime) -> None:
    fake.pending_polls = 2
    async with backend(fake.api_url, clock, max_concurrency=3, seconds_estimate=18.0) as bfl:
        assert isinstance(bfl, Backend)
        assert bfl.capacity() == 3
        assert bfl.supports("pro", MODELS["pro"]) and not bfl.supports("schnell", MODELS["schnell"])
        status = bfl.status(0, request())
        assert (status.kind, status.healthy, status.capacity, status.in_flight) == (BackendKind.API, True, 3, 0)
        assert status.eta_s == 18.0
        assert bfl.status(2).eta_s == 18.0  # a slot is still free
        assert bfl.status(3).eta_s == 36.0  # every slot taken: wait about one generation
        assert bfl.status(6).eta_s == 54.0

        await run_job(bfl, job("pro"))  # the fake clock moved 0.5 + 0.75 s while polling
        assert bfl.estimate_seconds(request("pro")) == pytest.approx(18 + 0.3 * (1.25 - 18))
        assert bfl.estimate_seconds(request("ultra")) == 18.0


async def test_failures_are_logged_with_job_id_and_never_the_key(
    fake: FakeBfl, clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.post_script = [Reply(503)]
    async with backend(fake.api_url, clock) as bfl:
        await run_job(bfl, job())
        await run_job(bfl, job())
        await bfl.credits()
    failures = [r for r in caplog.records if r.name == "engine.backends.bfl" and r.levelno == logging.WARNING]
    assert len(failures) == 1 and "jtest0001" in failures[0].getMessage()
    assert failures[0].exc_info is None
    assert API_KEY not in caplog.text


# ---- build_payload ----

SETTINGS = BflSettings(safety_tolerance=3, output_format="jpeg")


def test_payload_flux_dev() -> None:
    assert build_payload("flux-dev", request("dev"), SETTINGS) == {
        "prompt": "a red fox in the snow",
        "width": 1024,
        "height": 768,
        "steps": 28,
        "guidance": 3.0,
        "seed": 42,
        "safety_tolerance": 3,
        "output_format": "jpeg",
    }
    assert "guidance" not in build_payload("flux-dev", request("dev", guidance=None), SETTINGS)


def test_payload_flux_pro_has_no_steps_or_guidance() -> None:
    payload = build_payload("flux-pro-1.1", request("pro"), SETTINGS)
    assert payload == {
        "prompt": "a red fox in the snow",
        "width": 1024,
        "height": 768,
        "seed": 42,
        "safety_tolerance": 3,
        "output_format": "jpeg",
    }


@pytest.mark.parametrize("ratio", ["21:9", "9:21", "1:1", "16:9", "3:7"])
def test_payload_ultra_uses_aspect_ratio(ratio: str) -> None:
    payload = build_payload("flux-pro-1.1-ultra", request("ultra", aspect_ratio=ratio), SETTINGS)
    assert payload == {
        "prompt": "a red fox in the snow",
        "aspect_ratio": ratio,
        "raw": False,
        "seed": 42,
        "safety_tolerance": 3,
        "output_format": "jpeg",
    }


INPUT_PNG = b"\x89PNG\r\n\x1a\n-an-input-image"


@pytest.mark.parametrize("endpoint", ["flux-kontext-pro", "flux-kontext-max"])
def test_payload_kontext_sends_the_image_itself_as_base64(endpoint: str) -> None:
    edit = request("kontext", task=Task.EDIT, input_image="ab" * 32, aspect_ratio="16:9")
    payload = build_payload(endpoint, edit, SETTINGS, INPUT_PNG)
    assert payload == {
        "prompt": "a red fox in the snow",
        "aspect_ratio": "16:9",
        "input_image": base64.b64encode(INPUT_PNG).decode(),
        "seed": 42,
        "safety_tolerance": 3,
        "output_format": "jpeg",
    }


def test_payload_image_prompt_guides_pro_and_ultra_varies_by_strength() -> None:
    guided = build_payload("flux-pro-1.1", request("pro", input_image="ab" * 32), SETTINGS, INPUT_PNG)
    assert guided["image_prompt"] == base64.b64encode(INPUT_PNG).decode()
    varied = request("ultra", task=Task.VARY, input_image="ab" * 32, strength=0.3, aspect_ratio="1:1")
    payload = build_payload("flux-pro-1.1-ultra", varied, SETTINGS, INPUT_PNG)
    assert (payload["image_prompt"], payload["image_prompt_strength"]) == (base64.b64encode(INPUT_PNG).decode(), 0.7)
    with pytest.raises(InvalidRequest) as caught:
        build_payload("flux-dev", request("dev", input_image="ab" * 32), SETTINGS, INPUT_PNG)
    assert caught.value.field == "image"


@pytest.mark.parametrize(
    ("endpoint", "changes", "field"),
    [
        ("flux-dev", {"width": 1000}, "width"),
        ("flux-dev", {"width": 224}, "width"),
        ("flux-dev", {"height": 1472}, "height"),
        ("flux-dev", {"steps": 0}, "steps"),
        ("flux-dev", {"steps": 51}, "steps"),
        ("flux-dev", {"guidance": 1.4}, "guidance"),
        ("flux-dev", {"guidance": 5.1}, "guidance"),
        ("flux-dev", {"prompt": "   "}, "prompt"),
        ("flux-pro-1.1", {"width": 1441}, "width"),
        ("flux-pro-1.1", {"height": 250}, "height"),
        ("flux-pro-1.1-ultra", {"aspect_ratio": "22:9"}, "aspect_ratio"),
        ("flux-pro-1.1-ultra", {"aspect_ratio": "9:22"}, "aspect_ratio"),
        ("flux-pro-1.1-ultra", {"aspect_ratio": "wide"}, "aspect_ratio"),
        ("flux-pro-1.1-ultra", {"aspect_ratio": "16:0"}, "aspect_ratio"),
        ("flux-kontext-pro", {"aspect_ratio": "3:1"}, "aspect_ratio"),
        ("flux-kontext-pro", {}, "input_image"),
        ("flux-kontext-max", {"task": Task.EDIT}, "input_image"),
        ("flux-fill", {}, "model"),
    ],
)
def test_payload_rejects(endpoint: str, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        build_payload(endpoint, request(**changes), SETTINGS)
    assert caught.value.field == field


def test_payload_ignores_fields_other_endpoints_check() -> None:
    # flux-pro-1.1 has no steps or guidance, so out-of-range values there are not its problem.
    build_payload("flux-pro-1.1", request(steps=500, guidance=99.0), SETTINGS)
    # ultra has no width/height.
    build_payload("flux-pro-1.1-ultra", request(width=1000, height=7), SETTINGS)
