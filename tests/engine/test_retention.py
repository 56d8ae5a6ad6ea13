"""Image retention through the real engine on a fake clock: old results are deleted, new ones kept, rows updated."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.commands import Commands
from engine.errors import NotAllowed
from engine.models import FailureReason, JobDone, JobFailed
from engine.retention import SWEEP_EVERY_S, Retention, image_store
from tests.conftest import SettingsFactory, user
from tests.engine.clocked import ClockedJobs, Outcome

START = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
async def jobs() -> AsyncIterator[ClockedJobs]:
    harness = ClockedJobs()
    yield harness
    await harness.close()


def on_disk(*paths: Path | str) -> list[bool]:
    return [Path(path).is_file() for path in paths]


def stray(directory: Path, name: str, mtime: datetime) -> Path:
    path = directory / name
    path.write_bytes(b"not a job's image")
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


async def test_a_restart_sweeps_old_results_and_keeps_new_ones(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    settings = make_settings(tiers={"default": {}})  # keep_images_days: the default 30
    assert settings.bot.keep_images_days == 30
    engine = await jobs.open(settings)
    old = await jobs.run(engine, START, "schnell", Outcome(5))
    new = await jobs.run(engine, START + 20 * DAY, "schnell", Outcome(5))
    assert isinstance(old, JobDone) and isinstance(new, JobDone)
    old_path = Path(str((await engine._store.get_job(old.job_id)).result_path))
    new_path = Path(str((await engine._store.get_job(new.job_id)).result_path))
    images = settings.bot.images_dir
    old_stray = stray(images, "jleftover.png.tmp", START)
    new_stray = stray(images, "jrecent.png", START + 25 * DAY)
    await engine.close()

    jobs.clock.now = (START + 31 * DAY).timestamp()
    engine = await jobs.open(settings)  # the sweep runs once at start

    assert on_disk(old_path, old_stray, new_path, new_stray) == [False, False, True, True]
    removed = await engine._store.get_job(old.job_id)
    assert removed.result_path is None and removed.cost_micros == old.cost_micros
    assert (await engine._store.get_job(new.job_id)).result_path == str(new_path)
    [audit] = await engine._store.audit_log("image.removed")
    assert audit["job_id"] == old.job_id and "older than 30 days" in audit["detail"]
    # /job still shows it, and says the image is gone.
    shown = await Commands(engine).job(user(), old.job_id)
    assert f"Job {old.job_id}: done" in shown and "image: no longer stored" in shown
    # Delivering it now (it was never marked delivered) says so instead of failing on the missing file.
    assert old.job_id in {job.id for job in await engine.undelivered()}
    event = await engine.terminal_event(removed)
    assert isinstance(event, JobFailed) and event.reason is FailureReason.IMAGE_REMOVED
    assert isinstance(await engine.terminal_event(await engine._store.get_job(new.job_id)), JobDone)


async def test_the_hourly_sweep_follows_the_clock(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    settings = make_settings(bot={"keep_images_days": 2}, tiers={"default": {}})
    engine = await jobs.open(settings)
    done = await jobs.run(engine, START, "schnell", Outcome(5))
    path = Path(str((await engine._store.get_job(done.job_id)).result_path))
    seen: list[bool] = []  # at each sleep: is the image still there after the sweeps so far

    class Stop(Exception):
        pass

    async def sleep(seconds: float) -> None:
        assert seconds == SWEEP_EVERY_S
        seen.extend(on_disk(path))
        if len(seen) == 4:
            raise Stop
        jobs.clock.now += DAY.total_seconds()

    retention = Retention(engine._store, settings.bot, jobs.clock, sleep=sleep)
    with pytest.raises(Stop):
        await retention.run()
    # Swept at +1, +2 and +3 days: kept while at most 2 days old, removed by the first sweep after that.
    assert seen == [True, True, True, False]
    assert (await engine._store.get_job(done.job_id)).result_path is None


async def test_the_file_outside_the_store_and_zero_days(jobs: ClockedJobs, make_settings: SettingsFactory) -> None:
    settings = make_settings(bot={"keep_images_days": 0}, tiers={"default": {}})
    engine = await jobs.open(settings)
    done = await jobs.run(engine, START, "schnell", Outcome(5))
    jobs.clock.now = (START + 3650 * DAY).timestamp()
    assert (await engine._retention.sweep()).jobs == ()  # 0 = kept forever
    job = await engine._store.get_job(done.job_id)
    assert job.result_path is not None and on_disk(job.result_path) == [True]
    # Gone from the disk behind flux-bot's back: delivering it says so, it does not raise.
    os.unlink(job.result_path)
    event = await engine.terminal_event(job)
    assert isinstance(event, JobFailed) and event.reason is FailureReason.IMAGE_REMOVED
    assert image_store(settings.bot.images_dir).files == 0


async def test_delete_result_checks_rights_and_removes_the_file(
    jobs: ClockedJobs, make_settings: SettingsFactory
) -> None:
    settings = make_settings(tiers={"default": {}})
    engine = await jobs.open(settings)
    done = await jobs.run(engine, START, "schnell", Outcome(5))
    path = Path(str((await engine._store.get_job(done.job_id)).result_path))
    with pytest.raises(NotAllowed):
        await engine.delete_result(user("bob"), done.job_id)
    assert on_disk(path) == [True]
    assert await engine.delete_result(user(), done.job_id)
    assert on_disk(path) == [False] and (await engine._store.get_job(done.job_id)).result_path is None
    assert not await engine.delete_result(user("root", admin=True), done.job_id)  # nothing left to delete
    [audit] = await engine._store.audit_log("image.removed")
    assert audit["actor"] == user().user_key
