"""The GPU lane on NATS JetStream: its names, its streams and buckets, and the one way to connect to the server.

Shared by the engine's side (engine/backends/nats.py) and a GPU host's (engine/backends/gpu_host.py):
- stream `FLUX_JOBS` (work queue, file storage, a dedupe window), one `Queue` per model and per style with LoRA
  adapters on that model: subjects `flux.jobs.<model>` and `flux.jobs.<model>.<style>`, one durable pull consumer
  each (`jobs-<model>`, `jobs-<model>__<style>`) that every host serving it shares (so a style's jobs reach only
  hosts whose workers loaded its adapters): explicit ack, `max_deliver = 1` (retrying and failing over are the
  scheduler's decisions), `ack_wait` extended by the host while it works;
- stream `FLUX_RESULTS`, subjects `flux.results.<job>`, one durable consumer (`engine`) for the bot;
- core subjects `flux.events.<job>.<attempt>` (start, progress, previews) and `flux.cancel.<job>`;
- the images bucket (an Object Store: images exceed a message's 1 MiB) and the hosts bucket (a KV of heartbeats
  whose entries expire after `heartbeat_ttl_s`).

Only the bot creates streams, consumers and buckets: a GPU host only binds to them, so its account needs no
JetStream administration rights (docs/OPERATIONS.md, "Adding GPU hosts", has the permissions).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from engine.config import ModelSettings, NatsCredentials, NatsSettings, StyleSettings
from engine.errors import EngineError

log = logging.getLogger(__name__)

RESULTS_CONSUMER = "engine"
# A publish repeated within this window (a retry after a lost PubAck, a restart) is dropped by its message id.
DEDUPE_WINDOW_S = 600.0
# What nobody collected by then is dropped: results and images of jobs the bot no longer follows.
LEFTOVER_AGE_S = 24 * 3600.0
# The bot may take this long between receiving a result and acking it (it stores the image first).
RESULT_ACK_WAIT_S = 120.0
CONNECT_TIMEOUT_S = 5
RETRY_S = 1.0  # between two tries of a lane operation that must not be lost (the server restarts, say)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)  # what a lane operation may raise
T = TypeVar("T")


class NatsUnavailable(EngineError):
    """The NATS server cannot be reached, refused our credentials, or lacks the lane's streams."""


async def until_done(action: Callable[[], Awaitable[T]], what: str) -> T:
    """`action` tried until it succeeds: what must reach the server (a job, a result, an image) waits out an outage
    rather than being lost; a repeated publish is deduped by its message id."""
    while True:
        try:
            return await action()
        except ERRORS as exc:
            log.warning("%s failed (%s); retrying", what, exc)
        await asyncio.sleep(RETRY_S)


def token(name: str) -> str:
    """`name` as one subject token and consumer name; ValueError for a name that cannot be one."""
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} cannot name a NATS subject: use letters, digits, '-' and '_'")
    return name


@dataclass(frozen=True, slots=True)
class Queue:
    """Where the jobs of one model, with one style's LoRA adapters or none, wait for a host that serves them."""

    model: str
    style: str | None = None  # a style with adapters; a style without any is a prompt template, on the model's queue

    @property
    def subject(self) -> str:
        base = f"flux.jobs.{token(self.model)}"
        return base if self.style is None else f"{base}.{token(self.style)}"

    @property
    def consumer(self) -> str:
        # Consumer names cannot hold '.'; '__' cannot be mistaken for the '-' and '_' inside model and style names
        # as long as no model name contains '__', which token() names avoid by convention and queues() checks.
        base = f"jobs-{token(self.model)}"
        return base if self.style is None else f"{base}__{token(self.style)}"

    def __str__(self) -> str:
        return self.model if self.style is None else f"{self.model} with style {self.style}"


def queues(
    models: Mapping[str, ModelSettings], styles: Mapping[str, StyleSettings], serving: Iterable[str]
) -> list[Queue]:
    """The queues of the `serving` models: each model's own, and one per style with adapters that it may run."""
    found: list[Queue] = []
    for model in serving:
        if "__" in model:
            raise ValueError(f"{model!r}: a model served on the GPU lane cannot have '__' in its name")
        found.append(Queue(model))
        found += [
            Queue(model, name)
            for name, style in styles.items()
            if style.gpu_only and models[model].local and (not style.models or model in style.models)
        ]
    return found


def queue_of(model: str, style: str | None, styles: Mapping[str, StyleSettings]) -> Queue:
    """The queue of a job: its style's when that style has adapters, else its model's."""
    chosen = styles.get(style) if style else None
    return Queue(model, style if chosen is not None and chosen.gpu_only else None)


def events_subject(job_id: str, attempt: int) -> str:
    return f"flux.events.{token(job_id)}.{attempt}"


def results_subject(job_id: str) -> str:
    return f"flux.results.{token(job_id)}"


def cancel_subject(job_id: str) -> str:
    return f"flux.cancel.{token(job_id)}"


CANCEL_ALL = "flux.cancel.*"


def message_id(job_id: str, attempt: int) -> str:
    return f"{job_id}:{attempt}"


def image_name(job_id: str, attempt: int) -> str:
    return f"{job_id}.{attempt}.png"


@dataclass(slots=True)
class Lane:
    """A connection to the lane's server with its JetStream context and buckets."""

    client: Client
    js: JetStreamContext
    images: ObjectStore
    hosts: KeyValue

    async def close(self) -> None:
        if not self.client.is_closed:
            await self.client.close()


Callback = Callable[[], Awaitable[None]]


async def connect(
    settings: NatsSettings,
    credentials: NatsCredentials,
    name: str,
    *,
    on_disconnect: Callback | None = None,
    on_reconnect: Callback | None = None,
) -> Client:
    """A client that reconnects for ever once connected; NatsUnavailable when the first connection fails."""

    async def on_error(exc: Exception) -> None:
        log.warning("NATS %s: %s", settings.url, exc or type(exc).__name__)

    options: dict[str, Any] = {
        "servers": [settings.url],
        "name": name,
        "connect_timeout": CONNECT_TIMEOUT_S,
        # nats-py retries a first connection as it reconnects (for ever, here): refused credentials or a server
        # that is down would hang start-up. So the first connection gets one retry, a second later, and
        # reconnecting for ever is switched on once it has succeeded.
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 1,
        "error_cb": on_error,
    }
    if on_disconnect is not None:
        options["disconnected_cb"] = on_disconnect
    if on_reconnect is not None:
        options["reconnected_cb"] = on_reconnect
    if credentials.user is not None:
        options["user"] = credentials.user
        options["password"] = credentials.password or ""
    if credentials.token is not None:
        options["token"] = credentials.token
    if credentials.nkey_seed_file is not None:
        options["nkeys_seed"] = str(credentials.nkey_seed_file)
    if credentials.tls_ca_file or credentials.tls_cert_file:
        options["tls"] = _tls_context(credentials)
    client = Client()
    try:
        await client.connect(**options)
    except nats.errors.Error as exc:
        await _quietly_close(client)
        raise NatsUnavailable(_connect_problem(settings.url, exc)) from exc
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        await _quietly_close(client)
        raise NatsUnavailable(f"cannot connect to NATS at {settings.url}: {exc or type(exc).__name__}") from exc
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = -1
    return client


def _connect_problem(url: str, exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "authorization" in text.lower() or isinstance(exc, nats.errors.AuthorizationError):
        return (
            f"NATS at {url} refused the credentials (authorization violation): check NATS_USER/NATS_PASSWORD, "
            "NATS_TOKEN or NATS_NKEY_SEED_FILE"
        )
    if isinstance(exc, nats.errors.NoServersError):
        return f"cannot connect to NATS at {url}: no server answered (is nats-server running and reachable?)"
    return f"cannot connect to NATS at {url}: {text}"


def _tls_context(credentials: NatsCredentials) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(credentials.tls_ca_file) if credentials.tls_ca_file else None,
    )
    if credentials.tls_cert_file is not None:
        key = str(credentials.tls_key_file) if credentials.tls_key_file else None
        context.load_cert_chain(str(credentials.tls_cert_file), key)
    return context


async def _quietly_close(client: Client) -> None:
    try:
        await client.close()
    except Exception:  # a client that never connected may fail to close; there is nothing left to free
        log.debug("closing a NATS client that did not connect", exc_info=True)


async def create_lane(client: Client, settings: NatsSettings, lane_queues: list[Queue]) -> Lane:
    """The bot's side: create (or update) the streams, consumers and buckets, then the lane over them."""
    js = client.jetstream()
    await _ensure_stream(
        js,
        StreamConfig(
            name=settings.jobs_stream,
            subjects=["flux.jobs.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DEDUPE_WINDOW_S,
            max_age=LEFTOVER_AGE_S,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=settings.results_stream,
            subjects=["flux.results.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DEDUPE_WINDOW_S,
            max_age=LEFTOVER_AGE_S,
        ),
    )
    await add_queues(js, settings, lane_queues)
    await js.add_consumer(
        settings.results_stream,
        ConsumerConfig(
            name=RESULTS_CONSUMER,
            durable_name=RESULTS_CONSUMER,
            filter_subject="flux.results.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=RESULT_ACK_WAIT_S,
            max_deliver=-1,
            max_ack_pending=-1,
        ),
    )
    images = await _object_store(js, settings.images_bucket)
    hosts = await _hosts_bucket(js, settings)
    return Lane(client, js, images, hosts)


async def add_queues(js: JetStreamContext, settings: NatsSettings, lane_queues: list[Queue]) -> None:
    """Each queue's durable consumer (adding one that exists with the same config changes nothing)."""
    for queue in lane_queues:
        await js.add_consumer(
            settings.jobs_stream,
            ConsumerConfig(
                name=queue.consumer,
                durable_name=queue.consumer,
                filter_subject=queue.subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.ack_wait_s,
                max_deliver=1,
                max_ack_pending=-1,
            ),
        )


async def bind_lane(client: Client, settings: NatsSettings) -> Lane:
    """A GPU host's side: the lane the bot created; NatsUnavailable while it has not (yet)."""
    js = client.jetstream()
    try:
        await js.stream_info(settings.jobs_stream)
        images = await js.object_store(settings.images_bucket)
        hosts = await js.key_value(settings.hosts_bucket)
    except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError) as exc:
        raise NatsUnavailable(
            f"the GPU lane's streams and buckets ({settings.jobs_stream}, {settings.images_bucket},"
            f" {settings.hosts_bucket}) are not on the server yet: the bot creates them when it starts with"
            " [nats] url set"
        ) from exc
    return Lane(client, js, images, hosts)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # It exists with other settings (an older flux-bot, an operator's edit): bring it to ours.
        await js.update_stream(config)


async def _object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        # nats-py takes the bucket's name apart from its config, and overwrites the config's with it.
        return await js.create_object_store(
            bucket, config=ObjectStoreConfig(bucket=bucket, ttl=LEFTOVER_AGE_S, storage=StorageType.FILE)
        )


async def _hosts_bucket(js: JetStreamContext, settings: NatsSettings) -> KeyValue:
    try:
        return await js.key_value(settings.hosts_bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            config=KeyValueConfig(bucket=settings.hosts_bucket, ttl=settings.heartbeat_ttl_s, history=1)
        )
