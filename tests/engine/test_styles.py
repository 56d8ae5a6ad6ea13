"""Styles in the engine and the shared commands: [styles.NAME] checked at start, a style's template and defaults
applied (what was asked outranks them), LoRA styles kept on the GPU lane with the reason saying so, the style and
its adapters' hashes in the PNG and in /job. The worker's side (adapters loaded and switched) is in
tests/engine/backends/local/test_styles.py."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from bot.commands import Commands
from engine.backends.bfl import BflBackend
from engine.config import Secrets, Settings
from engine.errors import InvalidRequest
from engine.models import BackendKind, ImageRequest, JobDone, Mode
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.bfl_server import API_KEY, FakeBfl

HASH = "ab" * 32
STYLES: dict[str, Any] = {
    "watercolor": {
        "display_name": "Watercolor",
        "description": "soft washes of colour",
        "template": "a watercolor painting of {prompt}, soft edges, paper texture",
        "steps": 6,
        "aspect": "3:2",
    },
    "inkwash": {
        "display_name": "Ink wash",
        "template": "{prompt}, sumi-e ink wash",
        "model": "schnell",
        "models": ["schnell", "dev"],
        "adapters": [{"file": "/srv/loras/inkwash.safetensors", "sha256": HASH, "weight": 0.8}],
        "sample_image": "https://example.com/inkwash.png",
    },
}


def styled(make_settings: SettingsFactory, **sections: Any) -> Settings:
    return make_settings(styles=STYLES, **sections)


@pytest.mark.parametrize(
    ("style", "problem"),
    [
        ({"display_name": "X", "template": "no placeholder"}, "{prompt} exactly once"),
        ({"display_name": "X", "template": "{prompt} and {prompt}"}, "{prompt} exactly once"),
        ({"display_name": "X", "models": ["nope"]}, "not one of [models.*]"),
        ({"display_name": "X", "models": ["pro"], "adapters": [{"file": "a", "sha256": HASH}]}, "GPU lane only"),
        ({"display_name": "X", "adapters": [{"file": "a", "sha256": "short"}]}, "sha256"),
        ({"display_name": "X", "adapters": [{"file": "a", "sha256": HASH}] * 4}, "at most 3"),
    ],
)
def test_a_style_that_cannot_work_stops_the_start(
    make_settings: SettingsFactory, style: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem.replace("[", r"\[").replace("*", r"\*").replace("{", r"\{")):
        make_settings(styles={"broken": style})


def test_a_style_name_is_a_short_slug(make_settings: SettingsFactory) -> None:
    with pytest.raises(ValidationError, match="lowercase letters"):
        make_settings(styles={"Water Color": {"display_name": "X"}})


async def test_the_template_reaches_the_model_and_the_user_sees_their_own_prompt(
    make_settings: SettingsFactory,
) -> None:
    settings = styled(make_settings, bfl={"poll_interval_s": 0.01, "poll_max_interval_s": 0.02})
    async with FakeBfl() as bfl:
        backend = BflBackend(settings.bfl.model_copy(update={"api_url": bfl.api_url}), settings.models, API_KEY)
        store = await Store.open(settings.bot.database_path)
        engine = Engine(settings, Secrets(bfl_api_key=API_KEY), store, {BackendKind.API: backend})
        await engine.start()
        try:
            commands = Commands(engine)
            queued = await commands.imagine(user(), "a fox in the snow", {"style": "watercolor", "model": "pro"})
            done = await wait_terminal(engine, queued.job_id)
            assert isinstance(done, JobDone)
            [task] = bfl.tasks.values()
            assert task.payload["prompt"] == "a watercolor painting of a fox in the snow, soft edges, paper texture"
            job = await engine.get_job(queued.job_id)
            assert job.request.prompt == "a fox in the snow" and job.request.style == "watercolor"
            assert job.request.aspect_ratio == "3:2"  # the style's default aspect
            with Image.open(io.BytesIO(done.image)) as image:
                text = image.text  # type: ignore[attr-defined]
            assert text["prompt"] == "a fox in the snow" and text["style"] == "watercolor"
            assert text["styled prompt"] == task.payload["prompt"] and "adapters" not in text
            assert "style: watercolor" in await commands.job(user(), queued.job_id)
        finally:
            await engine.close()


async def test_what_was_asked_outranks_the_style_and_the_style_outranks_settings(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, styled(make_settings))
    commands = Commands(engine)
    await engine.set_user_setting(user(), "aspect", "1:1")
    queued = await commands.imagine(user(), "a fox", {"style": "watercolor", "steps": "3", "model": "schnell"})
    job = await engine.get_job(queued.job_id)
    assert (job.request.steps, job.request.aspect_ratio) == (3, "3:2")
    # A default style from /settings, and style=none to leave it out once.
    await engine.set_user_setting(user(), "style", "inkwash")
    job = await engine.get_job((await commands.imagine(user(), "a heron", {})).job_id)
    assert job.request.style == "inkwash" and job.request.for_model == "a heron, sumi-e ink wash"
    job = await engine.get_job((await commands.imagine(user(), "a heron", {"style": "none"})).job_id)
    assert job.request.style is None and job.request.for_model == "a heron"
    with pytest.raises(InvalidRequest, match="there is no style 'oils'; choose one of: watercolor, inkwash, none"):
        await engine.set_user_setting(user(), "style", "oils")


async def test_a_lora_style_stays_on_the_gpu_lane_and_says_why(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: api}, styled(make_settings))
    queued = await engine.submit(user(), ImageRequest("a crane", "dev", style="inkwash", mode=Mode.FAST))
    assert queued.route.backend is BackendKind.LOCAL
    assert "uses LoRA adapters, which run on the GPU lane only" in queued.route.reason
    # A model that runs only on the API cannot take it at all, and a model outside the style's list neither.
    with pytest.raises(InvalidRequest, match="works with schnell, dev"):
        await engine.submit(user(), ImageRequest("a crane", "pro", style="inkwash"))
    with pytest.raises(InvalidRequest, match="there is no style 'oils'"):
        await engine.submit(user(), ImageRequest("a crane", "dev", style="oils"))
    done = await wait_terminal(engine, queued.job_id)
    assert isinstance(done, JobDone)
    with Image.open(io.BytesIO(done.image)) as image:
        assert image.text["adapters"] == f"sha256:{HASH} x0.8"  # type: ignore[attr-defined]
    assert f"adapters sha256:{HASH} x0.8" in await Commands(engine).job(user(), queued.job_id)


async def test_styles_lists_what_each_style_does_and_where_it_runs(
    make_engine: EngineFactory, make_settings: SettingsFactory
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, styled(make_settings))
    text = Commands(engine).styles()
    assert "- watercolor: Watercolor: soft washes of colour. Runs with any model; any lane." in text
    assert "- inkwash: Ink wash. Runs with FLUX.1 [schnell], FLUX.1 [dev]; GPU lane only (1 LoRA adapter)." in text
    assert "sample: https://example.com/inkwash.png" in text
    bare = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings())
    assert "No styles are set up" in Commands(bare).styles()
