"""The review step: what holds an image, what a held job tells its requester and costs, approve and reject (also
after a restart), the audit trail, and the real nudenet classifier on an image made in the test."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from bot.commands import Commands
from engine.config import ReviewSettings
from engine.errors import InvalidRequest, NotAllowed
from engine.models import (
    BackendEvent,
    BackendJob,
    BackendKind,
    Finished,
    ImageRequest,
    JobDone,
    JobEvent,
    JobHeld,
    JobRejected,
    JobState,
    Platform,
    Requester,
    Review,
)
from engine.review import NudenetClassifier, ReviewStep
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend, tiny_png
from tests.fakes.classifier import MarkerClassifier, marked_png

ADMIN = user("root", admin=True)


def plain_png() -> bytes:
    return tiny_png()


@pytest.mark.parametrize(
    ("prompt", "held"),
    [
        ("Super Mario jumping over a pipe", True),
        ("super  MARIO in the rain", True),  # case and spacing do not hide a phrase
        ("Ｍａｒｉｏ in fullwidth letters", True),  # nor NFKC forms
        ("Mar\u200bio with a zero-width space", True),  # nor invisible characters
        ("Marion at the seaside", False),  # whole words only
        ("a red fox in the snow", False),
    ],
)
def test_review_phrases_hold_whole_words_whatever_their_form(prompt: str, held: bool) -> None:
    step = ReviewStep(ReviewSettings(phrases=("Mario", "Acme Corp")), None)
    decision = step.decide(prompt, plain_png(), user())
    assert decision.hold is held
    if held:
        assert decision.reason == "its prompt names something this server reviews"
        assert decision.detail == "phrase 'Mario'"


def test_the_classifier_holds_past_its_threshold_except_in_age_restricted_channels() -> None:
    step = ReviewStep(ReviewSettings(), MarkerClassifier())
    flagged = step.decide("a portrait", marked_png(), user())
    assert flagged.hold and flagged.reason == "the image may not suit this channel"
    assert flagged.detail == "classifier: FEMALE_BREAST_EXPOSED 0.90"
    assert not step.decide("a portrait", plain_png(), user()).hold
    adults = Requester(Platform.DISCORD, "alice", guild_id="g1", channel_id="c1", age_restricted=True)
    assert not step.decide("a portrait", marked_png(), adults).hold
    strict = ReviewStep(ReviewSettings(thresholds={"FEMALE_BREAST_EXPOSED": 0.95}), MarkerClassifier())
    assert not strict.decide("a portrait", marked_png(), user()).hold


def test_nudenet_does_not_flag_a_plain_image() -> None:
    classifier = NudenetClassifier()  # the real detector of the `review` extra, on the CPU, offline
    image = Image.new("RGB", (320, 320), (90, 140, 200))
    for x in range(0, 320, 40):  # a few shapes, so it is not one flat colour
        image.paste((230, 200, 60), (x, x, x + 30, x + 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    scores = classifier.scores(out.getvalue())
    step = ReviewStep(ReviewSettings(), classifier)
    assert not step.decide("shapes", out.getvalue(), user()).hold, scores


async def _listening(engine: Engine) -> asyncio.Task[JobEvent]:
    """The next event of any job, subscribed to before this returns (all_events() subscribes when first read)."""
    events = engine.all_events()
    task = asyncio.create_task(anext(aiter(events)))
    for _ in range(10):
        await asyncio.sleep(0)
    return task


def _marker_plan(job: BackendJob, attempt: int) -> list[BackendEvent] | None:
    """A marked image for a prompt that asks for one, the scripted default otherwise."""
    if "marker" in job.request.prompt:
        return [Finished(marked_png(), "image/png", job.request.seed, gpu_ms=1500)]
    return None


async def test_a_held_job_is_charged_told_and_waits_then_approval_delivers_it_after_a_restart(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    settings = make_settings(review={"phrases": ["Mario"]})
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.API: api}, settings)
    queued = await engine.submit(user("alice"), ImageRequest("Super Mario on the moon", "pro"))
    held = await wait_terminal(engine, queued.job_id)
    assert isinstance(held, JobHeld)
    assert held.reason == "its prompt names something this server reviews"
    assert held.charged_micros == 40_000  # made on the API, so billed, held or not
    job = await engine.get_job(queued.job_id)
    assert (job.state, job.review, job.review_detail) == (JobState.DONE, Review.HELD, "phrase 'Mario'")
    assert job.result_path is not None and await asyncio.to_thread(Path(job.result_path).exists)
    with pytest.raises(InvalidRequest, match="is held for review"):
        await engine.result_image(job.id)  # not for Edit or Vary either, until an admin approves it
    with pytest.raises(NotAllowed):
        await engine.approve(user("bob"), job.id)  # only admins decide
    await engine.mark_delivered(job.id)  # the requester was told it is held
    await engine.close()

    # A fresh start: the held job is listed, and an approval delivers the image as any result.
    store = await Store.open(settings.bot.database_path)
    again = Engine(settings, engine._secrets, store, {BackendKind.API: ScriptedBackend(kind=BackendKind.API)})
    await again.start()
    try:
        assert [j.id for j in await again.held_jobs(ADMIN)] == [job.id]
        assert [j.id for j in await again.undelivered()] == []
        listening = await _listening(again)
        approved = await again.approve(ADMIN, job.id)
        assert approved.review is Review.APPROVED and not approved.delivered
        delivered = await asyncio.wait_for(listening, 10)
        assert isinstance(delivered, JobDone) and delivered.cost_micros == 40_000
        assert [j.id for j in await again.undelivered()] == [job.id]  # for the front-end's delivery path
        with pytest.raises(InvalidRequest, match="was approved: nothing to decide"):
            await again.approve(ADMIN, job.id)
        actions = [record.action for record in await again.audit_log(ADMIN, action="review")]
        assert actions == ["review.approve", "review.hold"]
    finally:
        await again.close()


async def test_reject_deletes_the_image_tells_the_requester_and_can_ban(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    local = ScriptedBackend(plan=_marker_plan)
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(), classifier=MarkerClassifier())
    flagged = await engine.submit(user("alice"), ImageRequest("a marker portrait", "schnell"))
    assert isinstance(await wait_terminal(engine, flagged.job_id), JobHeld)
    plain = await engine.submit(user("bob"), ImageRequest("a plain landscape", "schnell"))
    assert isinstance(await wait_terminal(engine, plain.job_id), JobDone)  # nothing flagged: delivered as made

    listening = await _listening(engine)
    job = await engine.reject(ADMIN, flagged.job_id, "not for this server", ban=True)
    rejected = await asyncio.wait_for(listening, 10)
    assert isinstance(rejected, JobRejected) and rejected.reason == "not for this server"
    assert job.review is Review.REJECTED and job.result_path is None
    assert isinstance(await engine.terminal_event(job), JobRejected)
    view = await engine.admin_quota_show(ADMIN, "discord:alice")
    assert view.banned
    text = await Commands(engine).admin(ADMIN, "audit --action review")
    assert "review.reject discord:alice job " in text and "reason=not for this server" in text
    assert "review.hold" in text
    assert "user.ban" in await Commands(engine).admin(ADMIN, "audit --since 2000-01-01")


async def test_an_age_restricted_channel_is_remembered_with_the_job_and_skips_the_classifier(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    local = ScriptedBackend(plan=_marker_plan)
    engine = await make_engine({BackendKind.LOCAL: local}, make_settings(), classifier=MarkerClassifier())
    adults = Requester(Platform.DISCORD, "alice", guild_id="g1", channel_id="c9", age_restricted=True)
    queued = await engine.submit(adults, ImageRequest("a marker portrait", "schnell"))
    assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
    assert (await engine.get_job(queued.job_id)).requester.age_restricted
