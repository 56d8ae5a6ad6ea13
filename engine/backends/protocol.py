"""The job protocol between the supervisor and a worker, independent of the transport that carries it.

A frame is a fixed 8-byte prefix (header length, payload length; both unsigned 32-bit big-endian), a UTF-8 JSON
header object with at least `"type"`, and an optional binary payload (PNG bytes), so images never pass through
base64. The same frames travel over a worker's stdin/stdout or its Unix socket today, and as NATS JetStream message
bodies later (one frame per message).

Each message is one frozen dataclass below. Its fields are the header's fields, except a `bytes` field, which is
the payload; `encode` and `decode` are the one path between a message and a frame, checking every field against
the dataclass's annotations, so a peer's mistake is a `ProtocolError` naming the message and the field.

Version 3 messages (supervisor -> worker):
    hello    {version}                                      first frame; the worker answers `ready` once loaded
    job      {id, model, prompt, width, height, steps, guidance, seed, task, strength}  + input image payload
                                                            (PNG; none for text to image)
    cancel   {id}                                           may come while that job runs; always answered by
                                                            `cancelled`, also when no such job runs (any more)
    stats    {}                                             answered by `memory`
    shutdown {}                                             the worker exits cleanly
Worker -> supervisor:
    ready     {version, pid, device, dtype, model, load_s, styles}
    progress  {id, step, total}          + preview PNG payload (optional)
    done      {id, seed, seconds}        + PNG payload
    failed    {id, reason: "oom" | "internal", detail}      id is null for a failure outside any job
    cancelled {id, step}                 the job stopped after `step` steps, or null: it was not running (it had
                                         ended, or never came); nothing about that job follows, and the next
                                         frame the worker reads is served as by a fresh worker
    memory    {rss_mb, allocated_mb, reserved_mb, max_allocated_mb}   GPU figures are null on a CPU

Version 2 added cancel/cancelled, version 3 the job's model and version 4 its task, strength and input image: a
supervisor relies on all of them, so each side refuses a peer of another version at hello.

Between the engine and a GPU host, over NATS (engine/backends/nats.py, engine/gpu_host.py), one frame per message:
    lane_job     {id, attempt, model, prompt, width, height, steps, guidance, seed, task, strength, input_image}
                                                                                       on flux.jobs.<model>
    lane_started {id, attempt, host, worker}                                           on flux.events.<id>.<attempt>
    progress     as above                                                              on flux.events.<id>.<attempt>
    lane_result  {id, attempt, host, outcome, seed, seconds, reason, detail, retryable, image}  on flux.results.<id>
    lane_cancel  {id, attempt}        stop that attempt and any older one                on flux.cancel.<id>
    host_beat    {host, version, protocol, models, slots, busy, seconds_per_step, recycles, jobs}  in the hosts' KV
A result's image, and a job's input image, are names of objects in the images bucket (a message is limited to
1 MiB, an image is not).
`protocol` in a heartbeat is `PROTOCOL_VERSION`: the engine gives jobs only to hosts that speak its own.
"""

from __future__ import annotations

import json
import logging
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from engine.errors import EngineError
from engine.models import BackendJob, Mode, ResolvedRequest, Task

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 5

PREFIX = struct.Struct(">II")
# Bounds that catch a stray print() on the protocol stream long before it could make us allocate gigabytes.
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 256 << 20


class ProtocolError(EngineError):
    """The peer sent something that is not a valid frame or message of this protocol version."""


class MessageType(StrEnum):
    HELLO = "hello"
    JOB = "job"
    CANCEL = "cancel"
    STATS = "stats"
    SHUTDOWN = "shutdown"
    READY = "ready"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    MEMORY = "memory"
    LANE_JOB = "lane_job"
    LANE_STARTED = "lane_started"
    LANE_RESULT = "lane_result"
    LANE_CANCEL = "lane_cancel"
    HOST_BEAT = "host_beat"


class WorkerFailure(StrEnum):
    OOM = "oom"
    INTERNAL = "internal"


class Message:
    """One protocol message: a frozen dataclass whose `TYPE` names it on the wire."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]


# ---- supervisor -> worker ----


@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[MessageType] = MessageType.HELLO
    version: int


@dataclass(frozen=True, slots=True)
class JobSpec(Message):
    """The `job` message: everything a worker needs to make one image."""

    TYPE: ClassVar[MessageType] = MessageType.JOB
    id: str
    model: str  # the configured model's name: what a worker serving several would pick by
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int
    task: Task = Task.GENERATE
    strength: float | None = None  # image to image: how far from the input (0 = the same, 1 = unrelated)
    image: bytes = b""  # the input image (PNG), for an edit or image to image
    style: str = ""  # the style whose adapters the worker sets for this job ("": the base model)

    @classmethod
    def of(cls, job: BackendJob) -> JobSpec:
        r = job.request
        return cls(
            job.job_id, r.model, r.for_model, r.width, r.height, r.steps, r.guidance, r.seed, r.task, r.strength,
            job.input_image or b"", r.style or "",
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    TYPE: ClassVar[MessageType] = MessageType.CANCEL
    id: str


@dataclass(frozen=True, slots=True)
class Stats(Message):
    TYPE: ClassVar[MessageType] = MessageType.STATS


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    TYPE: ClassVar[MessageType] = MessageType.SHUTDOWN


# ---- worker -> supervisor ----


@dataclass(frozen=True, slots=True)
class Ready(Message):
    TYPE: ClassVar[MessageType] = MessageType.READY
    version: int
    pid: int
    device: str
    dtype: str
    model: str  # what the worker loaded: a folder or a Hugging Face id
    load_s: float
    styles: tuple[str, ...] = ()  # the LoRA styles whose adapters it loaded


@dataclass(frozen=True, slots=True)
class StepProgress(Message):
    """The `progress` message: `step` of `total` steps made, with a small preview PNG every few steps."""

    TYPE: ClassVar[MessageType] = MessageType.PROGRESS
    id: str
    step: int
    total: int
    preview: bytes = b""


@dataclass(frozen=True, slots=True)
class ImageDone(Message):
    """The `done` message: the job's PNG and the seconds the pipeline took."""

    TYPE: ClassVar[MessageType] = MessageType.DONE
    id: str
    seed: int
    seconds: float
    image: bytes


@dataclass(frozen=True, slots=True)
class WorkerFailed(Message):
    """The `failed` message; `id` is None for a failure outside any job (at start-up, an unexpected message)."""

    TYPE: ClassVar[MessageType] = MessageType.FAILED
    id: str | None
    reason: WorkerFailure
    detail: str


@dataclass(frozen=True, slots=True)
class CancelledJob(Message):
    """The `cancelled` message: the worker's answer to `cancel`, after which it is free for the next job."""

    TYPE: ClassVar[MessageType] = MessageType.CANCELLED
    id: str
    step: int | None  # the steps the job made before it stopped; None when it was not running


@dataclass(frozen=True, slots=True)
class MemoryStats(Message):
    """The `memory` message. GPU figures are None when the worker runs on a CPU."""

    TYPE: ClassVar[MessageType] = MessageType.MEMORY
    rss_mb: float
    allocated_mb: float | None = None
    reserved_mb: float | None = None
    max_allocated_mb: float | None = None

    @property
    def slack_mb(self) -> float:
        """Memory the caching allocator holds but no tensor uses: fragmentation that only a restart returns."""
        if self.reserved_mb is None or self.allocated_mb is None:
            return 0.0
        return self.reserved_mb - self.allocated_mb


# ---- between the engine and GPU hosts (over NATS) ----


class LaneOutcome(StrEnum):
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class LaneJob(Message):
    """A job for any GPU host serving `model`; `attempt` tells a retry from the first run (its message id is
    `<id>:<attempt>`, so a publish repeated after a restart is dropped by JetStream's dedupe window)."""

    TYPE: ClassVar[MessageType] = MessageType.LANE_JOB
    id: str
    attempt: int
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int
    task: Task = Task.GENERATE
    strength: float | None = None
    input_image: str | None = None  # its object in the images bucket
    style: str = ""  # "": the base model

    @classmethod
    def of(cls, job: BackendJob, input_image: str | None) -> LaneJob:
        """The job of the bot's scheduler as a host takes it; `input_image` names its input in the images bucket."""
        r = job.request
        return cls(
            job.job_id, job.attempt, r.model, r.for_model, r.width, r.height, r.steps, r.guidance, r.seed, r.task,
            r.strength, input_image, r.style or "",
        )  # fmt: skip

    def backend_job(self, image: bytes | None) -> BackendJob:
        """The job for the host's own supervisor (which serves it as the GPU lane would: relax, no money)."""
        request = ResolvedRequest(
            self.prompt, self.model, self.width, self.height, "", self.steps, self.guidance, self.seed, Mode.RELAX,
            task=self.task, strength=self.strength, style=self.style or None,
        )  # fmt: skip
        return BackendJob(self.id, request, attempt=self.attempt, input_image=image)


@dataclass(frozen=True, slots=True)
class LaneStarted(Message):
    """A host took the job: which host and worker (who is then answerable for it through its heartbeat)."""

    TYPE: ClassVar[MessageType] = MessageType.LANE_STARTED
    id: str
    attempt: int
    host: str
    worker: str


@dataclass(frozen=True, slots=True)
class LaneResult(Message):
    """How a job ended on a host. Done: `image` names the PNG in the images bucket. Failed: `reason` is a
    FailureReason's value, `retryable` whether the scheduler may run it again."""

    TYPE: ClassVar[MessageType] = MessageType.LANE_RESULT
    id: str
    attempt: int
    host: str
    outcome: LaneOutcome
    seed: int | None = None
    seconds: float | None = None
    reason: str = ""
    detail: str = ""
    retryable: bool = False
    image: str | None = None


@dataclass(frozen=True, slots=True)
class LaneCancel(Message):
    """The bot gave up `attempt` of a job (cancelled, or declared it lost): a host stops it, and any older one,
    whether it runs or has yet to be taken; a later attempt (a retry) is not touched."""

    TYPE: ClassVar[MessageType] = MessageType.LANE_CANCEL
    id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class HostBeat(Message):
    """A GPU host's heartbeat: what it serves and how busy it is. `jobs` are the `<id>:<attempt>` it holds."""

    TYPE: ClassVar[MessageType] = MessageType.HOST_BEAT
    host: str
    version: str
    protocol: int
    models: tuple[str, ...]
    slots: int
    busy: int
    seconds_per_step: float | None
    recycles: int
    jobs: tuple[str, ...]
    styles: tuple[str, ...] = ()  # the styles with adapters its workers have loaded (styles without any run anywhere)


MESSAGES: tuple[type[Message], ...] = (
    Hello,
    JobSpec,
    Cancel,
    Stats,
    Shutdown,
    Ready,
    StepProgress,
    ImageDone,
    WorkerFailed,
    CancelledJob,
    MemoryStats,
    LaneJob,
    LaneStarted,
    LaneResult,
    LaneCancel,
    HostBeat,
)

M = TypeVar("M", bound=Message)


def job_id_of(message: Message) -> str | None:
    """The job a message is about, or None for one about no job (ready, memory, a failure outside a job)."""
    value = getattr(message, "id", None)
    return value if isinstance(value, str) else None


def expect(message: Message, kind: type[M]) -> M:
    """`message` as a `kind`, or ProtocolError when the peer sent something else at this point."""
    if not isinstance(message, kind):
        raise ProtocolError(f"expected {kind.TYPE}, got {message.TYPE}")
    return message


# ---- the one path between messages and frames ----

# Turns a header value into the field's value, or raises ValueError saying what was expected.
_Check = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    check: _Check
    required: bool
    default: Any


@dataclass(frozen=True, slots=True)
class _Layout:
    header: tuple[_Field, ...]
    payload: str | None  # the name of the `bytes` field


def _scalar(annotation: Any) -> _Check:
    if annotation is str:

        def text(value: Any) -> str:
            if not isinstance(value, str):
                raise ValueError("a string")
            return value

        return text
    if annotation is bool:

        def boolean(value: Any) -> bool:
            if not isinstance(value, bool):
                raise ValueError("true or false")
            return value

        return boolean
    if annotation is int:

        def integer(value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("an integer")
            return value

        return integer
    if annotation is float:

        def number(value: Any) -> float:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError("a number")
            return float(value)

        return number
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        choices = annotation

        def choice(value: Any) -> StrEnum:
            try:
                return choices(value)
            except ValueError:
                raise ValueError(f"one of {', '.join(map(repr, (c.value for c in choices)))}") from None

        return choice
    raise TypeError(f"no protocol encoding for {annotation!r}")


def _checker(annotation: Any) -> _Check:
    if typing.get_origin(annotation) is tuple:
        item, ellipsis = typing.get_args(annotation)
        if ellipsis is not Ellipsis:
            raise TypeError(f"no protocol encoding for {annotation!r}")
        check_item = _scalar(item)

        def sequence(value: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise ValueError("a list")
            try:
                return tuple(check_item(element) for element in value)
            except ValueError as exc:
                raise ValueError(f"a list of items each {exc}") from None

        return sequence
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) != 1 or len(typing.get_args(annotation)) != 2:
            raise TypeError(f"no protocol encoding for {annotation!r}")
        inner = _scalar(members[0])

        def optional(value: Any) -> Any:
            if value is None:
                return None
            try:
                return inner(value)
            except ValueError as exc:
                raise ValueError(f"{exc} or null") from None

        return optional
    return _scalar(annotation)


def _layout(cls: type[Message]) -> _Layout:
    hints = typing.get_type_hints(cls)
    header: list[_Field] = []
    payload: str | None = None
    for f in fields(cls):  # type: ignore[arg-type]  # every message class is a dataclass
        annotation = hints[f.name]
        if annotation is bytes:
            if payload is not None:
                raise TypeError(f"{cls.__name__} has two payload fields")
            payload = f.name
            continue
        default = None if f.default is MISSING else f.default
        header.append(_Field(f.name, _checker(annotation), f.default is MISSING, default))
    return _Layout(tuple(header), payload)


_LAYOUTS: dict[type[Message], _Layout] = {cls: _layout(cls) for cls in MESSAGES}
_BY_TYPE: dict[str, type[Message]] = {cls.TYPE.value: cls for cls in MESSAGES}


def encode(message: Message) -> bytes:
    """The frame that carries `message`; ProtocolError when it exceeds the frame bounds."""
    layout = _LAYOUTS[type(message)]
    header_fields: dict[str, Any] = {"type": message.TYPE.value}
    for f in layout.header:
        value = getattr(message, f.name)
        header_fields[f.name] = list(value) if isinstance(value, tuple) else value
    payload: bytes = getattr(message, layout.payload) if layout.payload else b""
    header = json.dumps(header_fields, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"{message.TYPE}: frame too large")
    return PREFIX.pack(len(header), len(payload)) + header + payload


def frame_lengths(prefix: bytes) -> tuple[int, int]:
    """The header and payload lengths that a frame's 8-byte prefix announces, checked against the bounds."""
    header_len, payload_len = PREFIX.unpack(prefix)
    if not 0 < header_len <= MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"bad frame prefix {prefix!r} (is something else writing to this stream?)")
    return header_len, payload_len


def parse(header: bytes, payload: bytes) -> Message:
    """The message of one frame's header and payload."""
    try:
        values = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ProtocolError("frame header is not a JSON object")
    kind = values.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r} in {header[:80]!r}")
    layout = _LAYOUTS[cls]
    arguments: dict[str, Any] = {}
    for f in layout.header:
        if f.name not in values:
            if f.required:
                raise ProtocolError(f"{kind}: field {f.name!r} is missing")
            arguments[f.name] = f.default
            continue
        try:
            arguments[f.name] = f.check(values[f.name])
        except ValueError as exc:
            raise ProtocolError(f"{kind}: field {f.name!r} must be {exc}, got {values[f.name]!r}") from None
    if layout.payload is not None:
        arguments[layout.payload] = payload
    elif payload:
        raise ProtocolError(f"{kind}: carries no payload, got {len(payload)} bytes")
    return cls(**arguments)


def decode(data: bytes) -> Message:
    """The message of one whole frame (e.g. a message body from a queue)."""
    if len(data) < PREFIX.size:
        raise ProtocolError("truncated frame")
    header_len, payload_len = frame_lengths(data[: PREFIX.size])
    if len(data) != PREFIX.size + header_len + payload_len:
        raise ProtocolError("frame length does not match its prefix")
    body = data[PREFIX.size :]
    return parse(body[:header_len], body[header_len:])
