"""The Engine facade end to end: bad input stores nothing; the real BFL client behind the engine, across restarts."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

import aiosqlite
import pytest

from engine.backends.bfl import BflBackend
from engine.config import Secrets, Settings
from engine.errors import EngineError, InvalidRequest, JobNotFound, NotAllowed, PolicyBlocked
from engine.models import (
    BackendKind,
    BackendStatus,
    ImageRequest,
    JobDone,
    JobFailed,
    JobState,
    Mode,
    ResolvedRequest,
    Resource,
)
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.bfl_server import API_KEY, FakeBfl


async def _nothing_stored(engine: Engine) -> None:
    async with aiosqlite.connect(engine._store.path) as db:
        for table in ("jobs", "ledger", "users"):
            row = await (await db.execute(f"SELECT COUNT(*) FROM {table}")).fetchone()
            assert row == (0,), table


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (ImageRequest("", "schnell"), PolicyBlocked),
        (ImageRequest("   ", "schnell"), PolicyBlocked),
        (ImageRequest("x" * 10_000, "schnell"), PolicyBlocked),
        (ImageRequest("a cat\x00\x1b[2J", "schnell"), PolicyBlocked),
        (ImageRequest("a cat", "flux-9000"), InvalidRequest),
        (ImageRequest("a cat", "schnell", steps=0), InvalidRequest),
        (ImageRequest("a cat", "schnell", steps=9), InvalidRequest),
        (ImageRequest("a cat", "schnell", seed=-1), InvalidRequest),
        (ImageRequest("a cat", "schnell", seed=2**40), InvalidRequest),
        (ImageRequest("a cat", "schnell", aspect_ratio="5:4"), InvalidRequest),
        (ImageRequest("a cat", "schnell", width=1000, height=1024), InvalidRequest),
        (ImageRequest("a cat", "schnell", width=1024), InvalidRequest),
        (ImageRequest("a cat", "dev", guidance=9.0), InvalidRequest),
        (ImageRequest("a cat", "ultra", width=1024, height=1024), InvalidRequest),
    ],
)
async def test_bad_input_gets_a_clear_error_and_stores_nothing(
    make_engine: EngineFactory, request_: ImageRequest, error: type[EngineError]
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    with pytest.raises(error) as caught:
        await engine.submit(user(), request_)
    assert str(caught.value)
    await _nothing_stored(engine)


async def test_sql_looking_prompt_is_just_text(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    prompt = 'a cat\'); DROP TABLE jobs; -- and "quotes"'
    queued = await engine.submit(user(), ImageRequest(prompt, "schnell"))
    assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
    assert (await engine._store.get_job(queued.job_id)).request.prompt == prompt


async def test_policy_decisions_are_audited(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(
        policy={"blocked_words": ["weapons"], "allowed_phrases": ["weapons in a game-design brief"]}
    )
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, settings)
    with pytest.raises(PolicyBlocked):
        await engine.submit(user(), ImageRequest("a pile of weapons", "schnell"))
    queued = await engine.submit(user(), ImageRequest("concept art: weapons in a game-design brief", "schnell"))
    await wait_terminal(engine, queued.job_id)
    actions = [(entry["action"], entry["job_id"]) for entry in await engine._store.audit_log()]
    assert ("policy.block", None) in actions
    assert ("policy.allow", queued.job_id) in actions


async def test_banned_user_and_other_peoples_jobs(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    alice, bob, admin = user("alice"), user("bob"), user("root", admin=True)
    queued = await engine.submit(alice, ImageRequest("a kite", "schnell"))
    await wait_terminal(engine, queued.job_id)
    with pytest.raises(JobNotFound):
        await engine.job(bob, queued.job_id)  # someone else's job looks like a missing one
    assert (await engine.job(admin, queued.job_id)).id == queued.job_id
    with pytest.raises(NotAllowed):
        await engine.admin_ban(bob, alice.user_key, True)
    await engine.admin_ban(admin, alice.user_key, True)
    with pytest.raises(NotAllowed):
        await engine.submit(alice, ImageRequest("another kite", "schnell"))


async def test_admin_by_configured_user_id_and_role(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(admins={"user_ids": ["42"], "role_ids": ["mods"]})
    engine = await make_engine({}, settings)
    assert engine.is_admin(user("42"))
    assert engine.is_admin(user("7", roles=("mods",)))
    assert not engine.is_admin(user("7", roles=("members",)))
    with pytest.raises(NotAllowed):
        await engine.admin_spend(user("7"))


@dataclass
class _Measuring(ScriptedBackend):
    """Every look at its load finds a newer measurement, as a GPU that keeps finishing jobs would."""

    def status(self, queued_ahead: int, request: ResolvedRequest | None = None) -> BackendStatus:
        self.seconds_per_job += 1.0
        return super().status(queued_ahead, request)


async def test_the_queued_note_quotes_the_same_wait_as_its_reason(make_engine: EngineFactory) -> None:
    local = _Measuring(seconds_per_job=10.0, gate=asyncio.Event())
    engine = await make_engine({BackendKind.LOCAL: local})
    first = await engine.submit(user("alice"), ImageRequest("a cat", "schnell"))
    while first.job_id not in local.started:
        await asyncio.sleep(0.01)
    queued = await engine.submit(user("bob"), ImageRequest("a dog", "schnell"))
    # One snapshot: the route, its reason and the note agree, though the backend's estimate moved meanwhile.
    assert queued.eta_s == queued.route.eta_s
    assert queued.wait_s == queued.route.wait_s > 0
    assert queued.route.reason == f"local: queue wait ~{math.ceil(queued.wait_s)} s <= 15 s"
    assert queued.eta_s == queued.wait_s + local.seconds_per_job


async def _bfl_engine(settings: Settings, bfl: FakeBfl) -> Engine:
    backend = BflBackend(settings.bfl.model_copy(update={"api_url": bfl.api_url}), settings.models, API_KEY)
    store = await Store.open(settings.bot.database_path)
    engine = Engine(settings, Secrets(bfl_api_key=API_KEY), store, {BackendKind.API: backend})
    await engine.start()
    return engine


async def test_real_bfl_client_through_the_engine(make_settings: SettingsFactory) -> None:
    settings = make_settings(bfl={"poll_interval_s": 0.01, "poll_max_interval_s": 0.02})
    async with FakeBfl(pending_polls=2, poll_host="region", cost=3.5) as bfl:
        engine = await _bfl_engine(settings, bfl)
        try:
            queued = await engine.submit(user(), ImageRequest("a lighthouse", "pro"))
            done = await wait_terminal(engine, queued.job_id)
            assert isinstance(done, JobDone) and done.cost_micros == 35_000  # the answer's cost, not the table's
            assert {r.host for r in bfl.polls()} == {bfl.hostport("region")}
            bfl.final_status = "Content Moderated"
            queued = await engine.submit(user(), ImageRequest("a lighthouse", "pro"))
            failed = await wait_terminal(engine, queued.job_id)
            assert isinstance(failed, JobFailed) and failed.charged_micros == 0
            assert (await engine._store.ledger_totals())[Resource.USD_MICROS.value] == 35_000
            assert await engine.admin_credits(user("root", admin=True)) == 12_345_000
        finally:
            await engine.close()


async def test_no_bfl_job_is_billed_twice_across_a_restart(make_settings: SettingsFactory) -> None:
    settings = make_settings(bfl={"poll_interval_s": 0.01, "poll_max_interval_s": 0.02})
    async with FakeBfl(pending_polls=10_000) as bfl:
        first = await _bfl_engine(settings, bfl)
        queued = await first.submit(user(), ImageRequest("a lighthouse", "pro", mode=Mode.FAST))

        async def task_stored() -> None:
            while (await first._store.get_job(queued.job_id)).resume is None:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(task_stored(), 10)
        await first.close()  # the process stops while BFL is still working on the task
        assert (await _job_state(settings, queued.job_id)) is JobState.RUNNING

        for task in bfl.tasks.values():
            task.pending_polls = 0  # BFL finishes it while flux-bot is down
        second = await _bfl_engine(settings, bfl)
        try:
            done = await wait_terminal(second, queued.job_id)
            assert isinstance(done, JobDone)
            assert bfl.count("POST") == 1  # polled again, never submitted twice
            lines = await second._store.job_ledger(queued.job_id)
            usd = [(line["entry"], line["amount"]) for line in lines if line["resource"] == "usd_micros"]
            assert usd == [("reserve", 40_000), ("settle", 40_000)]
        finally:
            await second.close()


async def _job_state(settings: Settings, job_id: str) -> JobState:
    store = await Store.open(settings.bot.database_path)
    try:
        return (await store.get_job(job_id)).state
    finally:
        await store.close()


async def test_guidance_is_refused_for_a_model_that_takes_none_and_stored_as_used(make_engine: EngineFactory) -> None:
    engine = await make_engine(
        {BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: ScriptedBackend(BackendKind.API)}
    )
    for model in ("schnell", "pro", "ultra"):
        with pytest.raises(InvalidRequest) as caught:
            await engine.submit(user(), ImageRequest("a cat", model, guidance=3.0))
        display = engine.settings.models[model].display_name
        assert caught.value.field == "guidance"
        assert (
            caught.value.problem
            == f"{display} takes no guidance value; leave guidance out, or choose a model that takes it (dev)"
        )
    await _nothing_stored(engine)
    # What a job really used is what is stored: none for schnell, the default or the value asked for on dev.
    used = {}
    for model, guidance in (("schnell", None), ("dev", None), ("dev", 4.5)):
        queued = await engine.submit(user(), ImageRequest("a cat", model, guidance=guidance))
        await wait_terminal(engine, queued.job_id)
        used[(model, guidance)] = (await engine._store.get_job(queued.job_id)).request.guidance
    assert used == {("schnell", None): None, ("dev", None): 3.0, ("dev", 4.5): 4.5}


class _RefusingBackend(ScriptedBackend):
    """A backend whose start fails, as a worker that cannot load its model does."""

    async def start(self) -> None:
        raise RuntimeError("the model could not be loaded")


async def test_a_failed_start_closes_the_database_again(make_settings: SettingsFactory) -> None:
    """Otherwise the database's thread outlives the failure and the process cannot exit (Ctrl-C at start-up hung)."""
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="could not be loaded"):
        await Engine.open(make_settings(), Secrets(), backends={BackendKind.LOCAL: _RefusingBackend()})
    # A closed connection's thread ends just after close() returns; one left open never ends.
    started = [thread for thread in threading.enumerate() if thread not in before]
    for thread in started:
        thread.join(timeout=10)
    assert [thread for thread in started if thread.is_alive()] == []
