"""The worker protocol: every message through its frame and back, and every way a frame can be wrong."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import pytest

from engine.backends.local.frames import read_message, read_message_blocking
from engine.backends.protocol import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MESSAGES,
    PROTOCOL_VERSION,
    Cancel,
    CancelledJob,
    Hello,
    HostBeat,
    ImageDone,
    JobSpec,
    LaneCancel,
    LaneJob,
    LaneOutcome,
    LaneResult,
    LaneStarted,
    MemoryStats,
    Message,
    MessageType,
    ProtocolError,
    Ready,
    Shutdown,
    Stats,
    StepProgress,
    WorkerFailed,
    WorkerFailure,
    decode,
    encode,
    expect,
    job_id_of,
)

PNG = b"\x89PNG\r\n\x1a\n-not-really-an-image"

# One of each message, with every optional field both set and unset somewhere.
EXAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION),
    JobSpec("j1", "schnell", "a fox", 64, 96, 4, 3.5, 7),
    JobSpec("j2", "dev", "a fox, ünïcode ✓", 1024, 1024, 28, None, 2**32 - 1),
    Cancel("j1"),
    Stats(),
    Shutdown(),
    Ready(PROTOCOL_VERSION, 4242, "cuda:0", "bfloat16", "/models/FLUX.1-schnell", 12.5),
    StepProgress("j1", 1, 4),
    StepProgress("j1", 2, 4, PNG),
    ImageDone("j1", 7, 0.5, PNG),
    WorkerFailed("j1", WorkerFailure.OOM, "CUDA out of memory"),
    WorkerFailed(None, WorkerFailure.INTERNAL, "cannot load"),
    CancelledJob("j1", 2),
    CancelledJob("j1", None),
    MemoryStats(812.5),
    MemoryStats(812.5, 30_000.0, 31_000.0, 32_000.0),
    LaneJob("j1", 1, "schnell", "a fox", 64, 96, 4, None, 7),
    LaneJob("j2", 2, "dev", "a fox, ünïcode ✓", 1024, 1024, 28, 3.5, 0),
    LaneStarted("j1", 1, "gpu-a", "worker 0 (pid 42, cuda:0)"),
    LaneResult("j1", 1, "gpu-a", LaneOutcome.DONE, seed=7, seconds=1.5, image="j1.1.png"),
    LaneResult("j1", 2, "gpu-a", LaneOutcome.FAILED, seconds=0.2, reason="oom", detail="CUDA OOM", retryable=True),
    LaneResult("j1", 3, "gpu-a", LaneOutcome.CANCELLED),
    LaneCancel("j1", 2),
    HostBeat("gpu-a", "0.1.0", PROTOCOL_VERSION, ("schnell", "dev"), 2, 1, 0.12, 3, ("j1:1",)),
    HostBeat("gpu-b", "0.1.0", PROTOCOL_VERSION, (), 1, 0, None, 0, ()),
]


BEAT = {
    "type": "host_beat",
    "host": "h",
    "version": "0.1.0",
    "protocol": PROTOCOL_VERSION,
    "models": ["schnell"],
    "slots": 1,
    "busy": 0,
    "seconds_per_step": None,
    "recycles": 0,
    "jobs": [],
}


def frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    """A frame built by hand, as a peer with a bug might send it."""
    raw = json.dumps(header).encode()
    return struct.pack(">II", len(raw), len(payload)) + raw + payload


def test_every_message_type_has_an_example() -> None:
    assert {type(message) for message in EXAMPLES} == set(MESSAGES)
    assert {cls.TYPE for cls in MESSAGES} == set(MessageType)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: f"{m.TYPE}")
def test_every_message_round_trips(message: Message) -> None:
    data = encode(message)
    assert decode(data) == message
    assert read_message_blocking(io.BytesIO(data)) == message


def test_bytes_travel_as_the_payload_not_in_the_header() -> None:
    data = encode(ImageDone("j1", 7, 0.5, PNG))
    header_len, payload_len = struct.unpack(">II", data[:8])
    assert data[8 + header_len :] == PNG and payload_len == len(PNG)
    assert json.loads(data[8 : 8 + header_len]) == {"type": "done", "id": "j1", "seed": 7, "seconds": 0.5}


def test_a_stream_of_frames_reads_in_order_then_ends() -> None:
    done = ImageDone("j1", 7, 0.5, PNG)
    stream = io.BytesIO(encode(done) + encode(Shutdown()))
    assert read_message_blocking(stream) == done
    assert read_message_blocking(stream) == Shutdown()
    assert read_message_blocking(stream) is None


async def test_frames_are_read_from_an_asyncio_stream() -> None:
    reader = asyncio.StreamReader()
    message = StepProgress("j", 1, 4, b"png")
    reader.feed_data(encode(message)[:5])
    reader.feed_data(encode(message)[5:])
    reader.feed_eof()
    assert await read_message(reader) == message
    assert await read_message(reader) is None


def test_a_bad_prefix_is_refused() -> None:
    with pytest.raises(ProtocolError, match="bad frame prefix"):  # a stray print() on the protocol stream
        read_message_blocking(io.BytesIO(b"Loading pipeline components...\n"))
    with pytest.raises(ProtocolError, match="bad frame prefix"):  # an empty header
        decode(struct.pack(">II", 0, 0))


def test_a_truncated_frame_is_refused() -> None:
    data = encode(ImageDone("j1", 7, 0.5, PNG))
    with pytest.raises(ProtocolError, match="does not match"):
        decode(data[:-1])
    with pytest.raises(ProtocolError, match="truncated"):
        decode(data[:5])
    with pytest.raises(ProtocolError, match="inside a frame prefix"):
        read_message_blocking(io.BytesIO(data[:5]))
    with pytest.raises(ProtocolError, match="inside a frame"):
        read_message_blocking(io.BytesIO(data[:-1]))


async def test_a_stream_that_ends_inside_a_frame_is_refused() -> None:
    for cut in (3, 20):
        reader = asyncio.StreamReader()
        reader.feed_data(encode(CancelledJob("j1", 2))[:cut])
        reader.feed_eof()
        with pytest.raises(ProtocolError, match="stream ended inside a frame"):
            await read_message(reader)


def test_an_oversized_frame_is_refused_both_ways() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        encode(ImageDone("j1", 7, 0.5, bytes(MAX_PAYLOAD_BYTES + 1)))
    with pytest.raises(ProtocolError, match="too large"):
        encode(WorkerFailed("j1", WorkerFailure.INTERNAL, "x" * MAX_HEADER_BYTES))
    # The prefix alone gives it away: nothing of that size is ever read or allocated.
    with pytest.raises(ProtocolError, match="bad frame prefix"):
        read_message_blocking(io.BytesIO(struct.pack(">II", 20, MAX_PAYLOAD_BYTES + 1)))
    with pytest.raises(ProtocolError, match="bad frame prefix"):
        read_message_blocking(io.BytesIO(struct.pack(">II", MAX_HEADER_BYTES + 1, 0)))


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"type": "explode"}, "unknown message type 'explode'"),
        ({"id": "j1"}, "unknown message type None"),
        ({"type": 3}, "unknown message type 3"),
    ],
)
def test_an_unknown_type_is_refused(header: dict[str, object], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(frame(header))


def test_a_header_that_is_not_a_json_object_is_refused() -> None:
    raw = b"[1, 2]"
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode(struct.pack(">II", len(raw), 0) + raw)
    raw = b"{not json"
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(struct.pack(">II", len(raw), 0) + raw)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"type": "cancel", "id": 7}, "cancel: field 'id' must be a string, got 7"),
        ({"type": "hello", "version": "3"}, "hello: field 'version' must be an integer"),
        ({"type": "hello", "version": True}, "hello: field 'version' must be an integer"),
        ({"type": "hello", "version": 3.0}, "hello: field 'version' must be an integer"),
        ({"type": "done", "id": "j", "seed": 1, "seconds": "fast"}, "done: field 'seconds' must be a number"),
        ({"type": "cancelled", "id": "j", "step": "2"}, "cancelled: field 'step' must be an integer or null"),
        ({"type": "failed", "id": "j", "reason": "bored", "detail": ""}, "failed: field 'reason' must be one of"),
        ({"type": "memory", "rss_mb": None}, "memory: field 'rss_mb' must be a number"),
        (
            {"type": "lane_result", "id": "j", "attempt": 1, "host": "h", "outcome": "done", "retryable": 1},
            "lane_result: field 'retryable' must be true or false",
        ),
        (
            {**BEAT, "models": "schnell"},
            "host_beat: field 'models' must be a list, got 'schnell'",
        ),
        (
            {**BEAT, "jobs": ["j:1", 2]},
            "host_beat: field 'jobs' must be a list of items each a string",
        ),
    ],
)
def test_wrong_field_types_are_refused(header: dict[str, object], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(frame(header))


def test_missing_fields_are_refused_and_defaults_filled() -> None:
    with pytest.raises(ProtocolError, match="job: field 'model' is missing"):
        decode(frame({"type": "job", "id": "j", "prompt": "p", "width": 64, "height": 64, "steps": 4, "seed": 1}))
    with pytest.raises(ProtocolError, match="done: field 'seed' is missing"):
        decode(frame({"type": "done", "id": "j", "seconds": 1.0}, PNG))
    # The GPU figures may be left out by a worker on a CPU; a field a newer peer adds is ignored.
    assert decode(frame({"type": "memory", "rss_mb": 10, "vram_mb": 3})) == MemoryStats(10.0)


def test_a_payload_on_a_message_without_one_is_refused() -> None:
    with pytest.raises(ProtocolError, match="cancel: carries no payload"):
        decode(frame({"type": "cancel", "id": "j"}, b"stray"))


def test_helpers_name_the_job_and_check_the_kind() -> None:
    assert job_id_of(StepProgress("j1", 1, 4)) == "j1"
    assert job_id_of(WorkerFailed(None, WorkerFailure.INTERNAL, "x")) is None
    assert job_id_of(Ready(PROTOCOL_VERSION, 1, "cpu", "float32", "m", 0.1)) is None
    memory = MemoryStats(1.0)
    assert expect(memory, MemoryStats) is memory
    with pytest.raises(ProtocolError, match="expected memory, got cancelled"):
        expect(CancelledJob("j", None), MemoryStats)
