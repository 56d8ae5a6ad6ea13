"""GPU host processes (`flux-bot worker --nats URL`) for the lane's tests and benchmarks, and an observer of the lane.

`GpuHosts` starts real host processes, each with its own config file and state folder, and kills what is left at
the end. `LaneObserver` subscribes to the lane's core event subjects, so a test can see which host started which
job and with which worker process (to kill it mid-job).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from engine.backends.protocol import LaneStarted, ProtocolError, StepProgress, decode

ROOT = Path(__file__).resolve().parents[2]

# Short intervals for tests, yet wide enough that a busy 2-core CI box never misses a beat by chance: a host is gone
# after 5 s of silence, a job lost after 10 s unheard of.
FAST_LANE = {"heartbeat_interval_s": 0.25, "heartbeat_ttl_s": 5.0, "ack_wait_s": 10.0}


# The tiny model on a CPU: nothing to warm up or compile, previews every other step, one OpenMP thread per worker.
QUICK_LOCAL: dict[str, object] = {"device": "cpu", "warmup": False, "preview_every": 2}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def host_config(
    state_dir: Path, nats: Mapping[str, object] = FAST_LANE, local: Mapping[str, object] = QUICK_LOCAL
) -> str:
    lines = ["[bot]", f'state_dir = "{state_dir}"', "", "[nats]"]
    lines += [f"{key} = {_toml(value)}" for key, value in nats.items()]
    lines += ["", "[local]"]
    lines += [f"{key} = {_toml(value)}" for key, value in local.items()]
    return "\n".join(lines) + "\n"


@dataclass
class GpuHost:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class GpuHosts:
    folder: Path
    url: str
    nats: Mapping[str, object] = field(default_factory=lambda: dict(FAST_LANE))
    local: Mapping[str, object] = field(default_factory=lambda: dict(QUICK_LOCAL))
    started: list[GpuHost] = field(default_factory=list)

    async def start(
        self,
        name: str,
        *,
        synthetic_s: float | None = None,
        model_path: Path | None = None,
        gpus: str = "",
        models: str = "schnell",
        env: Mapping[str, str] | None = None,
        extra: tuple[str, ...] = (),
        config_tail: str = "",
    ) -> GpuHost:
        """`config_tail`: more of the host's config.toml, e.g. its [styles.*] tables."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "config.toml"
        config.write_text(host_config(folder / "state", self.nats, self.local) + config_tail)
        argv = [sys.executable, "-m", "bot", "worker", "--nats", self.url, "--config", str(config), "--name", name]
        if synthetic_s is not None:
            argv += ["--synthetic-for-bench", str(synthetic_s)]
        if model_path is not None:
            argv += ["--model-path", str(model_path)]
        if gpus:
            argv += ["--gpus", gpus]
        argv += ["--models", models, *extra]
        log = folder / "host.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        environment["PYTHONPATH"] = str(ROOT)
        environment["OMP_NUM_THREADS"] = "1"  # threads that outnumber the cores spin-wait
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=out, env={**environment, **(env or {})}, cwd=folder
            )
        host = GpuHost(name, process, log)
        self.started.append(host)
        return host

    async def stop(self, host: GpuHost) -> int:
        if host.process.returncode is None:
            host.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(host.process.wait(), 30)

    async def kill(self, host: GpuHost) -> None:
        """SIGKILL the host process (its workers see their pipe close and exit by themselves)."""
        if host.process.returncode is None:
            host.process.kill()
        await host.process.wait()

    async def close(self) -> None:
        for host in self.started:
            if host.process.returncode is None:
                host.process.kill()
                with contextlib.suppress(ProcessLookupError):
                    await host.process.wait()


@dataclass
class LaneObserver:
    """Everything on `flux.events.>`: who started which job, and the progress seen."""

    client: Client
    started: list[LaneStarted] = field(default_factory=list)
    progress: list[StepProgress] = field(default_factory=list)

    @classmethod
    async def connect(cls, url: str) -> LaneObserver:
        observer = cls(await nats.connect(url))

        async def on_event(message: Msg) -> None:
            with contextlib.suppress(ProtocolError):
                event = decode(message.data)
                if isinstance(event, LaneStarted):
                    observer.started.append(event)
                elif isinstance(event, StepProgress):
                    observer.progress.append(event)

        await observer.client.subscribe("flux.events.>", cb=on_event)
        return observer

    def start_of(self, job_id: str) -> LaneStarted | None:
        return next((event for event in reversed(self.started) if event.id == job_id), None)

    async def until_started(self, job_id: str, limit_s: float = 60.0) -> LaneStarted:
        """The job's start, once a host has said it (the limit only guards against a hung test)."""
        async with asyncio.timeout(limit_s):
            while (started := self.start_of(job_id)) is None:
                await asyncio.sleep(0.05)
        return started

    def worker_pid(self, job_id: str) -> int:
        started = self.start_of(job_id)
        assert started is not None, f"no start seen for {job_id}"
        found = re.search(r"pid (\d+)", started.worker)
        assert found, started.worker
        return int(found.group(1))

    async def close(self) -> None:
        await self.client.close()
