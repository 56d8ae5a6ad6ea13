"""A fake Black Forest Labs API (aiohttp.web) that follows the documented API, with fault injection.

Two sites serve the same app: the global API host (127.0.0.1) and a second host (127.0.0.2, or another port on
127.0.0.1 where 127.0.0.2 cannot be bound) that plays a regional cluster and the signed-URL delivery host. As on the
real service, a task answers only on the host that owns it: polled elsewhere it stays Pending forever.

Scripts are lists of `Reply` consumed one per request (POST, poll, sample download, credits) before the normal
behaviour; knobs on the server set the normal behaviour (Pending polls, final status, progress, cost...). For runs
too long to script, `Faults` draws faults at random from a seed, one draw per submit (the chaos benchmark).

    async with FakeBfl(pending_polls=2, poll_host="region") as bfl:
        bfl.post_script.append(Reply(429, retry_after="3"))
        ... BflSettings(api_url=bfl.api_url) ...
        assert bfl.count("POST") == 2
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import random
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from aiohttp import web
from PIL import Image

API_KEY = "test-key-not-secret"
ENDPOINTS = ("flux-dev", "flux-pro-1.1", "flux-pro-1.1-ultra", "flux-kontext-pro", "flux-kontext-max")
MODERATED = ("Request Moderated", "Content Moderated")
# Final statuses BFL does not bill: both moderations (documented), and a task that failed or vanished on its side.
UNBILLED = (*MODERATED, "Error", "Task not found")
Host = Literal["api", "region"]


def sample_image(fmt: str = "png", size: tuple[int, int] = (8, 8)) -> bytes:
    """A real, tiny image in the requested format (PNG unless JPEG is asked for)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `status=None` answers normally after `delay_s`; `drop` closes the connection."""

    status: int | None = None
    body: Any = None
    retry_after: str | None = None
    delay_s: float = 0.0  # a hang: released early when the server stops
    drop: bool = False

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Reply:
        return cls(delay_s=seconds)

    @classmethod
    def validation_error(cls, msg: str, loc: str = "width") -> Reply:
        return cls(422, {"detail": [{"loc": ["body", loc], "msg": msg, "type": "value_error"}]})

    def response(self) -> web.StreamResponse:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        status = self.status or 200
        body = self.body if self.body is not None else {"detail": f"scripted HTTP {status}"}
        return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True)
class Faults:
    """Random faults for long runs, drawn from `seed`: one draw per submit that reaches the normal handling.

    A submit first serves any 429 burst in progress, then may start a new one; otherwise it fails with a 5xx
    (nothing accepted, nothing billed), or its task is accepted and billed but stays Pending for good (the client's
    total timeout ends it: a billed timeout), or its task ends moderated at the first poll (not billed), or it runs
    normally. The rates are probabilities per submit.
    """

    seed: int = 0
    timeout: float = 0.0
    server_error: float = 0.0
    moderated: float = 0.0
    burst_429: float = 0.0  # chance that a submit starts a burst of 429s (that submit is the burst's first)
    burst_length: tuple[int, int] = (2, 6)  # submits answered 429 per burst, both ends included
    retry_after: str = "0.05"  # the 429s' Retry-After, in seconds


@dataclass(frozen=True)
class Recorded:
    """One request as received. The x-key value is never kept, only whether one was sent."""

    method: str
    host: str  # "ip:port" of the site that received it
    path: str
    query: str
    had_key: bool
    headers: dict[str, str]
    body: Any


@dataclass
class FakeTask:
    id: str
    endpoint: str
    payload: dict[str, Any]
    owner: Host
    pending_polls: int
    final_status: str
    progress: list[float | int]
    cost: float | int | str | None = None  # credits, as the submit answered
    polls: int = 0
    active: bool = True

    @property
    def billed(self) -> bool:
        """Accepted tasks are billed whether or not anyone waits for them, except the statuses in UNBILLED."""
        return self.final_status not in UNBILLED


@dataclass
class FakeBfl:
    """The fake service. Knobs apply to tasks created after they are set."""

    api_key: str = API_KEY
    cost: float | int | str | None = 4  # credits; None leaves `cost` out of the submit answer
    costs: dict[str, float | int | str] = field(default_factory=dict)  # per endpoint, overriding `cost`
    pending_polls: int = 0  # Pending answers before the final status
    final_status: str = "Ready"  # or "Request Moderated", "Content Moderated", "Error", "Task not found"
    progress: list[float | int] = field(default_factory=list)  # sent with successive Pending answers
    poll_host: Host = "api"  # which host owns new tasks (and so appears in polling_url)
    sample_host: Host = "region"  # where signed result URLs point
    sample_status: int = 200  # 403 plays an expired signed URL
    credits: float | int = 1234.5
    active_limit: int | None = None  # like BFL's per-account cap: more active tasks -> 429

    post_script: list[Reply] = field(default_factory=list)
    poll_script: list[Reply] = field(default_factory=list)
    sample_script: list[Reply] = field(default_factory=list)
    credits_script: list[Reply] = field(default_factory=list)
    faults: Faults | None = None

    requests: list[Recorded] = field(default_factory=list)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    active: int = 0
    max_active: int = 0
    injected: Counter[str] = field(default_factory=Counter)  # faults drawn from `faults`, by kind

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._bases: dict[Host, str] = {}
        self._ids = itertools.count(1)
        self._random = random.Random(self.faults.seed if self.faults else 0)
        self._burst_left = 0

    # ---- lifecycle ----

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/{endpoint}", self._submit)
        app.router.add_get("/v1/get_result", self._poll)
        app.router.add_get("/v1/credits", self._credits)
        app.router.add_get("/samples/{name}", self._sample)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        sites: tuple[tuple[Host, str], ...] = (("api", "127.0.0.1"), ("region", "127.0.0.2"))
        for host, address in sites:
            sock = _bound_socket(address)
            ip, port = sock.getsockname()[:2]
            await web.SockSite(self._runner, sock).start()
            self._bases[host] = f"http://{ip}:{port}"

    async def stop(self) -> None:
        self._stopping.set()  # releases hung handlers so shutdown does not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeBfl:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def api_url(self) -> str:
        return self._bases["api"]

    @property
    def region_url(self) -> str:
        return self._bases["region"]

    def hostport(self, host: Host) -> str:
        return self._bases[host].removeprefix("http://")

    # ---- what tests assert on ----

    def count(self, method: str, path_prefix: str = "/v1/") -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.startswith(path_prefix))

    def polls(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/get_result"]

    def downloads(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/samples/")]

    def billed(self) -> dict[str, Decimal]:
        """What the account was billed, in credits, per task id (tasks answered without a cost are left out)."""
        return {t.id: Decimal(str(t.cost)) for t in self.tasks.values() if t.billed and t.cost is not None}

    def add_task(self, endpoint: str = "flux-pro-1.1", **payload: Any) -> tuple[str, str]:
        """A task accepted earlier (before a restart): returns (id, polling_url) without a POST."""
        task = self._new_task(endpoint, {"prompt": "resumed", **payload})
        return task.id, self._polling_url(task)

    # ---- handlers ----

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        scripted = await self._scripted(request, self.post_script)
        if scripted is not None:
            return scripted
        if request.headers.get("x-key") != self.api_key:
            return web.json_response({"detail": "Not authenticated"}, status=403)
        endpoint = request.match_info["endpoint"]
        if endpoint not in ENDPOINTS:
            return web.json_response({"detail": "Not Found"}, status=404)
        problem = _validate(endpoint, body)
        if problem is not None:
            return Reply.validation_error(problem[1], problem[0]).response()
        if self.active_limit is not None and self.active >= self.active_limit:
            return web.json_response({"detail": "too many active tasks"}, status=429, headers={"Retry-After": "1"})
        fault = self._draw_fault()
        if fault == "429":
            assert self.faults is not None
            headers = {"Retry-After": self.faults.retry_after}
            return web.json_response({"detail": "too many requests"}, status=429, headers=headers)
        if fault == "server_error":
            status = self._random.choice((500, 502, 503))
            return web.json_response({"detail": f"injected HTTP {status}"}, status=status)
        task = self._new_task(endpoint, body)
        if fault == "timeout":
            task.pending_polls = sys.maxsize  # billed, and never Ready however long the client polls
        elif fault == "moderated":
            # At the first poll, so that no client gives up on it first and counts it as a billed timeout.
            task.pending_polls, task.final_status = 0, self._random.choice(MODERATED)
        answer: dict[str, Any] = {"id": task.id, "polling_url": self._polling_url(task)}
        if task.cost is not None:
            answer.update(cost=task.cost, input_mp=0, output_mp=1.0)
        return web.json_response(answer)

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        scripted = await self._scripted(request, self.poll_script)
        if scripted is not None:
            return scripted
        if request.headers.get("x-key") != self.api_key:
            return web.json_response({"detail": "Not authenticated"}, status=403)
        task_id = request.query.get("id", "")
        task = self.tasks.get(task_id)
        if task is None:
            return web.json_response({"id": task_id, "status": "Task not found", "result": None})
        if self._host_of(request) != task.owner:
            # The documented trap: another cluster does not know the task and keeps saying Pending.
            return web.json_response({"id": task.id, "status": "Pending", "result": None, "progress": None})
        task.polls += 1
        if task.polls <= task.pending_polls:
            index = task.polls - 1
            progress = task.progress[index] if index < len(task.progress) else None
            return web.json_response({"id": task.id, "status": "Pending", "result": None, "progress": progress})
        self._finish(task)
        answer: dict[str, Any] = {"id": task.id, "status": task.final_status, "result": None, "progress": None}
        if task.final_status == "Ready":
            fmt = task.payload.get("output_format", "png")
            sample = f"{self._bases[self.sample_host]}/samples/{task.id}.{fmt}?se=2026-01-01T00%3A10%3A00Z&sig=fake"
            answer["result"] = {
                "sample": sample,
                "prompt": task.payload.get("prompt"),
                "seed": task.payload.get("seed"),
            }
        elif task.final_status in MODERATED:
            answer["details"] = {"Moderation Reasons": ["Derivative Works Filter"]}
        return web.json_response(answer)

    async def _sample(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        scripted = await self._scripted(request, self.sample_script)
        if scripted is not None:
            return scripted
        if self.sample_status != 200:
            return web.Response(status=self.sample_status, text="<Error><Code>AuthenticationFailed</Code></Error>")
        name = request.match_info["name"]
        fmt = "jpeg" if name.endswith(".jpeg") else "png"
        return web.Response(body=sample_image(fmt), content_type=f"image/{fmt}")

    async def _credits(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        scripted = await self._scripted(request, self.credits_script)
        if scripted is not None:
            return scripted
        if request.headers.get("x-key") != self.api_key:
            return web.json_response({"detail": "Not authenticated"}, status=403)
        return web.json_response({"credits": self.credits})

    # ---- helpers ----

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        sockname = request.transport.get_extra_info("sockname") if request.transport else ("?", 0)
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "x-key"}
        self.requests.append(
            Recorded(
                method=request.method,
                host=f"{sockname[0]}:{sockname[1]}",
                path=request.path,
                query=request.query_string,
                had_key="x-key" in request.headers,
                headers=headers,
                body=body,
            )
        )
        return body

    async def _scripted(self, request: web.Request, script: list[Reply]) -> web.StreamResponse | None:
        if not script:
            return None
        reply = script.pop(0)
        if reply.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay_s)
        if reply.drop and request.transport is not None:
            request.transport.abort()  # the client sees the connection reset with no answer
            raise asyncio.CancelledError
        if reply.status is None:
            return None
        return reply.response()

    def _draw_fault(self) -> str | None:
        """The fault for this submit ('429', 'server_error', 'timeout', 'moderated'), or None; counted in `injected`."""
        faults = self.faults
        if faults is None:
            return None
        fault: str | None = None
        if self._burst_left:
            self._burst_left -= 1
            fault = "429"
        elif self._random.random() < faults.burst_429:
            self._burst_left = self._random.randint(*faults.burst_length) - 1
            self.injected["429 burst"] += 1
            fault = "429"
        else:
            draw = self._random.random()
            for kind, rate in (
                ("server_error", faults.server_error),
                ("timeout", faults.timeout),
                ("moderated", faults.moderated),
            ):
                if draw < rate:
                    fault = kind
                    break
                draw -= rate
        if fault is not None:
            self.injected[fault] += 1
        return fault

    def _new_task(self, endpoint: str, payload: dict[str, Any]) -> FakeTask:
        task = FakeTask(
            id=f"task-{next(self._ids):04d}",
            endpoint=endpoint,
            payload=payload,
            owner=self.poll_host,
            pending_polls=self.pending_polls,
            final_status=self.final_status,
            progress=list(self.progress),
            cost=self.costs.get(endpoint, self.cost),
        )
        self.tasks[task.id] = task
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        return task

    def _finish(self, task: FakeTask) -> None:
        if task.active:
            task.active = False
            self.active -= 1

    def _polling_url(self, task: FakeTask) -> str:
        return f"{self._bases[task.owner]}/v1/get_result?id={task.id}"

    def _host_of(self, request: web.Request) -> Host:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        here = f"http://{sockname[0]}:{sockname[1]}" if sockname else ""
        return "region" if here == self._bases["region"] else "api"


def _validate(endpoint: str, body: Any) -> tuple[str, str] | None:
    """The few checks the real API makes that a client could get wrong: (field, message) or None."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return "prompt", "Field required"
    if endpoint in ("flux-dev", "flux-pro-1.1"):
        for side in ("width", "height"):
            value = body.get(side, 1024)
            if not isinstance(value, int) or not 256 <= value <= 1440 or value % 32:
                return side, "Input should be a multiple of 32 between 256 and 1440"
    if endpoint.startswith("flux-kontext") and not body.get("input_image"):
        return "input_image", "Field required"
    return None


def _bound_socket(address: str) -> socket.socket:
    """A listening-ready socket on an ephemeral port; 127.0.0.1 stands in where another loopback IP is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, 0))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    return sock
