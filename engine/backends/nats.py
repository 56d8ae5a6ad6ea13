"""The bot's side of the GPU lane across hosts: jobs to GPU hosts over NATS JetStream, their events and results back.

SQLite stays the queue of record. A job is published (`flux.jobs.<model>`, message id `<job>:<attempt>`) only
when a live host serving its model has a free slot, so fairness, quotas and cancelling a queued job never leave
the bot; JetStream carries the jobs in flight. The job's stream sequence and attempt are its resume token, stored
(`Submitted`) before any wait, so a restarted bot follows the job again instead of publishing it twice.

What a host says comes back three ways: heartbeats in the hosts bucket (what it serves, its slots, the jobs it
holds), core messages on `flux.events.<job>.<attempt>` (started, progress with previews) and the result on the
`FLUX_RESULTS` stream, read by one durable consumer and acked only once the scheduler has recorded it: the event
generator resumes after the scheduler's transition, and acks then. A result nobody follows (a job cancelled
meanwhile, a retry's older attempt) is dropped with its image.

A job is lost, retryable and never charged, when the host that holds it stops sending heartbeats, or when nothing
has been heard of it for `ack_wait_s` (its lease) although a host has taken it. While the bot cannot reach the
server, no lease runs out and no host is judged: an outage of the server is not a failure of the hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from engine.backends.base import Resumption, Unresumable
from engine.backends.jetstream import (
    ERRORS,
    RESULTS_CONSUMER,
    RETRY_S,
    Lane,
    NatsUnavailable,
    Queue,
    add_queues,
    cancel_subject,
    connect,
    create_lane,
    events_subject,
    message_id,
    queue_of,
    queues,
    until_done,
)
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
from engine.backends.upkeep import DEFAULT_SECONDS_PER_STEP, JobTimes, Tasks
from engine.config import ModelSettings, NatsCredentials, NatsSettings, StyleSettings
from engine.models import (
    PNG,
    BackendEvent,
    BackendJob,
    BackendKind,
    BackendStatus,
    Failed,
    FailureReason,
    Finished,
    GpuHostView,
    GpuLaneReport,
    Progress,
    ResolvedRequest,
    ResumeToken,
    Started,
    Submitted,
)

log = logging.getLogger(__name__)

# A result for a job nobody follows yet is offered again this many times (a second apart) before it is dropped:
# a restarting bot resumes its jobs within seconds of connecting.
UNCLAIMED_DELIVERIES = 30
RECENTLY_ENDED = 10_000  # jobs remembered as ended, whose late results are dropped at once
# One result per pull: a larger batch leaves a pull request behind that can hold the next result until it expires
# (measured here: a second's stall; nats.py #986), and one pull per result costs a round trip on loopback.
RESULTS_BATCH = 1


@dataclass(slots=True)
class _Host:
    beat: HostBeat
    revision: int
    seen_at: float


@dataclass(frozen=True, slots=True)
class _Delivery:
    result: LaneResult
    message: Msg


@dataclass(frozen=True, slots=True)
class _Lost:
    detail: str


_Signal = LaneStarted | StepProgress | _Delivery | _Lost


@dataclass(slots=True)
class _Flight:
    """A job this bot has published and follows until its result is recorded."""

    job_id: str
    attempt: int
    queue: Queue
    last_sign: float
    seq: int | None = None
    host: str | None = None
    ended: bool = False
    inbox: asyncio.Queue[_Signal] = field(default_factory=asyncio.Queue)

    @property
    def key(self) -> str:
        return message_id(self.job_id, self.attempt)


class RemoteHosts:
    """The GPU hosts on NATS as one member of the GPU lane (see the module docstring)."""

    kind = BackendKind.LOCAL

    def __init__(
        self,
        settings: NatsSettings,
        credentials: NatsCredentials,
        models: Mapping[str, ModelSettings],
        styles: Mapping[str, StyleSettings] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._credentials = credentials
        self._models = dict(models)
        self._styles = dict(styles or {})
        self._clock = clock
        self._lane: Lane | None = None
        self._problem = "not connected yet"
        self._reachable = False
        self._reachable_since = 0.0  # leases and heartbeats are judged only from here on
        self._hosts: dict[str, _Host] = {}
        self._flights: dict[str, _Flight] = {}
        self._subscriptions: dict[str, Any] = {}  # the events subscription of each flight
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._times = JobTimes()
        self._changed = asyncio.Condition()
        self._tasks = Tasks("GPU hosts")
        self._detached = False
        self._closed = False

    # ---- the Backend protocol ----

    def supports(self, model_name: str, model: ModelSettings) -> bool:
        return model.local

    def capacity(self) -> int:
        return sum(host.beat.slots for host in self._live_hosts())

    def estimate_seconds(self, request: ResolvedRequest) -> float:
        measured = self._times.get(request)
        if measured is not None:
            return measured
        per_step = [
            host.beat.seconds_per_step
            for host in self._live_hosts(self._queue(request))
            if host.beat.seconds_per_step is not None
        ]
        if per_step:
            return request.steps * statistics.median(per_step)
        model = self._models.get(request.model)
        return request.steps * (model.local_seconds_per_step if model else DEFAULT_SECONDS_PER_STEP)

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        queue = self._queue(request) if request else None
        serving = self._live_hosts(queue)
        capacity = sum(host.beat.slots for host in serving)
        run_s = self.estimate_seconds(request) if request else 0.0
        # Hosts online, none with this style's adapters: a matter of set-up, not of waiting for a host to return.
        unserved = queue is not None and queue.style is not None and not serving and bool(self._live_hosts())
        return BackendStatus(
            kind=self.kind,
            healthy=self._lane is not None and capacity > 0,
            wait_s=run_s * queued_ahead / max(capacity, 1),
            run_s=run_s,
            ahead=queued_ahead,
            in_flight=len(self._flights),
            capacity=capacity,
            detail=f"no GPU host online has the style {queue.style}" if unserved and queue else self.describe(),
            serves_model=not unserved,
        )

    async def start(self) -> None:
        """Connect and create the lane's streams, or, if the server is not there yet, keep trying meanwhile."""
        try:
            await self._connect()
        except NatsUnavailable as exc:
            self._problem = str(exc)
            log.warning("GPU hosts on NATS unavailable for now (retrying): %s", exc)
            self._tasks.spawn(self._connect_later())

    def detach(self) -> None:
        self._detached = True

    async def close(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        await self._tasks.cancel_all()
        if self._lane is not None:
            with contextlib.suppress(*ERRORS):
                await self._lane.close()

    async def run(self, job: BackendJob) -> AsyncGenerator[BackendEvent, None]:
        queue = self._queue(job.request)
        if self._lane is None or not self._live_hosts(queue):
            yield Failed(FailureReason.HOST_LOST, self._unavailable(queue), retryable=True)
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._free(queue) > 0 or not self._live_hosts(queue))
        lane = self._lane
        if lane is None or self._closed or not self._live_hosts(queue):
            yield Failed(FailureReason.HOST_LOST, self._unavailable(queue), retryable=True)
            return
        flight = self._open(job.job_id, job.attempt, queue)
        try:
            await self._listen(lane, flight)
            request = job.request
            input_name = None
            if job.input_image and request.input_image:
                # Over a message's 1 MiB: through the images bucket, by content (its TTL drops it later).
                input_name = f"input.{request.input_image}.png"
                image = job.input_image
                await until_done(lambda: lane.images.put(input_name, image), f"storing input image {input_name}")
            lane_job = LaneJob.of(job, input_name)
            flight.seq = await self._publish_job(lane, lane_job)
            state = {"seq": flight.seq, "attempt": job.attempt, "model": queue.model, "style": queue.style}
            yield Submitted(ResumeToken(json.dumps(state, separators=(",", ":"))))
            async for event in self._follow(flight, job.request):
                yield event
        finally:
            self._close_flight(flight)

    def resume(self, job: BackendJob) -> Resumption:
        if job.resume is None:
            return Unresumable("flux-bot stopped before the GPU hosts had this job")
        try:
            state = json.loads(job.resume.state)
            seq, attempt, model = int(state["seq"]), int(state["attempt"]), str(state["model"])
            style = state.get("style")
        except (TypeError, KeyError, ValueError) as exc:
            return Unresumable(f"its stored NATS resume token cannot be read ({exc})")
        return self._resumed(job, seq, attempt, Queue(model, None if style is None else str(style)))

    # ---- operators' view ----

    def describe(self) -> str:
        if self._lane is None:
            return f"GPU hosts on NATS {self._settings.url}: {self._problem}"
        live = self._live_hosts()
        if not live:
            return "no GPU host online"
        slots = sum(host.beat.slots for host in live)
        busy = sum(host.beat.busy for host in live)
        return f"{len(live)} GPU host{'s' if len(live) != 1 else ''} online, {busy} of {slots} GPUs busy"

    def style_slots(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """(where, slots, the LoRA styles served there) for each live GPU host, for `/admin styles`."""
        return [(f"GPU host {host.beat.host}", host.beat.slots, host.beat.styles) for host in self._live_hosts()]

    async def reload_styles(self, styles: Mapping[str, StyleSettings]) -> None:
        """Route by `styles` from now on, with a queue for each new style with adapters (GPU hosts reload their own
        [styles.*] and serve the new queues once their workers have the adapters)."""
        self._styles = dict(styles)
        lane = self._lane
        if lane is not None:
            wanted = self._lane_queues()
            await until_done(lambda: add_queues(lane.js, self._settings, wanted), "adding the styles' queues")

    async def wait_for_slots(self, slots: int) -> None:
        """Return once the live hosts have `slots` slots together (or this closes): for a start that waits."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self.capacity() >= slots)

    def hosts(self) -> list[HostBeat]:
        """The latest heartbeat of every live host."""
        return [host.beat for host in self._live_hosts()]

    # ---- connection ----

    async def _connect(self) -> None:
        client = await connect(
            self._settings,
            self._credentials,
            "flux-bot",
            on_disconnect=self._on_disconnect,
            on_reconnect=self._on_reconnect,
        )
        try:
            lane = await create_lane(client, self._settings, self._lane_queues())
        except ERRORS as exc:
            await client.close()
            raise NatsUnavailable(f"cannot create the GPU lane's streams on {self._settings.url}: {exc}") from exc
        self._lane = lane
        self._mark_reachable()
        await self._notify()
        log.info("GPU hosts: connected to NATS at %s", self._settings.url)
        self._tasks.spawn(self._watch_hosts(lane))
        self._tasks.spawn(self._consume_results(lane))

    async def _connect_later(self) -> None:
        while not self._closed:
            await asyncio.sleep(RETRY_S * 5)
            try:
                await self._connect()
                return
            except NatsUnavailable as exc:
                self._problem = str(exc)

    async def _on_disconnect(self) -> None:
        self._reachable = False
        log.warning("GPU hosts: lost the connection to NATS at %s; reconnecting", self._settings.url)

    async def _on_reconnect(self) -> None:
        log.info("GPU hosts: reconnected to NATS at %s", self._settings.url)
        self._mark_reachable()

    def _mark_reachable(self) -> None:
        if not self._reachable:
            self._reachable = True
            self._reachable_since = self._clock()

    # ---- hosts ----

    def _lane_queues(self) -> list[Queue]:
        """Every queue the lane has: each GPU-lane model's, and each of its styles with adapters."""
        return queues(self._models, self._styles, [name for name, model in self._models.items() if model.local])

    def _queue(self, request: ResolvedRequest) -> Queue:
        return queue_of(request.model, request.style, self._styles)

    def _live_hosts(self, queue: Queue | None = None) -> list[_Host]:
        """The hosts heard from within the heartbeat TTL; with `queue`, those serving its model (and style)."""
        if self._lane is None:
            return []
        ttl = self._settings.heartbeat_ttl_s
        now = self._clock()
        return [
            host
            for host in self._hosts.values()
            if host.beat.protocol == PROTOCOL_VERSION
            and (queue is None or _serves(host.beat, queue))
            and (not self._reachable or now - max(host.seen_at, self._reachable_since) <= ttl)
        ]

    def _free(self, queue: Queue) -> int:
        serving = self._live_hosts(queue)
        names = {host.beat.host for host in serving}
        busy = sum(
            1
            for flight in self._flights.values()
            if flight.host in names or (flight.host is None and flight.queue == queue)
        )
        return sum(host.beat.slots for host in serving) - busy

    def _unavailable(self, queue: Queue) -> str:
        if self._lane is None:
            return f"the GPU hosts cannot be reached: {self._problem}"
        return f"no GPU host serving {queue} is online"

    async def _watch_hosts(self, lane: Lane) -> None:
        while not self._closed:
            try:
                await self._read_heartbeats(lane)
            except ERRORS as exc:
                log.debug("GPU hosts: cannot read heartbeats: %s", exc)
            else:
                self._mark_reachable()
                self._judge_flights()
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self._settings.heartbeat_interval_s)

    async def _read_heartbeats(self, lane: Lane) -> None:
        try:
            listed = await lane.hosts.keys()
        except nats.js.errors.NoKeysError:
            listed = []
        # keys() can miss a live key: its watcher may mark the listing done before a delivered entry is handled
        # (nats-py 2.16 races consumer_info against delivery). So a known host is gone only when a direct get
        # says its key is deleted or expired, never because one listing lacked it.
        keys = [*listed, *(name for name in self._hosts if name not in listed)]
        now = self._clock()
        seen: dict[str, _Host] = {}
        for key in keys:
            try:
                entry = await lane.hosts.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value is None or entry.revision is None:
                continue
            try:
                beat = decode(entry.value)
            except ProtocolError as exc:
                log.warning("GPU hosts: heartbeat %r is not readable: %s", key, exc)
                continue
            if not isinstance(beat, HostBeat):
                continue
            known = self._hosts.get(beat.host)
            if known is None:
                log.info("GPU host %s online: %d slots serving %s", beat.host, beat.slots, ", ".join(beat.models))
            if beat.protocol != PROTOCOL_VERSION and (known is None or known.beat.protocol != beat.protocol):
                log.warning(
                    "GPU host %s speaks protocol %d, this bot %d: it gets no jobs until it runs the same version",
                    beat.host,
                    beat.protocol,
                    PROTOCOL_VERSION,
                )
            fresh = known is None or known.revision != entry.revision
            seen[beat.host] = _Host(beat, entry.revision, now if fresh else known.seen_at)  # type: ignore[union-attr]
            if fresh:
                for held in beat.jobs:
                    flight = self._flights.get(held.partition(":")[0])
                    if flight is not None and flight.key == held:
                        flight.host = beat.host
                        flight.last_sign = now
        for name in self._hosts.keys() - seen.keys():
            log.warning("GPU host %s is gone (its heartbeat expired)", name)
        self._hosts = seen

    def _judge_flights(self) -> None:
        live = {host.beat.host for host in self._live_hosts()}
        for flight in self._flights.values():
            if flight.host is not None and flight.host not in live and not flight.ended:
                detail = (
                    f"GPU host {flight.host} stopped sending heartbeats (none for {self._settings.heartbeat_ttl_s:g} s)"
                )
                flight.inbox.put_nowait(_Lost(detail))

    # ---- jobs ----

    def _open(self, job_id: str, attempt: int, queue: Queue) -> _Flight:
        flight = _Flight(job_id, attempt, queue, last_sign=self._clock())
        self._flights[job_id] = flight
        return flight

    async def _listen(self, lane: Lane, flight: _Flight) -> None:
        async def on_event(message: Msg) -> None:
            try:
                event = decode(message.data)
            except ProtocolError as exc:
                log.warning("job %s: unreadable event from a GPU host: %s", flight.job_id, exc)
                return
            if isinstance(event, LaneStarted | StepProgress):
                flight.last_sign = self._clock()
                flight.inbox.put_nowait(event)

        subscription = await lane.client.subscribe(events_subject(flight.job_id, flight.attempt), cb=on_event)
        self._subscriptions[flight.job_id] = subscription

    async def _publish_job(self, lane: Lane, job: LaneJob) -> int:
        """Publish until JetStream confirms it (a repeat after a lost confirmation is deduped by the message id)."""
        headers = {"Nats-Msg-Id": message_id(job.id, job.attempt)}
        subject = queue_of(job.model, job.style or None, self._styles).subject
        stream = self._settings.jobs_stream
        ack = await until_done(
            lambda: lane.js.publish(subject, encode(job), stream=stream, headers=headers),
            f"job {job.id}: publishing to the GPU hosts",
        )
        return int(ack.seq)

    async def _follow(self, flight: _Flight, request: ResolvedRequest) -> AsyncGenerator[BackendEvent, None]:
        started = self._clock()
        while True:
            signal = await self._next_signal(flight)
            if isinstance(signal, LaneStarted):
                flight.host = signal.host
                yield Started(self.kind, f"{signal.host} {signal.worker}")
            elif isinstance(signal, StepProgress):
                yield Progress(signal.step, signal.total, signal.preview or None)
            elif isinstance(signal, _Lost):
                flight.ended = True
                log.warning("job %s: lost on the GPU hosts: %s", flight.job_id, signal.detail)
                self._tasks.spawn(self._withdraw(flight))
                yield Failed(FailureReason.HOST_LOST, signal.detail, retryable=True)
                return
            else:
                event = await self._terminal(signal.result)
                flight.ended = True
                if isinstance(event, Finished):
                    self._times.add(request, self._clock() - started)
                yield event
                # The scheduler has recorded the result: only now may the stream forget it.
                await self._collect(signal)
                return

    async def _next_signal(self, flight: _Flight) -> _Signal:
        ack_wait = self._settings.ack_wait_s
        while True:
            if not self._reachable:
                deadline = self._clock() + self._settings.heartbeat_interval_s
            else:
                deadline = max(flight.last_sign, self._reachable_since) + ack_wait
            try:
                return await asyncio.wait_for(flight.inbox.get(), max(deadline - self._clock(), 0.0))
            except TimeoutError:
                pass
            if not self._reachable or self._clock() < max(flight.last_sign, self._reachable_since) + ack_wait:
                continue
            if await self._waiting_for_a_host(flight):
                flight.last_sign = self._clock()
                continue
            holder = f"GPU host {flight.host}" if flight.host else "the GPU host that took it"
            return _Lost(f"nothing heard from {holder} for ack_wait_s = {ack_wait:g} s")

    async def _waiting_for_a_host(self, flight: _Flight) -> bool:
        """Whether the job is still in the stream, not yet taken, with a live host that will take it."""
        lane = self._lane
        if lane is None or flight.host is not None or flight.seq is None:
            return False
        try:
            info = await lane.js.consumer_info(self._settings.jobs_stream, flight.queue.consumer)
        except ERRORS:
            return True  # cannot tell now: ask again after another lease rather than give up a job that may run
        taken = info.delivered is not None and (info.delivered.stream_seq or 0) >= flight.seq
        return not taken and bool(self._live_hosts(flight.queue))

    async def _terminal(self, result: LaneResult) -> Finished | Failed:
        if result.outcome is LaneOutcome.DONE:
            lane = self._lane
            try:
                if lane is None or result.image is None:
                    raise ValueError("no image named")
                stored = await lane.images.get(result.image)
                image = stored.data or b""
                if not image:
                    raise ValueError("an empty image")
            except (*ERRORS, ValueError) as exc:
                detail = f"GPU host {result.host} made the image, but it could not be fetched ({exc})"
                return Failed(FailureReason.HOST_LOST, detail, retryable=True)
            return Finished(image, PNG.mime, result.seed or 0, gpu_ms=round((result.seconds or 0.0) * 1000))
        if result.outcome is LaneOutcome.CANCELLED:
            return Failed(FailureReason.INTERRUPTED, f"GPU host {result.host} stopped the job", retryable=True)
        try:
            reason = FailureReason(result.reason)
        except ValueError:
            reason = FailureReason.INTERNAL
        gpu_ms = round((result.seconds or 0.0) * 1000)
        return Failed(reason, f"on GPU host {result.host}: {result.detail}", retryable=result.retryable, gpu_ms=gpu_ms)

    async def _collect(self, delivery: _Delivery) -> None:
        """Ack a recorded result and delete its image from the bucket."""
        with contextlib.suppress(*ERRORS):
            await delivery.message.ack()
        await self._delete_image(delivery.result)

    async def _delete_image(self, result: LaneResult) -> None:
        lane = self._lane
        if lane is not None and result.image:
            with contextlib.suppress(*ERRORS):
                await lane.images.delete(result.image)

    def _close_flight(self, flight: _Flight) -> None:
        self._flights.pop(flight.job_id, None)
        # Results nobody will read now (a repeat of the one recorded, one that came as the job was cancelled).
        while not flight.inbox.empty():
            if isinstance(left := flight.inbox.get_nowait(), _Delivery):
                self._tasks.spawn(self._collect(left))
        subscription = self._subscriptions.pop(flight.job_id, None)
        if subscription is not None:
            self._tasks.spawn(_unsubscribe(subscription))
        self._ended[flight.job_id] = None
        while len(self._ended) > RECENTLY_ENDED:
            self._ended.popitem(last=False)
        if not flight.ended and not self._detached:
            # The user cancelled it (a bot that stops leaves its jobs running, to follow them after the restart).
            self._tasks.spawn(self._withdraw(flight))
        self._tasks.spawn(self._notify())

    async def _withdraw(self, flight: _Flight) -> None:
        """Take a job back: out of the stream if no host has taken it, and a cancel for the host that has."""
        lane = self._lane
        if lane is None:
            return
        with contextlib.suppress(*ERRORS):
            await lane.client.publish(cancel_subject(flight.job_id), encode(LaneCancel(flight.job_id, flight.attempt)))
        if flight.seq is not None:
            with contextlib.suppress(*ERRORS):
                await lane.js.delete_msg(self._settings.jobs_stream, flight.seq)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _resumed(
        self, job: BackendJob, seq: int, attempt: int, queue: Queue
    ) -> AsyncGenerator[BackendEvent, None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._lane is not None or self._closed)
        lane = self._lane
        if lane is None:
            return
        flight = self._open(job.job_id, attempt, queue)
        flight.seq = seq
        try:
            await self._listen(lane, flight)
            async for event in self._follow(flight, job.request):
                yield event
        finally:
            self._close_flight(flight)

    # ---- results ----

    async def _consume_results(self, lane: Lane) -> None:
        subscription = None
        while not self._closed:
            try:
                if subscription is None:
                    subscription = await lane.js.pull_subscribe_bind(
                        durable=RESULTS_CONSUMER, stream=self._settings.results_stream
                    )
                messages = await subscription.fetch(RESULTS_BATCH, timeout=RETRY_S)
            except TimeoutError:
                continue
            except ERRORS as exc:
                # A pull subscription does not survive a server restart: bind a new one once it is back.
                log.debug("GPU hosts: reading results failed (%s); subscribing again", exc)
                if subscription is not None:
                    self._tasks.spawn(_unsubscribe(subscription))
                subscription = None
                await asyncio.sleep(RETRY_S)
                continue
            for message in messages:
                await self._route(message)

    async def _route(self, message: Msg) -> None:
        try:
            result = decode(message.data)
            if not isinstance(result, LaneResult):
                raise ProtocolError(f"expected lane_result, got {result.TYPE}")
        except ProtocolError as exc:
            log.error("GPU hosts: dropping an unreadable result: %s", exc)
            with contextlib.suppress(*ERRORS):
                await message.term()
            return
        flight = self._flights.get(result.id)
        if flight is not None and flight.attempt == result.attempt and not flight.ended:
            flight.last_sign = self._clock()
            flight.inbox.put_nowait(_Delivery(result, message))
            return
        unclaimed = flight is None and result.id not in self._ended
        if unclaimed and message.metadata.num_delivered < UNCLAIMED_DELIVERIES:
            with contextlib.suppress(*ERRORS):
                await message.nak(delay=RETRY_S)
            return
        log.info(
            "job %s: dropping GPU host %s's result of attempt %d: not followed", result.id, result.host, result.attempt
        )
        self._tasks.spawn(self._collect(_Delivery(result, message)))


def _serves(beat: HostBeat, queue: Queue) -> bool:
    return queue.model in beat.models and (queue.style is None or queue.style in beat.styles)


async def _unsubscribe(subscription: Any) -> None:
    with contextlib.suppress(*ERRORS):
        await subscription.unsubscribe()


async def lane_report(settings: NatsSettings, credentials: NatsCredentials) -> GpuLaneReport:
    """Connect once and read what the server holds of the lane (`flux-bot doctor`)."""
    try:
        client = await connect(settings, credentials, "flux-bot doctor")
    except NatsUnavailable as exc:
        return GpuLaneReport(settings.url, problem=str(exc))
    try:
        js = client.jetstream()
        missing = []
        for name, stream in (
            (settings.jobs_stream, settings.jobs_stream),
            (settings.results_stream, settings.results_stream),
            (settings.images_bucket, f"OBJ_{settings.images_bucket}"),
            (settings.hosts_bucket, f"KV_{settings.hosts_bucket}"),
        ):
            try:
                await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                missing.append(name)
        hosts: list[GpuHostView] = []
        if settings.hosts_bucket not in missing:
            bucket = await js.key_value(settings.hosts_bucket)
            try:
                keys = await bucket.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                try:
                    entry = await bucket.get(key)
                    beat = decode(entry.value or b"")
                except (nats.js.errors.KeyNotFoundError, ProtocolError):
                    continue
                if isinstance(beat, HostBeat):
                    hosts.append(
                        GpuHostView(
                            beat.host,
                            beat.version,
                            beat.models,
                            beat.slots,
                            beat.busy,
                            beat.recycles,
                            beat.protocol == PROTOCOL_VERSION,
                        )
                    )
        return GpuLaneReport(settings.url, missing=tuple(missing), hosts=tuple(hosts))
    except ERRORS as exc:
        return GpuLaneReport(settings.url, problem=f"NATS at {settings.url}: {exc or type(exc).__name__}")
    finally:
        with contextlib.suppress(*ERRORS):
            await client.close()
