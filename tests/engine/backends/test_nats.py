"""The GPU lane across hosts: a real nats-server, GPU host processes (`flux-bot worker --nats`), the real engine.

Hosts run the tiny FLUX pipeline where the image matters and the synthetic worker (a fixed time per job, a fixed
PNG) where only timing and failures do. Every test ends with the ledger's totals consistent with its lines.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import pytest
from PIL import Image

from engine.backends.factory import GPU_HOSTS, build_backends
from engine.backends.jetstream import Queue, message_id, results_subject
from engine.backends.nats import RemoteHosts
from engine.backends.pool import GpuPool
from engine.backends.protocol import LaneJob, LaneOutcome, LaneResult, encode
from engine.config import Secrets, Settings
from engine.errors import BackendUnavailable
from engine.models import ASPECT_SIZES, BackendKind, ImageRequest, JobCancelled, JobDone, JobState, Task
from engine.service import Engine
from engine.store import Store
from tests.conftest import SettingsFactory, user, wait_terminal
from tests.fakes.gpu_hosts import FAST_LANE, GpuHosts, LaneObserver
from tests.fakes.nats_server import NatsServer, users_config
from tests.fakes.tiny_flux import build_tiny_flux

SMALL = ImageRequest("a lighthouse at dusk", "schnell", width=256, height=256)


async def until(condition: Callable[[], bool], limit_s: float = 60.0, what: str = "") -> None:
    """Wait for a condition the test causes (the limit only guards against a hung test)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


async def until_async(condition: Callable[[], Awaitable[bool]], limit_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    nats_server = NatsServer(tmp_path / "nats")
    await nats_server.start()
    try:
        yield nats_server
    finally:
        await nats_server.stop()


@pytest.fixture
async def hosts(tmp_path: Path, server: NatsServer) -> AsyncIterator[GpuHosts]:
    started = GpuHosts(tmp_path / "hosts", server.url)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def observer(server: NatsServer) -> AsyncIterator[LaneObserver]:
    watching = await LaneObserver.connect(server.url)
    try:
        yield watching
    finally:
        await watching.close()


def lane_settings(make_settings: SettingsFactory, server: NatsServer, **sections: object) -> Settings:
    return make_settings(
        nats={"url": server.url, **FAST_LANE},
        routing={"api_enabled": False},
        **sections,
    )


class Bot:
    """An engine whose GPU lane is the GPU hosts, built as `flux-bot run` builds it."""

    def __init__(self, engine: Engine, pool: GpuPool) -> None:
        self.engine = engine
        self.pool = pool

    @classmethod
    async def open(cls, settings: Settings) -> Bot:
        backends, demo = await build_backends(settings, Secrets())
        assert not demo
        engine = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), backends)
        await engine.start()
        pool = backends[BackendKind.LOCAL]
        assert isinstance(pool, GpuPool)
        return cls(engine, pool)

    @property
    def remote(self) -> RemoteHosts:
        (member,) = self.pool.members
        assert member.name == GPU_HOSTS and isinstance(member.backend, RemoteHosts)
        return member.backend

    async def until_slots(self, slots: int) -> None:
        await asyncio.wait_for(self.remote.wait_for_slots(slots), 60)

    async def close(self) -> None:
        await self.engine.close()


@pytest.fixture
async def open_bot() -> AsyncIterator[Callable[[Settings], Awaitable[Bot]]]:
    bots: list[Bot] = []

    async def build(settings: Settings) -> Bot:
        bot = await Bot.open(settings)
        bots.append(bot)
        return bot

    yield build
    for bot in bots:
        await bot.close()


async def ledger_consistent(settings: Settings) -> None:
    store = await Store.open(settings.bot.database_path)
    try:
        assert await store.verify_totals() == []
    finally:
        await store.close()


def png_size(image: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(image)) as opened:
        return opened.size


async def test_jobs_run_end_to_end_on_two_hosts_with_the_tiny_model(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
    tiny_flux: Path,
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    await hosts.start("gpu-a", model_path=tiny_flux)
    await hosts.start("gpu-b", model_path=tiny_flux)
    await bot.until_slots(2)
    assert bot.pool.status(0).detail.endswith("2 GPU hosts online, 0 of 2 GPUs busy")

    jobs = [await bot.engine.submit(user(name), SMALL) for name in ("alice", "bob")]
    assert all(job.route.backend is BackendKind.LOCAL for job in jobs)
    results = [await wait_terminal(bot.engine, job.job_id, 120) for job in jobs]

    for result in results:
        assert isinstance(result, JobDone), result
        assert png_size(result.image) == (256, 256)
    assert {observer.start_of(job.job_id).host for job in jobs} == {"gpu-a", "gpu-b"}  # type: ignore[union-attr]
    assert observer.progress, "progress reached the bot's subjects"
    stored = await bot.engine.get_job(jobs[0].job_id)
    assert stored.state is JobState.DONE and stored.attempts == 1
    await ledger_consistent(settings)


INK_HASH = "cd" * 32
INK_STYLE = {
    "inkwash": {
        "display_name": "Ink wash",
        "template": "{prompt}, sumi-e",
        "adapters": [{"file": "/srv/loras/inkwash.safetensors", "sha256": INK_HASH}],
    }
}
INK_CONFIG = f"""
[styles.inkwash]
display_name = "Ink wash"
template = "{{prompt}}, sumi-e"
adapters = [{{ file = "/srv/loras/inkwash.safetensors", sha256 = "{INK_HASH}" }}]
"""


async def test_a_style_job_goes_only_to_a_host_serving_the_style(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    bot = await open_bot(lane_settings(make_settings, server, styles=INK_STYLE))
    # The synthetic worker loads no weights: its host still serves the queues its config gives it.
    await hosts.start("gpu-plain", synthetic_s=0.2)
    await bot.until_slots(1)
    styled = ImageRequest("a heron", "schnell", width=256, height=256, style="inkwash")
    with pytest.raises(BackendUnavailable, match="no GPU host online has the style inkwash"):
        await bot.engine.submit(user(), styled)

    await hosts.start("gpu-ink", synthetic_s=0.2, config_tail=INK_CONFIG)
    await bot.until_slots(2)
    assert {beat.host: beat.styles for beat in bot.remote.hosts()} == {"gpu-plain": (), "gpu-ink": ("inkwash",)}
    jobs = [await bot.engine.submit(user(name), styled) for name in ("alice", "bob", "carol")]
    for job in jobs:
        assert isinstance(await wait_terminal(bot.engine, job.job_id, 60), JobDone)
    assert {observer.start_of(job.job_id).host for job in jobs} == {"gpu-ink"}  # type: ignore[union-attr]


async def test_an_image_larger_than_one_message_goes_through_the_object_store(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    open_bot: Callable[[Settings], Awaitable[Bot]],
    tiny_flux: Path,
) -> None:
    bot = await open_bot(lane_settings(make_settings, server))
    await hosts.start("gpu-a", model_path=tiny_flux)
    await bot.until_slots(1)
    job = await bot.engine.submit(user(), ImageRequest("noise, large", "schnell", width=1024, height=1024))
    result = await wait_terminal(bot.engine, job.job_id, 180)
    assert isinstance(result, JobDone), result
    assert len(result.image) > 1 << 20, "the test needs an image over NATS's 1 MiB message limit"
    assert png_size(result.image) == (1024, 1024)


async def test_a_worker_killed_mid_job_is_retried_once_and_charged_once(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    await hosts.start("gpu-a", synthetic_s=4.0)
    await bot.until_slots(1)
    job = await bot.engine.submit(user(), SMALL)
    await observer.until_started(job.job_id)
    os.kill(observer.worker_pid(job.job_id), signal.SIGKILL)

    result = await wait_terminal(bot.engine, job.job_id, 120)
    assert isinstance(result, JobDone), result
    stored = await bot.engine.get_job(job.job_id)
    assert stored.attempts == 2  # the crash, then the retry on the host's fresh worker
    assert len({event.worker for event in observer.started if event.id == job.job_id}) == 2
    await ledger_consistent(settings)


async def test_a_killed_host_is_declared_gone_and_its_job_runs_on_another(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    first = await hosts.start("gpu-a", synthetic_s=30.0)
    await bot.until_slots(1)
    job = await bot.engine.submit(user(), SMALL)
    await observer.until_started(job.job_id)
    assert observer.start_of(job.job_id).host == "gpu-a"  # type: ignore[union-attr]
    await hosts.start("gpu-b", synthetic_s=0.5)
    await bot.until_slots(2)
    await hosts.kill(first)

    result = await wait_terminal(bot.engine, job.job_id, 120)
    assert isinstance(result, JobDone), result
    assert observer.start_of(job.job_id).host == "gpu-b"  # type: ignore[union-attr]
    stored = await bot.engine.get_job(job.job_id)
    assert stored.attempts == 2
    await ledger_consistent(settings)


async def test_a_lost_host_with_no_other_fails_the_job_unpaid(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server, scheduler={"local_retries": 0})
    bot = await open_bot(settings)
    host = await hosts.start("gpu-a", synthetic_s=30.0)
    await bot.until_slots(1)
    job = await bot.engine.submit(user(), SMALL)
    await observer.until_started(job.job_id)
    await hosts.kill(host)

    result = await wait_terminal(bot.engine, job.job_id, 60)
    assert type(result).__name__ == "JobFailed"
    assert result.reason.value == "host_lost" and result.charged_micros == 0  # type: ignore[union-attr]
    assert "gpu-a" in result.detail  # type: ignore[union-attr]
    await ledger_consistent(settings)


async def test_a_nats_server_restart_loses_no_job(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    await hosts.start("gpu-a", synthetic_s=2.0)
    await bot.until_slots(1)
    jobs = [await bot.engine.submit(user(name), SMALL) for name in ("alice", "bob", "carol")]
    await observer.until_started(jobs[0].job_id)
    await server.stop()
    await asyncio.sleep(1.5)
    await server.start()

    results = [await wait_terminal(bot.engine, job.job_id, 120) for job in jobs]
    assert all(isinstance(result, JobDone) for result in results), results
    await ledger_consistent(settings)


async def test_a_bot_restart_resumes_jobs_in_flight_without_publishing_them_again(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
) -> None:
    settings = lane_settings(make_settings, server)
    first = await Bot.open(settings)
    await hosts.start("gpu-a", synthetic_s=3.0)
    await first.until_slots(1)
    job = await first.engine.submit(user(), SMALL)
    await observer.until_started(job.job_id)
    stored = await first.engine.get_job(job.job_id)
    assert stored.resume is not None, "the token is stored before the bot waits"
    await first.close()

    second = await Bot.open(settings)
    try:
        result = await wait_terminal(second.engine, job.job_id, 60)
        assert isinstance(result, JobDone), result
    finally:
        await second.close()
    client = await nats.connect(server.url)
    try:
        info = await client.jetstream().consumer_info("FLUX_JOBS", Queue("schnell").consumer)
        assert info.delivered.consumer_seq == 1  # published once, taken once
    finally:
        await client.close()
    await ledger_consistent(settings)


async def test_duplicates_are_harmless(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    await hosts.start("gpu-a", synthetic_s=0.2)
    await bot.until_slots(1)
    job = await bot.engine.submit(user(), SMALL)
    done = await wait_terminal(bot.engine, job.job_id, 60)
    assert isinstance(done, JobDone)

    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        # A job published again with its message id (a retry after a lost confirmation) is dropped by JetStream.
        repeat = LaneJob(job.job_id, 1, "schnell", "again", 64, 64, 4, None, 1)
        again = await js.publish(
            "flux.jobs.schnell", encode(repeat), headers={"Nats-Msg-Id": message_id(job.job_id, 1)}
        )
        assert again.duplicate
        # A result delivered twice (here: published again under another id) changes nothing.
        late = LaneResult(job.job_id, 1, "gpu-a", LaneOutcome.DONE, seed=1, seconds=0.1, image="gone.png")
        await js.publish(results_subject(job.job_id), encode(late), headers={"Nats-Msg-Id": "replayed"})

        async def drained() -> bool:
            info = await js.consumer_info("FLUX_RESULTS", "engine")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until_async(drained, what="the late result to be dropped")
    finally:
        await client.close()
    stored = await bot.engine.get_job(job.job_id)
    assert stored.state is JobState.DONE and stored.attempts == 1
    await ledger_consistent(settings)


async def test_cancel_a_queued_and_a_running_remote_job(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    observer: LaneObserver,
    open_bot: Callable[[Settings], Awaitable[Bot]],
) -> None:
    settings = lane_settings(make_settings, server)
    bot = await open_bot(settings)
    await hosts.start("gpu-a", synthetic_s=12.0)  # 3 s a step: a cancel waits at most one
    await bot.until_slots(1)
    running = await bot.engine.submit(user("alice"), SMALL)
    await observer.until_started(running.job_id)
    queued = await bot.engine.submit(user("bob"), SMALL)

    cancelled = await bot.engine.cancel(user("bob"), queued.job_id)
    assert isinstance(cancelled, JobCancelled) and cancelled.charged_micros == 0
    first_worker = observer.worker_pid(running.job_id)
    await bot.engine.cancel(user("alice"), running.job_id)
    result = await wait_terminal(bot.engine, running.job_id, 30)
    assert isinstance(result, JobCancelled)

    # The host stopped the job at its next step and serves the next one on the same worker.
    follow_up = await bot.engine.submit(user("carol"), SMALL)
    await observer.until_started(follow_up.job_id)
    assert observer.worker_pid(follow_up.job_id) == first_worker
    assert observer.start_of(queued.job_id) is None  # never published: it was cancelled in SQLite
    assert [beat.recycles for beat in bot.remote.hosts()] == [0]
    await bot.engine.cancel(user("carol"), follow_up.job_id)
    await ledger_consistent(settings)


async def test_a_host_with_wrong_credentials_is_refused_and_one_with_host_rights_serves(
    make_settings: SettingsFactory, tmp_path: Path, open_bot: Callable[[Settings], Awaitable[Bot]]
) -> None:
    secured = NatsServer(
        tmp_path / "secured",
        config=users_config({"bot": "bot-secret", "gpu": "gpu-secret"}, gpu_host_users=("gpu",)),
    )
    await secured.start()
    hosts = GpuHosts(tmp_path / "hosts", secured.url)
    try:
        wrong = await hosts.start("intruder", synthetic_s=0.1, env={"NATS_USER": "gpu", "NATS_PASSWORD": "guess"})
        assert await asyncio.wait_for(wrong.process.wait(), 60) == 1
        assert "refused the credentials" in wrong.output()
        assert "guess" not in wrong.output()

        settings = make_settings(nats={"url": secured.url, **FAST_LANE}, routing={"api_enabled": False})
        backends, _ = await build_backends(
            settings, Secrets.from_env({"NATS_USER": "bot", "NATS_PASSWORD": "bot-secret"})
        )
        engine = Engine(settings, Secrets(), await Store.open(settings.bot.database_path), backends)
        await engine.start()
        try:
            await hosts.start("gpu-a", synthetic_s=0.2, env={"NATS_USER": "gpu", "NATS_PASSWORD": "gpu-secret"})
            pool = backends[BackendKind.LOCAL]
            await until(lambda: pool.capacity() >= 1, what="the host with GPU host rights to beat")
            job = await engine.submit(user(), SMALL)
            assert isinstance(await wait_terminal(engine, job.job_id, 60), JobDone)
        finally:
            await engine.close()
    finally:
        await hosts.close()
        await secured.stop()


async def test_a_host_whose_workers_cannot_start_offers_no_slot(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    open_bot: Callable[[Settings], Awaitable[Bot]],
    tmp_path: Path,
) -> None:
    bot = await open_bot(lane_settings(make_settings, server))
    broken = await hosts.start("gpu-broken", model_path=tmp_path / "no-such-weights")
    await until(lambda: [(beat.host, beat.slots) for beat in bot.remote.hosts()] == [("gpu-broken", 0)], 120)
    assert bot.remote.capacity() == 0 and not bot.pool.status(0).healthy
    assert "failed to start" in broken.output()


async def test_a_variation_and_an_edit_carry_their_input_image_to_the_host(
    make_settings: SettingsFactory,
    server: NatsServer,
    hosts: GpuHosts,
    open_bot: Callable[[Settings], Awaitable[Bot]],
    tiny_flux: Path,
) -> None:
    bot = await open_bot(lane_settings(make_settings, server))
    # The tiny model is its own Kontext here, as the demo model is: the host then serves edits too.
    hosts.local = {**hosts.local, "kontext_model": str(tiny_flux)}
    await hosts.start("gpu-a", model_path=tiny_flux, models="schnell,kontext-dev")
    await bot.until_slots(1)
    source = Image.new("RGB", (300, 200), (200, 40, 40))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    vary = ImageRequest("a red fox", "schnell", task=Task.VARY, input_image=buffer.getvalue(), strength=0.5)
    edit = ImageRequest("make it blue", "kontext-dev", task=Task.EDIT, input_image=buffer.getvalue(), steps=4)
    jobs = [await bot.engine.submit(user(name), request) for name, request in (("alice", vary), ("bob", edit))]
    varied, edited = [await wait_terminal(bot.engine, job.job_id, 120) for job in jobs]
    assert isinstance(varied, JobDone) and isinstance(edited, JobDone), (varied, edited)
    assert png_size(varied.image) == ASPECT_SIZES["3:2"]  # the input's shape, in its standard size
    width, height = png_size(edited.image)  # Kontext picks the trained size nearest that shape
    assert abs(width / height - 1.5) < 0.1
