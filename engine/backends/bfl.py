"""The Black Forest Labs HTTP API as a Backend: check, submit once, poll the task's own URL, download at once.

This module reports what BFL bills and nothing more: a task that BFL accepted is billed even when we stop
waiting for it; one it never accepted, or moderated, is not. Quotas and ledgers are the scheduler's business.

A POST is never replayed after a 5xx or a read timeout (BFL may have accepted it and would bill twice); polls
and downloads are plain GETs and are retried freely within the task's time budget. An accepted task is yielded as
a resume token (its id, polling URL and cost) before the first poll, so that after a restart `resume` polls it again.

BFL's answers are TypedDicts (below), each checked where its JSON is parsed; what the API accepts (sizes, steps,
guidance, aspect ratios per endpoint) comes from engine/models.py, which validation and the chat commands share.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from fractions import Fraction
from typing import Any, NotRequired, TypedDict

import aiohttp
from yarl import URL

from engine.backends.base import Resumption, Unresumable
from engine.config import BflSettings, ModelSettings
from engine.errors import BackendUnavailable, InvalidRequest
from engine.models import (
    BFL_ENDPOINTS,
    BFL_GUIDANCE_MAX,
    BFL_GUIDANCE_MIN,
    BFL_SIDE_MAX,
    BFL_SIDE_MIN,
    BFL_SIDE_MULTIPLE,
    BFL_STEPS_MAX,
    BFL_STEPS_MIN,
    BFL_TALLEST,
    BFL_WIDEST,
    PNG,
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    Finished,
    Progress,
    ResolvedRequest,
    ResumeToken,
    Started,
    Submitted,
    Task,
    credits_to_micros,
    format_usd,
    image_format,
)

log = logging.getLogger(__name__)

FLUX_ULTRA = "flux-pro-1.1-ultra"  # the one aspect-ratio endpoint that takes `raw`

_MODERATED = ("Request Moderated", "Content Moderated")
_EMA_WEIGHT = 0.3  # how much one new measurement moves the per-endpoint estimate
_HEALTH_WINDOW = 5  # this many failures in a row (and nothing else) mark the API unhealthy...
_HEALTH_COOLDOWN_S = 60.0  # ...for this long after the last one, so the router tries it again later
_HEALTH_REASONS = (FailureReason.SERVER_ERROR, FailureReason.AUTH, FailureReason.OUT_OF_CREDITS)
_MAX_RETRY_AFTER_S = 120.0  # a server asking for longer is treated as asking for this
_CONNECT_TIMEOUT_S = 10.0


def parse_aspect_ratio(text: str) -> Fraction:
    """'16:9' -> Fraction(16, 9); raises InvalidRequest for anything else."""
    width, sep, height = text.partition(":")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit() or int(height) == 0:
        raise InvalidRequest(f"aspect ratio {text!r} is not of the form W:H, such as 16:9", field="aspect_ratio")
    return Fraction(int(width), int(height))


def build_payload(
    endpoint: str, request: ResolvedRequest, settings: BflSettings, input_image: bytes | None = None
) -> dict[str, Any]:
    """The JSON body of `POST /v1/<endpoint>`, or InvalidRequest naming the first option BFL would refuse.

    Checking here, before anything is sent, turns a would-be 422 (or a billed request we cannot use) into a
    clear message with the field at fault.
    """
    if not request.for_model.strip():
        raise InvalidRequest("the prompt is empty", field="prompt")
    limits = BFL_ENDPOINTS.get(endpoint)
    if limits is None:
        raise InvalidRequest(f"unknown BFL endpoint {endpoint!r}", field="model")
    payload: dict[str, Any] = {"prompt": request.for_model}
    if limits.sizing == "pixels":
        for name, side in (("width", request.width), ("height", request.height)):
            if not BFL_SIDE_MIN <= side <= BFL_SIDE_MAX or side % BFL_SIDE_MULTIPLE:
                raise InvalidRequest(
                    f"{name} must be a multiple of {BFL_SIDE_MULTIPLE} from {BFL_SIDE_MIN} to {BFL_SIDE_MAX}"
                    f" on {endpoint} (got {side})",
                    field=name,
                )
        payload["width"], payload["height"] = request.width, request.height
    else:
        if not BFL_TALLEST <= parse_aspect_ratio(request.aspect_ratio) <= BFL_WIDEST:
            raise InvalidRequest(
                f"aspect ratio must be between 21:9 and 9:21 on {endpoint} (got {request.aspect_ratio})",
                field="aspect_ratio",
            )
        payload["aspect_ratio"] = request.aspect_ratio
    if limits.steps:
        if not BFL_STEPS_MIN <= request.steps <= BFL_STEPS_MAX:
            raise InvalidRequest(
                f"steps must be from {BFL_STEPS_MIN} to {BFL_STEPS_MAX} on {endpoint} (got {request.steps})",
                field="steps",
            )
        payload["steps"] = request.steps
    if limits.guidance and request.guidance is not None:  # unset: BFL's own default (3)
        if not BFL_GUIDANCE_MIN <= request.guidance <= BFL_GUIDANCE_MAX:
            raise InvalidRequest(
                f"guidance must be from {BFL_GUIDANCE_MIN:g} to {BFL_GUIDANCE_MAX:g} on {endpoint}"
                f" (got {request.guidance:g})",
                field="guidance",
            )
        payload["guidance"] = request.guidance
    if endpoint == FLUX_ULTRA:
        payload["raw"] = False
    if limits.input_image:
        if not input_image:
            raise InvalidRequest(f"{endpoint} edits an image: give the image to start from", field="input_image")
        payload["input_image"] = base64.b64encode(input_image).decode()  # never a chat URL: those expire
    elif input_image:
        if not limits.image_prompt:
            raise InvalidRequest(f"{endpoint} takes no input image", field="image")
        payload["image_prompt"] = base64.b64encode(input_image).decode()
        if endpoint == FLUX_ULTRA and request.task is Task.VARY and request.strength is not None:
            # How much the image guides the new one: the opposite of how far a variation may move from it.
            payload["image_prompt_strength"] = round(1 - request.strength, 3)
    payload["seed"] = request.seed
    payload["safety_tolerance"] = settings.safety_tolerance
    payload["output_format"] = settings.output_format
    return payload


# ---- BFL's answers, as the API documents them; each is checked where its JSON is parsed ----


class SubmitAnswer(TypedDict):
    """`POST /v1/<endpoint>` accepted the task."""

    id: str
    polling_url: str
    cost: NotRequired[float | int | str]  # credits; absent on older API versions


class PollResult(TypedDict):
    sample: str  # the signed URL of the image, valid for about ten minutes


class PollAnswer(TypedDict):
    """`GET <polling_url>`: the task's status ("Pending", "Ready", "Error", "Request Moderated"...)."""

    status: str
    result: NotRequired[PollResult | None]
    progress: NotRequired[float | int | None]  # a fraction up to 1.0, or a percentage


class CreditsAnswer(TypedDict):
    """`GET /v1/credits`."""

    credits: float | int | str


class ValidationProblem(TypedDict):
    loc: list[str | int]
    msg: str


class ErrorBody(TypedDict):
    """A refusal's body: FastAPI's validation problems, or one sentence."""

    detail: str | list[ValidationProblem]


def submit_answer(body: object) -> SubmitAnswer | None:
    """The submit answer in `body`, or None when it lacks a usable id and polling URL."""
    if not isinstance(body, dict):
        return None
    task_id, polling_url, cost = body.get("id"), body.get("polling_url"), body.get("cost")
    if not isinstance(task_id, str) or not isinstance(polling_url, str) or not polling_url.startswith("http"):
        return None
    answer = SubmitAnswer(id=task_id, polling_url=polling_url)
    if isinstance(cost, int | float | str) and not isinstance(cost, bool) and cost != "":
        answer["cost"] = cost
    return answer


def poll_answer(body: object) -> PollAnswer | None:
    """The poll answer in `body`, or None when it has no status; fields of the wrong type are left out."""
    if not isinstance(body, dict) or not isinstance(status := body.get("status"), str):
        return None
    answer = PollAnswer(status=status)
    result = body.get("result")
    if isinstance(result, dict) and isinstance(sample := result.get("sample"), str):
        answer["result"] = PollResult(sample=sample)
    progress = body.get("progress")
    if isinstance(progress, int | float) and not isinstance(progress, bool):
        answer["progress"] = progress
    return answer


def credits_answer(body: object) -> CreditsAnswer | None:
    if not isinstance(body, dict):
        return None
    value = body.get("credits")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    return CreditsAnswer(credits=value)


def error_body(body: object) -> ErrorBody | None:
    if not isinstance(body, dict):
        return None
    detail = body.get("detail")
    if isinstance(detail, str) and detail:
        return ErrorBody(detail=detail)
    if isinstance(detail, list):
        problems = [
            ValidationProblem(
                loc=loc if isinstance(loc := item.get("loc"), list) else [], msg=str(item.get("msg", "invalid value"))
            )
            for item in detail
            if isinstance(item, dict)
        ]
        if problems:
            return ErrorBody(detail=problems)
    return None


@dataclass(frozen=True, slots=True)
class RemoteTask:
    """A task BFL accepted: what its resume token holds, so a restart polls it again instead of resubmitting."""

    task_id: str
    polling_url: str
    cost_micros: int

    def token(self) -> ResumeToken:
        state = {"task_id": self.task_id, "polling_url": self.polling_url, "cost_micros": self.cost_micros}
        return ResumeToken(json.dumps(state, separators=(",", ":")), self.cost_micros, self.billing)

    @property
    def billing(self) -> str:
        return f"BFL bills its task {self.task_id}"

    @classmethod
    def from_token(cls, token: ResumeToken) -> RemoteTask:
        """The task a token names; ValueError when the token is not one of this backend's."""
        state = json.loads(token.state)
        if not isinstance(state, dict):
            raise ValueError("a BFL resume token holds a JSON object")
        task_id, polling_url, cost = state.get("task_id"), state.get("polling_url"), state.get("cost_micros")
        if not isinstance(task_id, str) or not isinstance(polling_url, str) or not isinstance(cost, int):
            raise ValueError(f"not a BFL task: {token.state[:200]!r}")
        return cls(task_id, polling_url, cost)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class _Ready:
    sample_url: str


class BflBackend:
    """Backend for BackendKind.API. One aiohttp session; at most `max_concurrency` BFL tasks alive at once.

    Consumers of `run()` should close the generator (contextlib.aclosing) when they stop early, so that the
    concurrency slot is given back at once rather than when the generator is garbage-collected.
    """

    kind: BackendKind = BackendKind.API

    def __init__(
        self,
        settings: BflSettings,
        models: Mapping[str, ModelSettings],
        api_key: str | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._models = models
        self._api_key = api_key
        self._clock = clock
        self._sleep = sleep
        self._base = settings.api_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        # BFL limits active tasks per account, so a slot is held from submit until the image is downloaded.
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._in_flight = 0
        self._estimates: dict[str, float] = {}
        self._outcomes: deque[FailureReason | None] = deque(maxlen=_HEALTH_WINDOW)  # None = success
        self._last_failure_at = -math.inf

    # ---- lifecycle ----

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    def detach(self) -> None:
        return None  # a task at BFL runs on whatever this process does; the next start polls it again

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ---- what the router asks ----

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return bool(model.api_endpoint)

    def capacity(self) -> int:
        return self._settings.max_concurrency

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        endpoint = self._endpoint_of(request.model)
        return self._estimates.get(endpoint or "", self._settings.seconds_estimate)

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        capacity = self.capacity()
        estimate = self.estimate_seconds(request) if request else self._settings.seconds_estimate
        busy = self._in_flight + queued_ahead
        # With every slot taken, a new job waits for about one generation per full round of slots ahead of it (the
        # scheduler replaces this with its play-forward of the queue, which knows what the running tasks have left).
        rounds = 0 if busy < capacity else (busy - capacity) // capacity + 1
        healthy, detail = True, f"{self._in_flight}/{capacity} tasks in flight, ~{estimate:.0f} s per image"
        if not self._api_key:
            healthy, detail = False, "no BFL_API_KEY is set"
        elif self._failing():
            wait = self._last_failure_at + _HEALTH_COOLDOWN_S - self._clock()
            last = self._outcomes[-1]
            healthy = False
            detail = f"the last {_HEALTH_WINDOW} API jobs failed ({last}); trying again in {wait:.0f} s"
        return BackendStatus(
            kind=BackendKind.API,
            healthy=healthy,
            wait_s=estimate * rounds,
            run_s=estimate,
            ahead=queued_ahead,
            in_flight=self._in_flight,
            capacity=capacity,
            detail=detail,
        )

    async def credits(self) -> int:
        """The account balance in micro-dollars, or BackendUnavailable saying why it cannot be read."""
        if not self._api_key:
            raise BackendUnavailable("no BFL_API_KEY is set, so the BFL balance cannot be read")
        if self._session is None:
            raise BackendUnavailable("the BFL backend is not started")
        url = f"{self._base}/v1/credits"
        timeout = self._settings.request_timeout_s
        try:
            answer = await self._call(self._session, "GET", URL(url), key=True, timeout_s=timeout)
        except TimeoutError:
            raise BackendUnavailable(f"BFL ({self._base}) did not answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach BFL ({self._base}): {_brief(exc)}") from None
        if answer.status in (401, 403):
            raise BackendUnavailable(f"BFL refused the API key (HTTP {answer.status})")
        if not 200 <= answer.status < 300:
            raise BackendUnavailable(f"the BFL balance check failed with HTTP {answer.status}")
        balance = credits_answer(answer.body)
        if balance is None:
            raise BackendUnavailable("BFL answered the balance check without a number of credits")
        try:
            return credits_to_micros(balance["credits"])
        except ArithmeticError:  # decimal.InvalidOperation: a string that is not a number
            raise BackendUnavailable(f"BFL answered the balance check with {balance['credits']!r} credits") from None

    # ---- making an image ----

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        request = job.request
        model = self._models.get(request.model)
        endpoint = model.api_endpoint if model else None
        price = model.price_micros if model else 0
        if endpoint is None:
            yield self._failed(job, FailureReason.BAD_REQUEST, f"{request.model!r} is not a BFL API model")
            return
        try:
            payload = build_payload(endpoint, request, self._settings, job.input_image)
        except InvalidRequest as exc:
            yield self._failed(job, FailureReason.BAD_REQUEST, exc.problem)
            return
        session = self._ready_session(job)
        if isinstance(session, Failed):
            yield session
            return

        async with self._slots:
            self._in_flight += 1
            try:
                submitted_at = self._clock()
                outcome = await self._submit(session, job, endpoint, payload, price)
                if isinstance(outcome, Failed):
                    yield self._log_failure(job, outcome)
                    return
                yield Submitted(outcome.token())
                async for event in self._follow(session, job, outcome):
                    if isinstance(event, Finished):
                        self._measured(endpoint, self._clock() - submitted_at)
                    yield event
            finally:
                self._in_flight -= 1

    def resume(self, job: BackendJob) -> Resumption:
        """Poll the stored task again: it was accepted before, and submitting it again would bill twice."""
        if job.resume is None:
            return Unresumable("flux-bot stopped before the API confirmed this job")
        try:
            task = RemoteTask.from_token(job.resume)
        except ValueError as exc:
            return Unresumable(f"its stored BFL task cannot be read ({exc})")
        return self._resumed(job, task)

    async def _resumed(self, job: BackendJob, task: RemoteTask) -> AsyncGenerator[BackendEvent, None]:
        session = self._ready_session(job)
        if isinstance(session, Failed):
            yield session
            return
        async with self._slots:
            self._in_flight += 1
            try:
                log.info("job %s: resuming BFL task %s", job.job_id, task.task_id)
                async for event in self._follow(session, job, task):
                    yield event
            finally:
                self._in_flight -= 1

    def _ready_session(self, job: BackendJob) -> aiohttp.ClientSession | Failed:
        if not self._api_key:
            return self._failed(job, FailureReason.AUTH, "no BFL_API_KEY is set")
        if self._session is None:
            return self._failed(job, FailureReason.INTERNAL, "the BFL backend is not started", retryable=True)
        return self._session

    async def _follow(
        self, session: aiohttp.ClientSession, job: BackendJob, task: RemoteTask
    ) -> AsyncGenerator[BackendEvent, None]:
        """An accepted task to its end: Started, progress, then the downloaded image or one Failed."""
        yield Started(BackendKind.API, detail=f"BFL task {task.task_id}")
        sample_url = ""
        async with aclosing(self._poll(session, task)) as polls:
            async for event in polls:
                if isinstance(event, Failed):
                    yield self._log_failure(job, event)
                    return
                if isinstance(event, _Ready):
                    sample_url = event.sample_url
                else:
                    yield event

        result = await self._download(session, sample_url, job.request.seed, task.cost_micros)
        if isinstance(result, Failed):
            yield self._log_failure(job, result)
            return
        self._outcomes.append(None)
        log.info("job %s: BFL task %s done (%d bytes)", job.job_id, task.task_id, len(result.image))
        yield result

    async def _submit(
        self,
        session: aiohttp.ClientSession,
        job: BackendJob,
        endpoint: str,
        payload: dict[str, Any],
        price: int,
    ) -> RemoteTask | Failed:
        url = URL(f"{self._base}/v1/{endpoint}")
        timeout = self._settings.request_timeout_s
        attempt = 0
        while True:
            try:
                answer = await self._call(session, "POST", url, key=True, timeout_s=timeout, json=payload)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never connected, so nothing was sent and nothing can be billed.
                return _retry(FailureReason.SERVER_ERROR, f"cannot reach BFL ({_brief(exc)}); nothing was sent")
            except TimeoutError:
                detail = f"BFL did not answer the submit within {timeout:g} s; the API may still bill it"
                return _retry(FailureReason.TIMEOUT, detail, charged=price)
            except aiohttp.ClientError as exc:
                # The request went out and the answer was lost: as ambiguous as a read timeout.
                detail = f"the connection broke during the submit ({_brief(exc)}); the API may still bill it"
                return _retry(FailureReason.SERVER_ERROR, detail, charged=price)
            if answer.status == 429 and attempt < self._settings.max_retries:
                # A 429 means BFL did not accept the task, so sending it again cannot bill twice.
                delay = answer.retry_after if answer.retry_after is not None else 2.0**attempt
                attempt += 1
                log.info("job %s: BFL busy (429), submit retry %d in %.1f s", job.job_id, attempt, delay)
                await self._sleep(delay)
                continue
            if 200 <= answer.status < 300:
                return _accepted(answer.body, price)
            return _refused(answer, attempt)

    async def _poll(
        self, session: aiohttp.ClientSession, task: RemoteTask
    ) -> AsyncGenerator[Progress | Failed | _Ready, None]:
        """Progress events, then exactly one Failed or _Ready. The deadline starts with the first poll."""
        settings = self._settings
        deadline = self._clock() + settings.total_timeout_s
        interval = settings.poll_interval_s
        ceiling = max(settings.poll_max_interval_s, settings.poll_interval_s)
        # "Task not found" just after a submit is BFL's eventual consistency (the owning cluster has not heard of the
        # task yet), not a lost task: it is believed only once it persists past the grace window.
        believe_not_found_at = self._clock() + settings.task_not_found_grace_s
        # The polling URL names the cluster that owns the task; the global host would answer Pending forever.
        url = URL(task.polling_url, encoded=True)
        last_step = -1
        trouble = ""
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                note = f" (last poll: {trouble})" if trouble else ""
                detail = f"the API did not finish in {settings.total_timeout_s:g} s; BFL still bills this request"
                yield _retry(FailureReason.TIMEOUT, detail + note, charged=task.cost_micros)
                return
            wait = interval
            try:
                answer = await self._call(
                    session, "GET", url, key=True, timeout_s=min(settings.request_timeout_s, remaining)
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                trouble = _brief(exc)
            else:
                if answer.status == 429 or answer.status >= 500:
                    trouble = f"HTTP {answer.status}"
                    wait = answer.retry_after if answer.retry_after is not None else interval
                elif answer.status in (401, 403):
                    yield Failed(
                        FailureReason.AUTH,
                        f"BFL refused the API key while polling (HTTP {answer.status})",
                        charged_micros=task.cost_micros,
                    )
                    return
                elif answer.status == 404:
                    if self._clock() >= believe_not_found_at:
                        yield _retry(FailureReason.TASK_NOT_FOUND, _not_found(settings, "HTTP 404"))
                        return
                    trouble = "task not found yet (HTTP 404)"
                elif not 200 <= answer.status < 300:
                    detail = f"unexpected HTTP {answer.status} while polling"
                    yield _retry(FailureReason.SERVER_ERROR, detail, charged=task.cost_micros)
                    return
                elif (poll := poll_answer(answer.body)) is None:
                    trouble = "an answer without a status"
                elif poll["status"] == "Task not found":
                    if self._clock() >= believe_not_found_at:
                        yield _retry(FailureReason.TASK_NOT_FOUND, _not_found(settings, "Task not found"))
                        return
                    trouble = "task not found yet"
                else:
                    final = _final(poll, task)
                    if final is not None:
                        yield final
                        return
                    trouble = ""
                    step = _progress_step(poll.get("progress"))
                    if step is not None and step != last_step:
                        last_step = step
                        yield Progress(step=step, total=100)
            await self._sleep(max(0.0, min(wait, deadline - self._clock())))
            interval = min(interval * 1.5, ceiling)

    async def _download(
        self, session: aiohttp.ClientSession, sample_url: str, seed: int, cost: int
    ) -> Finished | Failed:
        """Fetch the signed result URL now (it expires in about ten minutes); no x-key: it is another host."""
        url = URL(sample_url, encoded=True)
        timeout = aiohttp.ClientTimeout(total=self._settings.request_timeout_s, sock_connect=_CONNECT_TIMEOUT_S)
        problem = ""
        for attempt in range(self._settings.max_retries + 1):
            if attempt:
                await self._sleep(2.0 ** (attempt - 1))
            try:
                async with session.get(url, timeout=timeout) as response:
                    if response.status in (403, 404, 410):
                        detail = f"the result URL on {url.host} has expired or vanished (HTTP {response.status})"
                        return _retry(FailureReason.DOWNLOAD_FAILED, detail, charged=cost)
                    if 200 <= response.status < 300:
                        image = await response.read()
                        if image:
                            mime = response.content_type
                            if not mime.startswith("image/"):
                                mime = (image_format(self._settings.output_format) or PNG).mime
                            return Finished(image=image, mime=mime, seed=seed, cost_micros=cost)
                        problem = "an empty body"
                    else:
                        problem = f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = _brief(exc)
        detail = f"could not download the image from {url.host}: {problem}"
        return _retry(FailureReason.DOWNLOAD_FAILED, detail, charged=cost)

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        *,
        key: bool,
        timeout_s: float,
        json: dict[str, Any] | None = None,
    ) -> _Answer:
        headers = {"accept": "application/json"}
        if key and self._api_key:
            headers["x-key"] = self._api_key
        client_timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, _CONNECT_TIMEOUT_S))
        async with session.request(method, url, json=json, headers=headers, timeout=client_timeout) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return _Answer(response.status, body, _retry_after(response.headers.get("Retry-After")))

    # ---- bookkeeping ----

    def _endpoint_of(self, model_name: str) -> str | None:
        model = self._models.get(model_name)
        return model.api_endpoint if model else None

    def _measured(self, endpoint: str, seconds: float) -> None:
        old = self._estimates.get(endpoint, self._settings.seconds_estimate)
        self._estimates[endpoint] = old + _EMA_WEIGHT * (seconds - old)

    def _failing(self) -> bool:
        return (
            len(self._outcomes) == _HEALTH_WINDOW
            and all(outcome is not None for outcome in self._outcomes)
            and self._clock() - self._last_failure_at < _HEALTH_COOLDOWN_S
        )

    def _failed(self, job: BackendJob, reason: FailureReason, detail: str, *, retryable: bool = False) -> Failed:
        return self._log_failure(job, Failed(reason, detail, retryable=retryable))

    def _log_failure(self, job: BackendJob, failed: Failed) -> Failed:
        if failed.reason in _HEALTH_REASONS:
            self._outcomes.append(failed.reason)
            self._last_failure_at = self._clock()
        log.warning(
            "job %s: BFL %s: %s (charged %s, %s)",
            job.job_id,
            failed.reason.value,
            failed.detail,
            format_usd(failed.charged_micros),
            "retryable" if failed.retryable else "final",
        )
        return failed


def _retry(reason: FailureReason, detail: str, charged: int = 0) -> Failed:
    """A failure that another attempt (here or on another backend) may fix; `charged` is what BFL bills."""
    return Failed(reason, detail, charged_micros=charged, retryable=True)


def _accepted(body: object, price: int) -> RemoteTask | Failed:
    answer = submit_answer(body)
    if answer is None:
        detail = "BFL accepted the task but gave no usable id and polling_url; it may still bill it"
        return _retry(FailureReason.SERVER_ERROR, detail, charged=price)
    try:
        cost_micros = credits_to_micros(answer["cost"]) if "cost" in answer else price
    except ArithmeticError:  # a cost that is not a number: the configured price is the best guess
        cost_micros = price
    return RemoteTask(task_id=answer["id"], polling_url=answer["polling_url"], cost_micros=cost_micros)


def _refused(answer: _Answer, retries: int) -> Failed:
    status = answer.status
    if status == 429:
        return _retry(FailureReason.RATE_LIMITED, f"BFL is busy (HTTP 429, still after {retries} retries)")
    if status == 402:
        return Failed(FailureReason.OUT_OF_CREDITS, "the BFL account is out of credits (HTTP 402)")
    if status in (401, 403):
        return Failed(FailureReason.AUTH, f"BFL refused the API key (HTTP {status})")
    if status in (400, 422):
        return Failed(FailureReason.BAD_REQUEST, f"BFL refused the request: {_first_problem(answer.body)}")
    if status >= 500:
        return _retry(FailureReason.SERVER_ERROR, f"BFL server error (HTTP {status}); nothing was submitted")
    return Failed(FailureReason.BAD_REQUEST, f"unexpected HTTP {status} from BFL on submit")


def _final(poll: PollAnswer, task: RemoteTask) -> Failed | _Ready | None:
    """The end of a task as one poll answer tells it, or None while it is still running ("Task not found" aside)."""
    status = poll["status"]
    if status == "Ready":
        result = poll.get("result")
        if result is not None and result["sample"].startswith("http"):
            return _Ready(result["sample"])
        return _retry(FailureReason.DOWNLOAD_FAILED, "BFL said Ready but gave no result URL", task.cost_micros)
    if status in _MODERATED:
        return Failed(FailureReason.MODERATED, f"{status} by BFL (not billed)")
    if status == "Error":
        return _retry(FailureReason.SERVER_ERROR, "BFL reported an error while generating")
    return None  # Pending, or a status this client does not know yet: keep polling until the deadline


def _not_found(settings: BflSettings, answer: str) -> str:
    grace = settings.task_not_found_grace_s
    return f"BFL does not know this task ({answer}, still after {grace:g} s of polling); BFL does not bill it"


def _first_problem(body: object) -> str:
    error = error_body(body)
    if error is None:
        return "no reason given"
    detail = error["detail"]
    if isinstance(detail, str):
        return detail
    first = detail[0]
    where = str(first["loc"][-1]) if first["loc"] else ""
    return f"{where}: {first['msg']}" if where else first["msg"]


def _progress_step(value: float | None) -> int | None:
    """BFL's progress as a whole percentage: floats up to 1.0 are fractions, anything else is percent."""
    if value is None or not math.isfinite(value):
        return None
    percent = value * 100 if isinstance(value, float) and value <= 1.0 else value
    return int(max(0, min(100, round(percent))))


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, min(seconds, _MAX_RETRY_AFTER_S))


def _brief(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
