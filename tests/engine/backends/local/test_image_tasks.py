"""Image to image and Kontext edits on the tiny pipeline, served by one worker from the components it loaded.

A variation must stay nearer its source than a reroll does (a pixel distance on the decoded images); an edit runs
FluxKontextPipeline on the same weights (the tiny model stands in for Kontext [dev]); a worker without Kontext
weights is not offered edits.
"""

from __future__ import annotations

import io
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.backends.local.supervisor import LocalBackend
from engine.config import ModelSettings
from engine.models import BackendEvent, BackendJob, Finished, Progress, Task
from tests.fakes.tiny_flux import SIZE, build_tiny_flux, kinds, tiny_backend, tiny_request


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


async def events_of(backend: LocalBackend, job: BackendJob) -> list[BackendEvent]:
    async with aclosing(backend.run(job)) as events:
        return [event async for event in events]


async def image_of(backend: LocalBackend, job: BackendJob) -> bytes:
    events = await events_of(backend, job)
    last = events[-1]
    assert isinstance(last, Finished), kinds(events)
    return last.image


def distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of the decoded RGB pixels, 0 (the same) to 255."""

    def pixels(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float64)

    return float(np.abs(pixels(a) - pixels(b)).mean())


async def test_a_variation_is_nearer_its_source_than_a_reroll(tiny_flux: Path) -> None:
    backend = tiny_backend(tiny_flux, kontext_model=str(tiny_flux))
    await backend.start()
    try:
        source = await image_of(backend, BackendJob("source", tiny_request(seed=1, steps=8)))
        vary = replace(tiny_request(seed=2, steps=8), task=Task.VARY, strength=0.25, input_image="ab" * 32)
        varied_events = await events_of(backend, BackendJob("vary", vary, input_image=source))
        reroll = await image_of(backend, BackendJob("reroll", tiny_request(seed=2, steps=8)))
        edit = replace(tiny_request(seed=3), task=Task.EDIT, input_image="cd" * 32)
        edited = await image_of(backend, BackendJob("edit", edit, input_image=source))
    finally:
        await backend.close()

    varied = varied_events[-1]
    assert isinstance(varied, Finished)
    # Image to image skips the first steps: at strength 0.25 of 8 it runs 2, and says so in its progress.
    assert [event.total for event in varied_events if isinstance(event, Progress)] == [2, 2]
    assert distance(varied.image, source) < distance(reroll, source)
    with Image.open(io.BytesIO(edited)) as image:
        assert image.size == (SIZE, SIZE)
    assert recycles_none(backend)


def recycles_none(backend: LocalBackend) -> bool:
    """The three tasks ran on the one worker the backend started: none of them needed a fresh process."""
    return backend.recycles == 0 and backend.workers_started == 1


def test_a_worker_without_kontext_weights_is_not_offered_edits(tiny_flux: Path) -> None:
    kontext = ModelSettings(display_name="Kontext [dev]", local=True, needs_input_image=True)
    plain = ModelSettings(display_name="tiny", local=True)
    assert not tiny_backend(tiny_flux).supports("kontext-dev", kontext)
    assert tiny_backend(tiny_flux, kontext_model=str(tiny_flux)).supports("kontext-dev", kontext)
    assert tiny_backend(tiny_flux).supports("tiny", plain)
