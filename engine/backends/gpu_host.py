"""A GPU host of the lane: `flux-bot worker --nats URL`, this host's supervised workers serving jobs from NATS.

The in-host supervisor (engine/backends/local/supervisor.py) runs one worker process per GPU with all its
safeguards (recycling, OOM, watchdog, cancel, memory bounds); the bridge here feeds it from JetStream. One puller
per slot takes one job at a time from the model's shared consumer, so a host never holds more jobs than it has
idle workers. While a job runs the bridge extends its lease (`in_progress`) on every progress event and between
them, publishes its start and progress on `flux.events.<job>.<attempt>`, puts the image in the images bucket,
publishes the result on `FLUX_RESULTS`, and acks the job only once the result is stored: a host that dies before
that leaves the job unacked, and the bot, no longer hearing of it, declares it lost. A heartbeat in the hosts
bucket says what the host serves and holds. A host needs no BFL key, no chat token and no database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from engine.backends.jetstream import (
    CANCEL_ALL,
    ERRORS,
    RETRY_S,
    Lane,
    NatsUnavailable,
    Queue,
    bind_lane,
    connect,
    events_subject,
    image_name,
    message_id,
    queues,
    results_subject,
    token,
    until_done,
)
from engine.backends.local.supervisor import LocalBackend
from engine.backends.protocol import (
    PROTOCOL_VERSION,
    HostBeat,
    LaneCancel,
    LaneJob,
    LaneOutcome,
    LaneResult,
    LaneStarted,
    ProtocolError,
    StepProgress,
    decode,
    encode,
)
from engine.config import (
    DEMO_MODEL,
    ModelSettings,
    NatsCredentials,
    NatsSettings,
    Secrets,
    Settings,
    StyleSettings,
    find_config,
    load_settings,
)
from engine.errors import ConfigError
from engine.models import Failed, FailureReason, Finished, Progress, Started

log = logging.getLogger(__name__)

T = TypeVar("T")

EMA_WEIGHT = 0.3
FETCH_TIMEOUT_S = 1.0
STOP_GRACE_S = 5.0  # at shutdown, how long the results of interrupted jobs may take to reach the server
RECENT_CANCELS = 10_000


def version() -> str:
    try:
        return importlib.metadata.version("flux-bot")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(slots=True)
class _Held:
    job: LaneJob
    message: Msg
    task: asyncio.Task[LaneResult] | None = None


class GpuHost:
    """The bridge between the lane's streams and this host's worker slots (see the module docstring)."""

    def __init__(
        self,
        settings: NatsSettings,
        credentials: NatsCredentials,
        backend: LocalBackend,
        models: Sequence[str],
        name: str,
        styles: Mapping[str, StyleSettings] | None = None,
        all_models: Mapping[str, ModelSettings] | None = None,
    ) -> None:
        """`styles` and `all_models` are the host's [styles.*] and [models.*]: a style with adapters that one of
        `models` may run gets its own queue, which this host serves (its workers load the adapters at start)."""
        if not models:
            raise ConfigError("(command line)", "--models", "a GPU host must serve at least one model")
        for model in models:
            try:
                token(model)
            except ValueError as exc:
                raise ConfigError("(command line)", "--models", str(exc)) from exc
        self._settings = settings
        self._credentials = credentials
        self._backend = backend
        self._models = tuple(models)
        self._queues = queues(all_models or {}, styles or {}, models)
        self.name = name
        self._lane: Lane | None = None
        self._held: dict[str, _Held] = {}  # by job id
        self._cancelled: OrderedDict[str, int] = OrderedDict()  # job id -> the newest attempt given up
        self._seconds_per_step: float | None = None
        self._stopping = False

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. NatsUnavailable when the server refuses this host or cannot be reached."""
        client = await connect(self._settings, self._credentials, f"flux-bot gpu host {self.name}")
        try:
            lane = await self._bind(client, stop)
            if lane is None:
                return
            self._lane = lane
            await self._backend.start()
            await client.subscribe(CANCEL_ALL, cb=self._on_cancel)
            tasks = [asyncio.create_task(self._beat(lane), name="heartbeat")]
            tasks += [
                asyncio.create_task(self._pull(lane, slot), name=f"slot {slot}")
                for slot in range(self._backend.capacity())
            ]
            log.info(
                "GPU host %s serving %s with %d slots on %s",
                self.name,
                ", ".join(str(queue) for queue in self._queues),
                self._backend.capacity(),
                self._settings.url,
            )
            await stop.wait()
            self._stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(*ERRORS):
                await lane.hosts.delete(self.name)  # the bot need not wait for the heartbeat to expire
        finally:
            await self._backend.close()
            with contextlib.suppress(*ERRORS):
                await client.close()

    async def _bind(self, client: Client, stop: asyncio.Event) -> Lane | None:
        told = False
        while not stop.is_set():
            try:
                return await bind_lane(client, self._settings)
            except NatsUnavailable as exc:
                if not told:
                    log.warning("%s; waiting for them", exc)
                    told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S * 2)
        return None

    async def reload_styles(self, config: Path | None) -> None:
        """SIGHUP: [styles.*] read again from `config`; workers load the new adapters between jobs (none is lost)
        and the host serves the new styles' queues (the bot creates them on its own reload). Logged, never raised."""
        try:
            settings, _ = await asyncio.to_thread(load_settings, config)
        except ConfigError as exc:
            log.error("styles not reloaded: %s", _one_line(exc))
            return
        await self._backend.reload_styles(settings.styles)
        self._queues = queues(settings.models, settings.styles, self._models)
        log.info("styles reloaded: serving %s", ", ".join(str(queue) for queue in self._queues))

    def _serving(self) -> bool:
        return self._backend.status(0).healthy

    # ---- heartbeat ----

    def heartbeat(self) -> HostBeat:
        return HostBeat(
            host=self.name,
            version=version(),
            protocol=PROTOCOL_VERSION,
            models=self._models,
            slots=self._backend.capacity() if self._serving() else 0,
            busy=len(self._held),
            seconds_per_step=self._seconds_per_step,
            recycles=self._backend.recycles,
            jobs=tuple(f"{held.job.id}:{held.job.attempt}" for held in self._held.values()),
            styles=tuple(sorted({queue.style for queue in self._queues if queue.style})),
        )

    async def _beat(self, lane: Lane) -> None:
        while True:
            try:
                await lane.hosts.put(self.name, encode(self.heartbeat()))
            except ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(self._settings.heartbeat_interval_s)

    # ---- jobs ----

    async def _pull(self, lane: Lane, slot: int) -> None:
        subscriptions: dict[Queue, JetStreamContext.PullSubscription] = {}
        turn = slot  # hosts serving several queues start their slots on different ones
        while True:
            if not self._serving():
                # Workers that cannot start would fail every job taken: take none, and say 0 slots in the heartbeat.
                await asyncio.sleep(RETRY_S)
                continue
            queue = self._queues[turn % len(self._queues)]
            turn += 1
            try:
                subscription = subscriptions.get(queue)
                if subscription is None:
                    subscription = await lane.js.pull_subscribe_bind(
                        durable=queue.consumer, stream=self._settings.jobs_stream
                    )
                    subscriptions[queue] = subscription
                timeout = FETCH_TIMEOUT_S / len(self._queues)
                messages = await subscription.fetch(1, timeout=timeout)
            except TimeoutError:
                continue
            except ERRORS as exc:
                # A pull subscription does not survive a server restart: bind a new one once it is back.
                log.debug("slot %d: pulling %s failed (%s); subscribing again", slot, queue, exc)
                subscriptions.pop(queue, None)
                await asyncio.sleep(RETRY_S)
                continue
            for message in messages:
                await self._take(lane, message)

    async def _take(self, lane: Lane, message: Msg) -> None:
        try:
            job = decode(message.data)
            if not isinstance(job, LaneJob):
                raise ProtocolError(f"expected lane_job, got {job.TYPE}")
        except ProtocolError as exc:
            log.error("dropping an unreadable job message: %s", exc)
            with contextlib.suppress(*ERRORS):
                await message.term()
            return
        if self._cancelled.get(job.id, 0) >= job.attempt:
            await self._finish(lane, message, LaneResult(job.id, job.attempt, self.name, LaneOutcome.CANCELLED))
            return
        held = _Held(job, message)
        self._held[job.id] = held
        lease = asyncio.create_task(self._keep_leased(message))
        held.task = asyncio.create_task(self._work(lane, held), name=f"job {job.id}")
        try:
            await asyncio.wait([held.task])
        except asyncio.CancelledError:
            # This host is stopping: the job goes back to the bot as interrupted, to run elsewhere.
            held.task.cancel()
            await asyncio.gather(held.task, return_exceptions=True)
            result = LaneResult(
                job.id,
                job.attempt,
                self.name,
                LaneOutcome.FAILED,
                reason=FailureReason.INTERRUPTED.value,
                detail=f"GPU host {self.name} is shutting down",
                retryable=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finish(lane, message, result), STOP_GRACE_S)
            raise
        finally:
            lease.cancel()
            self._held.pop(job.id, None)
        if held.task.cancelled():
            result = LaneResult(job.id, job.attempt, self.name, LaneOutcome.CANCELLED)
        else:
            result = held.task.result()
        await self._finish(lane, message, result)

    async def _work(self, lane: Lane, held: _Held) -> LaneResult:
        job = held.job
        image = None
        if job.input_image is not None:
            stored = await until_done(partial(lane.images.get, job.input_image), f"job {job.id}: input")
            image = stored.data
        events_at = events_subject(job.id, job.attempt)
        backend_job = job.backend_job(image)
        async with aclosing(self._backend.run(backend_job)) as events:
            async for event in events:
                if isinstance(event, Started):
                    started = LaneStarted(job.id, job.attempt, self.name, event.detail)
                    await self._tell(lane, events_at, encode(started))
                elif isinstance(event, Progress):
                    progress = StepProgress(job.id, event.step, event.total, event.preview_png or b"")
                    await self._tell(lane, events_at, encode(progress))
                    with contextlib.suppress(*ERRORS):
                        await held.message.in_progress()
                elif isinstance(event, Finished):
                    name = image_name(job.id, job.attempt)
                    await until_done(partial(lane.images.put, name, event.image), f"job {job.id}: storing")
                    seconds = event.gpu_ms / 1000
                    self._measured(seconds / max(job.steps, 1))
                    return LaneResult(
                        job.id, job.attempt, self.name, LaneOutcome.DONE, seed=event.seed, seconds=seconds, image=name
                    )
                elif isinstance(event, Failed):
                    return LaneResult(
                        job.id,
                        job.attempt,
                        self.name,
                        LaneOutcome.FAILED,
                        seconds=event.gpu_ms / 1000,
                        reason=event.reason.value,
                        detail=event.detail,
                        retryable=event.retryable,
                    )
        return LaneResult(
            job.id,
            job.attempt,
            self.name,
            LaneOutcome.FAILED,
            reason=FailureReason.INTERNAL.value,
            detail="the worker ended without a result",
            retryable=True,
        )

    async def _finish(self, lane: Lane, message: Msg, result: LaneResult) -> None:
        """Publish the result until JetStream has it, then ack the job: never the other way round."""
        # The message id makes a publish repeated after a lost confirmation one result, not two.
        headers = {"Nats-Msg-Id": message_id(result.id, result.attempt)}
        await until_done(
            lambda: lane.js.publish(
                results_subject(result.id), encode(result), stream=self._settings.results_stream, headers=headers
            ),
            f"job {result.id}: publishing its result",
        )
        with contextlib.suppress(*ERRORS):
            await message.ack()

    async def _keep_leased(self, message: Msg) -> None:
        while True:
            await asyncio.sleep(self._settings.ack_wait_s / 3)
            with contextlib.suppress(*ERRORS):
                await message.in_progress()

    async def _tell(self, lane: Lane, subject: str, data: bytes) -> None:
        with contextlib.suppress(*ERRORS):
            await lane.client.publish(subject, data)

    async def _on_cancel(self, message: Msg) -> None:
        try:
            cancel = decode(message.data)
            if not isinstance(cancel, LaneCancel):
                raise ProtocolError(f"expected lane_cancel, got {cancel.TYPE}")
        except ProtocolError as exc:
            log.warning("ignoring an unreadable cancel on %s: %s", message.subject, exc)
            return
        self._cancelled[cancel.id] = max(cancel.attempt, self._cancelled.get(cancel.id, 0))
        self._cancelled.move_to_end(cancel.id)
        while len(self._cancelled) > RECENT_CANCELS:
            self._cancelled.popitem(last=False)
        held = self._held.get(cancel.id)
        if held is not None and held.task is not None and held.job.attempt <= cancel.attempt:
            log.info("job %s: attempt %d cancelled by the bot", cancel.id, held.job.attempt)
            held.task.cancel()

    def _measured(self, seconds_per_step: float) -> None:
        previous = self._seconds_per_step
        self._seconds_per_step = (
            seconds_per_step if previous is None else previous + EMA_WEIGHT * (seconds_per_step - previous)
        )


# ---- `flux-bot worker --nats URL` ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-bot worker --nats",
        description="Serve the bot's GPU lane from this host over NATS JetStream: one worker process per GPU.",
    )
    parser.add_argument("--nats", required=True, metavar="URL", help="the NATS server, e.g. nats://broker:4222")
    parser.add_argument(
        "--config", type=Path, help="config.toml for [local], [nats] and [models] (search order as run)"
    )
    parser.add_argument("--gpus", default="", help="GPU indexes, one worker each, e.g. 0,1 (default: [local] gpus)")
    parser.add_argument("--name", default="", help="this host's name in heartbeats (default: the hostname)")
    parser.add_argument("--models", default="", help="model names to serve (default: every [models.*] with local)")
    parser.add_argument("--model-path", default="", help="the FLUX.1 weights (default: [local] model)")
    parser.add_argument("--demo", action="store_true", help="serve the built-in tiny demo model (its images are noise)")
    parser.add_argument(
        "--synthetic-for-bench",
        type=float,
        metavar="SECONDS",
        help="benchmarks and tests only: workers load no model and return a fixed PNG after SECONDS per job",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str]) -> int:
    """`flux-bot worker --nats URL ...`: the exit status (1 with one line when it cannot serve)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s gpu-host[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings, secrets = load_settings(find_config(args.config).path)
        host = asyncio.run(_serve(args, settings, secrets))
    except (ConfigError, NatsUnavailable) as exc:
        print(f"flux-bot worker: {_one_line(exc)}", file=sys.stderr)
        return 1
    return host


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ConfigError):
        return f"configuration error in {exc.file}: {exc.field}: {exc.problem}"
    return str(exc)


async def _serve(args: argparse.Namespace, settings: Settings, secrets: Secrets) -> int:
    from engine.backends.local.synthetic import SYNTHETIC_ENV

    nats_settings = settings.nats.model_copy(update={"url": args.nats})
    local = settings.local
    if args.gpus:
        try:
            gpus = tuple(int(part) for part in args.gpus.split(",") if part.strip())
        except ValueError as exc:
            raise ConfigError("(command line)", "--gpus", f"expected indexes such as 0,1, got {args.gpus!r}") from exc
        local = local.model_copy(update={"gpus": gpus, "worker_sockets": ()})
    asked = [part.strip() for part in args.models.split(",") if part.strip()]
    unknown = [name for name in asked if name not in settings.models]
    if unknown:
        raise ConfigError("(command line)", "--models", f"not among [models.*]: {', '.join(unknown)}")
    extra_env: dict[str, str] = {}
    weights = args.model_path or local.model
    quick = {"warmup": False, "compile": False, "fp8": False}  # nothing to warm up or compile on these
    if args.synthetic_for_bench is not None:
        extra_env[SYNTHETIC_ENV] = str(args.synthetic_for_bench)
        local = local.model_copy(update=quick)
        model_path = Path("synthetic")
    elif args.demo or weights == DEMO_MODEL:
        from engine.backends.demo_model import ensure_demo_model

        model_path = await asyncio.to_thread(ensure_demo_model, settings.bot.state_dir / "demo-model")
        local = local.model_copy(update={**quick, "kontext_model": str(model_path)})
    elif weights:
        model_path = Path(weights)
    else:
        raise ConfigError(
            "(command line)", "--model-path", "no weights: set [local] model, pass --model-path or --demo"
        )
    backend = LocalBackend(local, settings.models, model_path, extra_env=extra_env, styles=settings.styles)
    # By default every local model these workers can run: an edit model only with Kontext weights.
    models = asked or [name for name, model in settings.models.items() if backend.supports(name, model)]
    host = GpuHost(
        nats_settings,
        secrets.nats,
        backend,
        models,
        args.name or socket.gethostname(),
        styles=settings.styles,
        all_models=settings.models,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    config = find_config(args.config).path
    reloads: set[asyncio.Task[None]] = set()

    def reload_on_hangup() -> None:
        task = asyncio.create_task(host.reload_styles(config), name="reload styles")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_hangup)  # systemctl reload flux-bot-gpu-host
    await host.serve(stop)
    return 0
