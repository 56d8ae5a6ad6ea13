"""A fake systemd NOTIFY_SOCKET: a bound Unix datagram socket that keeps what a service sends, in order."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile


class NotifyListener:
    """`NOTIFY_SOCKET=listener.address`; then `await listener.until("READY=1")`. Close it when done."""

    def __init__(self) -> None:
        # sun_path holds about 107 bytes, which pytest's tmp_path can exceed: a short folder of its own under /tmp.
        self._folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
        self.address = os.path.join(self._folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: list[str] = []  # every datagram received so far

    async def recv(self, limit_s: float = 10.0) -> str:
        """The next datagram (the limit only guards against a hung test)."""
        loop = asyncio.get_running_loop()
        message = (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), limit_s)).decode()
        self.messages.append(message)
        return message

    async def until(self, message: str, limit_s: float = 60.0) -> list[str]:
        """Datagrams received from now up to and including `message`."""
        seen: list[str] = []
        while message not in seen:
            seen.append(await self.recv(limit_s))
        return seen

    def drain(self) -> list[str]:
        """Every datagram already waiting, without waiting and without yielding to the event loop."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                self.messages.extend(out)
                return out

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)
