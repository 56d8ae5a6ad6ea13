"""Frames of the worker protocol (engine/backends/protocol.py) read off a stream, asynchronously or blocking.

The supervisor reads a worker's frames from an asyncio stream; the worker reads the supervisor's from a blocking
pipe or socket on its inbox thread. Both read the 8-byte prefix, then exactly the lengths it announces.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from engine.backends.protocol import PREFIX, Message, ProtocolError, frame_lengths, parse

log = logging.getLogger(__name__)


class ByteSource(Protocol):
    """A blocking binary stream: a pipe's file object, or a socket's unbuffered one (whose `read` types say None)."""

    def read(self, size: int, /) -> bytes | None: ...


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message from a stream, or None at a clean end of stream (between frames)."""
    try:
        prefix = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame prefix") from exc
        return None
    header_len, payload_len = frame_lengths(prefix)
    try:
        header = await reader.readexactly(header_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc
    return parse(header, payload)


def read_message_blocking(stream: ByteSource) -> Message | None:
    """As read_message, for a blocking binary stream (a worker's stdin or socket)."""
    prefix = _read_exactly(stream, PREFIX.size)
    if not prefix:
        return None
    if len(prefix) < PREFIX.size:
        raise ProtocolError("stream ended inside a frame prefix")
    header_len, payload_len = frame_lengths(prefix)
    header = _read_exactly(stream, header_len)
    payload = _read_exactly(stream, payload_len)
    if len(header) < header_len or len(payload) < payload_len:
        raise ProtocolError("stream ended inside a frame")
    return parse(header, payload)


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
