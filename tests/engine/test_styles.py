"""Styles in the engine and the shared commands: [styles.NAME] checked at start, a style's template and defaults
applied (what was asked outranks them), LoRA styles kept on the GPU lane with the reason saying so, the style and
its adapters' hashes in the PNG and in /job. The worker's side (adapters loaded and switched) is in
tests/engine/backends/local/test_styles.py."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from bot.commands import Commands
from engine.backends.bfl import BflBackend
from engine.backends.pool import GpuPool, Member
from engine.config import Secrets, Settings, load_settings
from engine.errors import ConfigError, InvalidRequest, NotAllowed
from engine.models import BackendKind, ImageRequest, JobDone, Mode
from engine.service import Engine
from engine.store import Store
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend
from tests.fakes.bfl_server import API_KEY, FakeBfl

ADMIN = user("root", admin=True)

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


def _lora_file(folder: Path, name: str) -> tuple[Path, str]:
    """A file standing in for an adapter: the check reads only its bytes' sha256 (the worker loads real ones)."""
    path = folder / f"{name}.safetensors"
    path.write_bytes(name.encode() * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _style_toml(name: str, file: Path, sha256: str) -> str:
    return (
        f'[styles.{name}]\ndisplay_name = "{name.title()}"\nmodels = ["schnell"]\n'
        f'adapters = [{{ file = "{file}", sha256 = "{sha256}" }}]\n'
    )


async def _styled_engine(make_settings: SettingsFactory, tmp_path: Path, toml: str) -> tuple[Engine, ScriptedBackend]:
    config = tmp_path / "config.toml"
    config.write_text(f'[bot]\nstate_dir = "{tmp_path / "state"}"\n\n{toml}')
    settings, _ = load_settings(config, env={})
    workers = ScriptedBackend(styles=tuple(settings.styles))
    lane = GpuPool([Member("in-host", workers)], settings.models)
    store = await Store.open(settings.bot.database_path)
    engine = Engine(settings, Secrets(), store, {BackendKind.LOCAL: lane}, config_path=config)
    await engine.start()
    return engine, workers


async def test_admin_styles_lists_them_with_the_slots_serving_each_and_reloads_without_a_restart(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    ink, ink_hash = _lora_file(tmp_path, "ink")
    engine, workers = await _styled_engine(make_settings, tmp_path, _style_toml("ink", ink, ink_hash))
    commands = Commands(engine)
    try:
        listed = await commands.admin(ADMIN, "styles")
        assert listed == f"ink (Ink): sha256:{ink_hash} x1; served by scripted workers (1 slot)"

        # A new style in the file, and a change to the old one: reloaded while running, audited.
        oils, oils_hash = _lora_file(tmp_path, "oils")
        config = tmp_path / "config.toml"
        config.write_text(
            config.read_text().replace('models = ["schnell"]', 'models = ["schnell", "dev"]', 1)
            + _style_toml("oils", oils, oils_hash)
        )
        answer = await commands.admin(ADMIN, "styles reload")
        assert answer.startswith("Styles reloaded (added: oils; changed: ink).")
        assert workers.reloaded == [("ink", "oils")]
        queued = await engine.submit(user(), ImageRequest("a pond", "schnell", style="oils"))
        assert isinstance(await wait_terminal(engine, queued.job_id), JobDone)
        [line] = await engine.audit_log(ADMIN, action="styles.reload")
        assert line.detail == {"added": ["oils"], "removed": [], "changed": ["ink"]}

        # A broken file is refused with its problem, and the running styles stay.
        config.write_text(config.read_text().replace('display_name = "Oils"', 'display_name = ""'))
        with pytest.raises(ConfigError, match="display_name"):
            await commands.admin(ADMIN, "styles reload")
        assert set(engine.settings.styles) == {"ink", "oils"}
        with pytest.raises(NotAllowed):
            await commands.admin(user(), "styles reload")
    finally:
        await engine.close()


async def test_styles_check_reports_bad_files_and_test_renders_the_good_ones(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    ink, ink_hash = _lora_file(tmp_path, "ink")
    oils, _ = _lora_file(tmp_path, "oils")
    toml = (
        _style_toml("ink", ink, ink_hash)
        + _style_toml("oils", oils, "0" * 64)
        + _style_toml("gone", tmp_path / "gone.safetensors", ink_hash)
    )
    engine, _ = await _styled_engine(make_settings, tmp_path, toml)
    try:
        report = (await Commands(engine).admin(ADMIN, "styles check")).splitlines()
        assert report[0].startswith("ink: files and sha256 ok; test render job j") and ": done in " in report[0]
        assert report[1:3] == [
            "oils: FAILED",
            f"  - style oils: {oils} has sha256 {_digest(oils)}, expected {'0' * 64}"
            " (a changed or damaged file: check it, then correct the sha256 in the style's config)",
        ]
        assert report[3:] == [
            "gone: FAILED",
            f"  - style gone: adapter file {tmp_path / 'gone.safetensors'} does not exist",
        ]
    finally:
        await engine.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
