"""LoRA styles on the worker: loaded once at start, set per job, refused at start when they would be wrong.

Driven on the tiny pipeline through `load_pipeline` and `FluxRunner` directly (one test goes through a real worker
process), with adapters made in code by tests/fakes/loras.py. Images are compared as decoded pixels: the same style
must give the same bytes whatever ran before it on that worker.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.backends.local.cli import build_parser, options_from_args, worker_args
from engine.backends.local.pipeline import FluxRunner, Options, WorkerSetupError, load_pipeline, rss_mb
from engine.backends.local.styles import BASE_MODEL, check_styles, load_styles
from engine.backends.local.supervisor import LocalBackend
from engine.backends.protocol import ImageDone, JobSpec, Message, WorkerFailed
from engine.config import ModelSettings, StyleAdapter, StyleSettings
from engine.models import BackendJob, Finished, Task
from tests.fakes.loras import Lora, make_lora
from tests.fakes.tiny_flux import MODEL, SIZE, build_tiny_flux, kinds, png_pixels, tiny_request, tiny_settings

Adapters = dict[str, tuple[StyleAdapter, ...]]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(scope="module")
def loras(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Lora]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "wide": make_lora(tiny_flux, folder / "wide.safetensors", seed=1),
        "q-v": make_lora(tiny_flux, folder / "q-v.safetensors", seed=2, rank=8, targets=("to_q", "to_v"), alpha=4),
        "small": make_lora(tiny_flux, folder / "small.safetensors", seed=3, rank=2),
        "q-only": make_lora(tiny_flux, folder / "q-only.safetensors", seed=4, targets=("to_q",)),
    }


@pytest.fixture(scope="module")
def styles(loras: dict[str, Lora]) -> Adapters:
    """One style of one adapter; one of two, with weights other than 1, the first narrower than the second."""
    return {
        "ink": (loras["wide"].adapter(),),
        "neon": (loras["q-v"].adapter(0.7), loras["small"].adapter(-0.5)),
    }


def options(model: Path, **overrides: Any) -> Options:
    base: dict[str, Any] = {
        "model": str(model),
        "device": "cpu",
        "dtype": "float32",
        "buckets": [(SIZE, SIZE)],
        "warmup": False,
        "compile": False,
        "fp8": False,
        "fuse_qkv": False,
        "vae_tiling": False,
        "cpu_offload": False,
        "preview_every": 0,
    }
    return Options(**{**base, **overrides})


def runner(model: Path, styles: Adapters, *, hotswap: bool = False, **overrides: Any) -> FluxRunner:
    """A runner as the worker builds it; `hotswap` switches styles as a compiled worker does, without compiling
    (torch.compile of the transformer on 2 CPU cores would take minutes for what the eager graph shows as well)."""
    chosen = options(model, styles=styles, **overrides)
    if not hotswap:
        pipe, device, loaded = load_pipeline(chosen)
        return FluxRunner(pipe, device, chosen, None, loaded)
    pipe, device, _ = load_pipeline(replace(chosen, styles={}))
    return FluxRunner(pipe, device, chosen, None, load_styles(pipe, check_styles(chosen), hotswap=True))


class Quiet:
    """The supervisor's side of a job in process: progress goes nowhere and nothing is ever cancelled."""

    def send(self, message: Message) -> None:
        return None

    def cancelled(self, job_id: str) -> bool:
        return False

    def until_cancelled(self, job_id: str) -> None:
        raise AssertionError("no fault is injected here")


def spec(style: str = BASE_MODEL, seed: int = 1, steps: int = 2, **fields: Any) -> JobSpec:
    job_id = f"job-{style or 'base'}-{seed}"
    return JobSpec(job_id, MODEL, "a red fox", SIZE, SIZE, steps, None, seed, style=style, **fields)


def outcome(flux: FluxRunner, style: str = BASE_MODEL, **fields: Any) -> ImageDone | WorkerFailed:
    result = flux.run(spec(style, **fields), Quiet(), Quiet())
    assert isinstance(result, ImageDone | WorkerFailed), result
    return result


def image(flux: FluxRunner, style: str = BASE_MODEL, **fields: Any) -> bytes:
    result = outcome(flux, style, **fields)
    assert isinstance(result, ImageDone), result
    return png_pixels(result.image)


def adapters_on(flux: FluxRunner) -> tuple[int, int]:
    """Adapters on the transformer, and the peft layers holding them (what would grow if a switch leaked)."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in flux.pipe.transformer.modules() if isinstance(module, LoraLayer)]
    return len(flux.pipe.get_list_adapters().get("transformer", [])), len(layers)


@pytest.fixture(scope="module")
def base_image(tiny_flux: Path) -> bytes:
    return image(runner(tiny_flux, {}))


# ---- what a style does ----


def test_a_style_changes_the_image_and_the_base_model_stays_the_base_model(
    tiny_flux: Path, styles: Adapters, base_image: bytes
) -> None:
    flux = runner(tiny_flux, styles)
    assert flux.styles.names == ("ink", "neon")
    ink, neon = image(flux, "ink"), image(flux, "neon")
    assert len({ink, neon, base_image}) == 3
    assert image(flux) == base_image  # adapters loaded but not set: exactly the model without any


@pytest.mark.parametrize("hotswap", [False, True], ids=["named-adapters", "hot-swap"])
def test_one_worker_switching_styles_gives_what_fresh_workers_give(
    tiny_flux: Path, styles: Adapters, base_image: bytes, hotswap: bool
) -> None:
    flux = runner(tiny_flux, styles, hotswap=hotswap)
    sequence = ["ink", "neon", BASE_MODEL, "ink", "ink", BASE_MODEL, "neon"]
    images = [image(flux, style) for style in sequence]
    fresh = {style: image(runner(tiny_flux, styles, hotswap=hotswap), style) for style in ("ink", "neon")}
    fresh[BASE_MODEL] = base_image
    assert images == [fresh[style] for style in sequence]


def test_hot_swapping_gives_the_images_named_adapters_give(tiny_flux: Path, styles: Adapters) -> None:
    named = runner(tiny_flux, styles)
    swapped = runner(tiny_flux, styles, hotswap=True)
    # The same images up to float rounding: the slots hold every adapter zero-padded to the largest rank (8 here)
    # with its weight and scale folded into lora_B, so the sums run in another order and a pixel may move by one.
    for style in ("ink", "neon"):
        assert max_pixel_difference(image(swapped, style), image(named, style)) <= 1
    assert image(swapped) == image(named)  # empty slots add exact zeros: the base model, to the byte


def max_pixel_difference(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_a_narrow_adapter_before_a_wider_one_hot_swaps(tiny_flux: Path, loras: dict[str, Lora]) -> None:
    # The slot covers every layer any style's adapter in that position targets, so the order of the styles in the
    # config does not matter: the narrow one first would otherwise leave the wide one no layers to swap into.
    narrow_first = {"quill": (loras["q-only"].adapter(),), "ink": (loras["wide"].adapter(),)}
    swapped = runner(tiny_flux, narrow_first, hotswap=True)
    named = runner(tiny_flux, narrow_first)
    assert [image(swapped, style) for style in ("ink", "quill", "ink")] == [
        image(named, style) for style in ("ink", "quill", "ink")
    ]


@pytest.mark.parametrize("hotswap", [False, True], ids=["named-adapters", "hot-swap"])
def test_a_hundred_switches_hold_memory_and_adapters_steady(tiny_flux: Path, styles: Adapters, hotswap: bool) -> None:
    flux = runner(tiny_flux, styles, hotswap=hotswap)
    cycle = ["ink", "neon", BASE_MODEL]
    # The worker collects garbage after every job; frozen, this test's other pipelines are not rescanned each time.
    gc.freeze()
    try:
        for n in range(12):  # warm-up: the allocator and the interpreter reach their working size
            image(flux, cycle[n % 3], steps=1)
        adapters, rss_before = adapters_on(flux), rss_mb()
        for n in range(100):
            image(flux, cycle[n % 3], steps=1)
    finally:
        gc.unfreeze()
    assert adapters_on(flux) == adapters
    # The adapters weigh about 0.1 MB: a copy per switch would show as ~10 MB over 100 jobs, a reload far more.
    assert rss_mb() - rss_before < 8


# ---- jobs a worker cannot serve with a style ----


def test_a_style_this_worker_did_not_load_fails_only_that_job(tiny_flux: Path, styles: Adapters) -> None:
    flux = runner(tiny_flux, {"ink": styles["ink"]})
    failed = outcome(flux, "neon")
    assert isinstance(failed, WorkerFailed)
    assert failed.detail == "style 'neon' is not loaded on this worker (it has: ink)"
    assert image(flux, "ink") == image(runner(tiny_flux, {"ink": styles["ink"]}), "ink")
    plain = outcome(runner(tiny_flux, {}), "ink")
    assert isinstance(plain, WorkerFailed) and "(it has: no styles)" in plain.detail


def test_image_to_image_and_kontext_on_the_same_weights_take_the_style(tiny_flux: Path, styles: Adapters) -> None:
    # Both pipelines are made with from_pipe, so they run the very transformer that holds the adapters.
    flux = runner(tiny_flux, styles, kontext_model=str(tiny_flux))
    source = image(runner(tiny_flux, {}), seed=5)
    png = png_of(source)
    vary = {"image": png, "strength": 0.6, "task": Task.VARY}
    edit = {"image": png, "task": Task.EDIT}
    for task in (vary, edit):
        styled = image(flux, "ink", **task)
        assert styled != image(flux, **task)
        assert styled == image(runner(tiny_flux, styles, kontext_model=str(tiny_flux)), "ink", **task)


def test_an_edit_with_separate_kontext_weights_refuses_a_style(
    tiny_flux: Path, styles: Adapters, tmp_path: Path
) -> None:
    kontext = shutil.copytree(tiny_flux, tmp_path / "kontext")  # other weights, as Kontext [dev] beside FLUX.1 [dev]
    flux = runner(tiny_flux, styles, kontext_model=str(kontext))
    edit = {"image": png_of(image(flux)), "task": Task.EDIT}
    failed = outcome(flux, "ink", **edit)
    assert isinstance(failed, WorkerFailed)
    assert failed.detail.startswith("style 'ink' adapts ") and "edits cannot use a LoRA style here" in failed.detail
    assert isinstance(outcome(flux, **edit), ImageDone)


def png_of(pixels: bytes) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (SIZE, SIZE), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- refused at start ----


def refusal(model: Path, styles: Adapters, **overrides: Any) -> str:
    with pytest.raises(WorkerSetupError) as caught:
        load_pipeline(options(model, styles=styles, **overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_fp8_and_fused_qkv_are_refused_with_what_to_change(tiny_flux: Path, styles: Adapters) -> None:
    # Checked before the device: this CPU box would refuse fp8 anyway, but for another reason.
    assert refusal(tiny_flux, styles, fp8=True) == (
        "styles ink, neon have LoRA adapters, which cannot be loaded into an fp8-quantised transformer:"
        " set fp8 = false on this host, or leave these styles to other hosts"
    )
    assert refusal(tiny_flux, styles, fuse_qkv=True) == (
        "styles ink, neon have LoRA adapters, which do nothing on fused q/k/v projections:"
        " set fuse_qkv = false on this host, or leave these styles to other hosts"
    )
    load_pipeline(options(tiny_flux, fuse_qkv=True))  # without styles, fusing stays allowed


def test_a_wrong_hash_or_a_missing_file_is_refused(tiny_flux: Path, loras: dict[str, Lora], tmp_path: Path) -> None:
    lora = loras["wide"]
    wrong = StyleAdapter(file=str(lora.path), sha256="0" * 64)
    assert refusal(tiny_flux, {"ink": (wrong,)}) == (
        f"style ink: {lora.path} has sha256 {lora.sha256}, expected {'0' * 64}"
        " (a changed or damaged file: check it, then correct the sha256 in the style's config)"
    )
    missing = StyleAdapter(file=str(tmp_path / "gone.safetensors"), sha256=lora.sha256)
    assert (
        refusal(tiny_flux, {"ink": (missing,)})
        == f"style ink: adapter file {tmp_path / 'gone.safetensors'} does not exist"
    )


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    yield cache


def test_an_hf_file_is_taken_from_the_cache_and_never_downloaded(
    tiny_flux: Path, loras: dict[str, Lora], hf_cache: Path, base_image: bytes
) -> None:
    lora = loras["wide"]
    adapter = StyleAdapter(file="hf:someone/ink-lora/ink.safetensors", sha256=lora.sha256)
    assert refusal(tiny_flux, {"ink": (adapter,)}) == (
        "style ink: hf:someone/ink-lora/ink.safetensors is not in the Hugging Face cache and this host does not"
        " download: fetch it once with `huggingface-cli download someone/ink-lora ink.safetensors`"
        " (LocalEntryNotFoundError)"
    )
    # The cache's own layout, as `huggingface-cli download` leaves it.
    repo = hf_cache / "models--someone--ink-lora"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(lora.path, snapshot / "ink.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cached = runner(tiny_flux, {"ink": (adapter,)})
    assert image(cached, "ink") == image(runner(tiny_flux, {"ink": (lora.adapter(),)}), "ink") != base_image


def test_a_file_that_is_no_lora_for_this_model_is_refused(tiny_flux: Path, tmp_path: Path) -> None:
    from tests.fakes.loras import sha256_of

    text_encoder_weights = tiny_flux / "vae" / "diffusion_pytorch_model.safetensors"
    not_a_lora = StyleAdapter(file=str(text_encoder_weights), sha256=sha256_of(text_encoder_weights))
    message = refusal(tiny_flux, {"ink": (not_a_lora,)})
    assert message.startswith(f"style ink: cannot load {text_encoder_weights} as a LoRA for this model: ")


# ---- compiled ----


def test_compiled_switches_never_recompile(tiny_flux: Path, styles: Adapters, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    flux = runner(tiny_flux, styles, hotswap=True)
    eager = {style: image(flux, style) for style in ("ink", "neon", BASE_MODEL)}
    # The eager backend: dynamo traces and guards exactly as with inductor, without minutes of kernel compiling.
    torch._dynamo.reset()
    flux.pipe.transformer = torch.compile(flux.pipe.transformer, backend="eager", fullgraph=True, dynamic=False)
    image(flux, "ink")  # the one compile
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    frames = dict(torch._dynamo.utils.counters["frames"])
    compiled = [image(flux, style) for style in ("neon", BASE_MODEL, "ink", "neon", BASE_MODEL)]
    assert dict(torch._dynamo.utils.counters["frames"]) == frames
    assert compiled == [eager[style] for style in ("neon", BASE_MODEL, "ink", "neon", BASE_MODEL)]


# ---- the worker's command line and process ----


def test_the_worker_command_line_carries_the_styles(styles: Adapters) -> None:
    arguments = worker_args(tiny_settings(), "some/model", "", styles)
    assert options_from_args(build_parser().parse_args(arguments)).styles == styles
    assert options_from_args(build_parser().parse_args(worker_args(tiny_settings(), "m"))).styles == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--styles", '{"ink": [{"file": "x", "sha256": "no"}]}'])


async def test_a_worker_process_loads_the_styles_for_its_model_and_serves_them(
    tiny_flux: Path, loras: dict[str, Lora]
) -> None:
    other = ModelSettings(display_name="another", local=True)
    config = {
        "ink": StyleSettings(display_name="Ink", adapters=(loras["wide"].adapter(),)),
        "elsewhere": StyleSettings(display_name="Elsewhere", models=("other",), adapters=(loras["q-v"].adapter(),)),
        "prompt-only": StyleSettings(display_name="Prompt only", template="ink drawing of {prompt}"),
    }
    models = {MODEL: ModelSettings(display_name="tiny", local=True, default_steps=4, max_steps=8)}
    backend = LocalBackend(
        tiny_settings(), {**models, "other": other.model_copy(update={"local": False, "api_endpoint": "x"})},
        tiny_flux, extra_env={"OMP_NUM_THREADS": "1"}, styles=config,
    )  # fmt: skip
    await backend.start()
    try:
        assert backend.loaded_styles == ("ink",)
        results = [
            await finished(backend, BackendJob(f"j-{style}", replace(tiny_request(), style=style)))
            for style in ("ink", None, "ink")
        ]
    finally:
        await backend.close()
    assert results[0] == results[2] != results[1]
    assert backend.recycles == 0


async def finished(backend: LocalBackend, job: BackendJob) -> bytes:
    events = [event async for event in backend.run(job)]
    last = events[-1]
    assert isinstance(last, Finished), kinds(events)
    return png_pixels(last.image)


async def test_reloaded_styles_reach_the_workers_between_jobs_and_no_job_is_lost(
    tiny_flux: Path, loras: dict[str, Lora]
) -> None:
    models = {MODEL: ModelSettings(display_name="tiny", local=True, default_steps=4, max_steps=8)}
    ink = {"ink": StyleSettings(display_name="Ink", adapters=(loras["wide"].adapter(),))}
    backend = LocalBackend(tiny_settings(), models, tiny_flux, extra_env={"OMP_NUM_THREADS": "1"}, styles=ink)
    await backend.start()
    try:
        assert backend.loaded_styles == ("ink",)
        # A job submitted as the styles are reloaded ends, on the old worker or its successor, and is not lost.
        running = asyncio.create_task(finished(backend, BackendJob("j-during", replace(tiny_request(), style="ink"))))
        await asyncio.sleep(0)
        await backend.reload_styles({**ink, "q": StyleSettings(display_name="Q", adapters=(loras["q-v"].adapter(),))})
        during = await running
        after = await finished(backend, BackendJob("j-after", replace(tiny_request(), style="q")))
        again = await finished(backend, BackendJob("j-ink", replace(tiny_request(), style="ink")))
        assert backend.loaded_styles == ("ink", "q")
    finally:
        await backend.close()
    assert during == again != after
    assert backend.recycles == 1
