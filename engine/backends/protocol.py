"""The job protocol between the supervisor and a worker, independent of the transport that carries it.

A frame is a fixed 8-byte prefix (header length, payload length; both unsigned 32-bit big-endian), a UTF-8 JSON
header object with at least `"type"`, and an optional binary payload (PNG bytes), so images never pass through
base64. The same frames travel over a worker's stdin/stdout or its Unix socket today, and as NATS JetStream message
bodies later (one frame per message).

Version 2 messages (supervisor -> worker):
    hello    {version}                                      first frame; the worker answers `ready` once loaded
    job      {id, prompt, width, height, steps, guidance, seed}
    cancel   {id}                                           may come while that job runs; always answered by
                                                            `cancelled`, also when no such job runs (any more)
    stats    {}                                             answered by `memory`
    shutdown {}                                             the worker exits cleanly
Worker -> supervisor:
    ready     {version, pid, device, dtype, model, load_s}
    progress  {id, step, total}          + preview PNG payload (optional)
    done      {id, seed, seconds}        + PNG payload
    failed    {id, reason: "oom" | "internal", detail}      id is null for a failure outside any job
    cancelled {id, step}                 the job stopped after `step` steps, or null: it was not running (it had
                                         ended, or never came); nothing about that job follows, and the next
                                         frame the worker reads is served as by a fresh worker
    memory    {rss_mb, allocated_mb, reserved_mb, max_allocated_mb}   GPU figures are null on a CPU

Version 2 added cancel/cancelled: a supervisor relies on the answer, so it refuses a version 1 worker at hello.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

PROTOCOL_VERSION = 2

_PREFIX = struct.Struct(">II")
# Bounds that catch a stray print() on the protocol stream long before it could make us allocate gigabytes.
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 256 << 20


class ByteSource(Protocol):
    """A blocking binary stream: a pipe's file object, or a socket's unbuffered one (whose `read` types say None)."""

    def read(self, size: int, /) -> bytes | None: ...


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of this protocol version."""


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


class WorkerFailure(StrEnum):
    OOM = "oom"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Frame:
    type: MessageType
    header: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def text(self, key: str) -> str:
        value = self.header.get(key)
        if not isinstance(value, str):
            raise ProtocolError(f"{self.type}: field {key!r} must be a string, got {value!r}")
        return value

    def integer(self, key: str) -> int:
        value = self.header.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{self.type}: field {key!r} must be an integer, got {value!r}")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.header.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self.header.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"{self.type}: field {key!r} must be a number, got {value!r}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.header.get(key) is None else self.number(key)


def encode(frame: Frame) -> bytes:
    header = json.dumps({**frame.header, "type": frame.type.value}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES or len(frame.payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"{frame.type}: frame too large")
    return _PREFIX.pack(len(header), len(frame.payload)) + header + frame.payload


def _lengths(prefix: bytes) -> tuple[int, int]:
    header_len, payload_len = _PREFIX.unpack(prefix)
    if not 0 < header_len <= MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"bad frame prefix {prefix!r} (is something else writing to this stream?)")
    return header_len, payload_len


def _parse(header: bytes, payload: bytes) -> Frame:
    try:
        fields = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise ProtocolError("frame header is not a JSON object")
    try:
        kind = MessageType(fields.pop("type", None))
    except ValueError as exc:
        raise ProtocolError(f"unknown message type in {header[:80]!r}") from exc
    return Frame(kind, fields, payload)


def decode(data: bytes) -> Frame:
    """One whole frame (e.g. a message body from a queue)."""
    if len(data) < _PREFIX.size:
        raise ProtocolError("truncated frame")
    header_len, payload_len = _lengths(data[: _PREFIX.size])
    if len(data) != _PREFIX.size + header_len + payload_len:
        raise ProtocolError("frame length does not match its prefix")
    body = data[_PREFIX.size :]
    return _parse(body[:header_len], body[header_len:])


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame from a stream, or None at a clean end of stream (between frames)."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame prefix") from exc
        return None
    header_len, payload_len = _lengths(prefix)
    try:
        header = await reader.readexactly(header_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc
    return _parse(header, payload)


def read_frame_blocking(stream: ByteSource) -> Frame | None:
    """As read_frame, for a blocking binary stream (a worker's stdin or socket)."""
    prefix = _read_exactly(stream, _PREFIX.size)
    if not prefix:
        return None
    if len(prefix) < _PREFIX.size:
        raise ProtocolError("stream ended inside a frame prefix")
    header_len, payload_len = _lengths(prefix)
    header = _read_exactly(stream, header_len)
    payload = _read_exactly(stream, payload_len)
    if len(header) < header_len or len(payload) < payload_len:
        raise ProtocolError("stream ended inside a frame")
    return _parse(header, payload)


def _read_exactly(stream: ByteSource, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """The `job` message: everything a worker needs to make one image."""

    id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int

    def to_frame(self) -> Frame:
        return Frame(
            MessageType.JOB,
            {
                "id": self.id,
                "prompt": self.prompt,
                "width": self.width,
                "height": self.height,
                "steps": self.steps,
                "guidance": self.guidance,
                "seed": self.seed,
            },
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> JobSpec:
        return cls(
            id=frame.text("id"),
            prompt=frame.text("prompt"),
            width=frame.integer("width"),
            height=frame.integer("height"),
            steps=frame.integer("steps"),
            guidance=frame.optional_number("guidance"),
            seed=frame.integer("seed"),
        )


@dataclass(frozen=True, slots=True)
class CancelledJob:
    """The `cancelled` message: the worker's answer to `cancel`, after which it is free for the next job."""

    id: str
    step: int | None  # the steps the job made before it stopped; None when it was not running

    def to_frame(self) -> Frame:
        return Frame(MessageType.CANCELLED, {"id": self.id, "step": self.step})

    @classmethod
    def from_frame(cls, frame: Frame) -> CancelledJob:
        return cls(id=frame.text("id"), step=frame.optional_integer("step"))


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """The `memory` message. GPU figures are None when the worker runs on a CPU."""

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

    def to_frame(self) -> Frame:
        return Frame(
            MessageType.MEMORY,
            {
                "rss_mb": self.rss_mb,
                "allocated_mb": self.allocated_mb,
                "reserved_mb": self.reserved_mb,
                "max_allocated_mb": self.max_allocated_mb,
            },
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> MemoryStats:
        return cls(
            rss_mb=frame.number("rss_mb"),
            allocated_mb=frame.optional_number("allocated_mb"),
            reserved_mb=frame.optional_number("reserved_mb"),
            max_allocated_mb=frame.optional_number("max_allocated_mb"),
        )
