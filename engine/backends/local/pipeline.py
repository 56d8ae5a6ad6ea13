"""FluxPipeline in the worker process: building it with the configured switches, running one job, stopping it early.

torch is imported only inside functions: PYTORCH_CUDA_ALLOC_CONF has to be in the environment before torch reads
it (cli.py sets it first), and the supervisor imports the worker's command line without needing torch at all.

A job is stopped between steps: its step callback sees the cancel (noted at once by the inbox's reader thread) and
sets FluxPipeline's `interrupt`, so the pipeline skips the steps left and the model stays loaded for the next job.

LoRA styles (styles.py) are loaded once after the model and before compiling; each job sets its own style, or the
base model, before the pipeline runs. Image to image and Kontext on the model's own weights share its transformer,
so styles apply to them too.
"""

from __future__ import annotations

import gc
import importlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.backends.local.faults import Fault, inject
from engine.backends.protocol import (
    CancelledJob,
    ImageDone,
    JobSpec,
    MemoryStats,
    Message,
    StepProgress,
    WorkerFailed,
    WorkerFailure,
)
from engine.config import StyleAdapter
from engine.errors import EngineError
from engine.models import Task

if TYPE_CHECKING:
    # styles.py builds on this module (Options, WorkerSetupError): imported where it is used, not at import time.
    from engine.backends.local.styles import Styles

log = logging.getLogger(__name__)

# No CUDA graphs: their private memory pools would hide fragmentation from the reserved-minus-allocated figure
# that the supervisor recycles on, for a small gain at FLUX's step sizes.
COMPILE_MODE = "max-autotune-no-cudagraphs"
PREVIEW_MAX_SIDE = 128
WARMUP_STEPS = 2

# Projects FLUX.1's 16 latent channels to RGB well enough for a preview (the factors ComfyUI uses for Flux).
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


class WorkerSetupError(EngineError):
    """The configuration cannot be served here (a missing package, fp8 without CUDA...)."""


@dataclass(frozen=True, slots=True)
class Options:
    model: str
    device: str
    dtype: str
    buckets: list[tuple[int, int]]
    warmup: bool
    compile: bool
    fp8: bool
    fuse_qkv: bool
    vae_tiling: bool
    cpu_offload: bool
    preview_every: int
    kontext_model: str = ""  # Kontext [dev] weights for edits; the same as `model` when it edits itself (demo)
    # The LoRA styles to load at start, with their adapters in order (styles without adapters need no worker).
    styles: dict[str, tuple[StyleAdapter, ...]] = field(default_factory=dict)


def parse_buckets(text: str) -> list[tuple[int, int]]:
    buckets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, sep, height = item.partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f"resolution bucket {item!r} is not WIDTHxHEIGHT")
        buckets.append((int(width), int(height)))
    return buckets


def load_pipeline(options: Options) -> tuple[Any, str, Styles]:
    """FluxPipeline with the configured switches applied, the device it runs on, and its LoRA styles loaded."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from engine.backends.local.styles import check_styles, load_styles

    # Before the model loads: a wrong file or switch should cost seconds, not the minutes FLUX takes to load.
    style_files = check_styles(options)

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)
    # bf16 matmuls on a CPU are slow and partly unsupported; the CPU path exists for the demo model and tests.
    dtype_name = options.dtype if device.type == "cuda" else "float32"
    if options.fp8 and device.type != "cuda":
        raise WorkerSetupError("fp8 quantisation needs a CUDA GPU (set fp8 = false on this host)")
    with warnings.catch_warnings():
        # diffusers 0.42 renamed torch_dtype to dtype; the old name works on every version we support.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = FluxPipeline.from_pretrained(  # type: ignore[no-untyped-call]
            options.model, torch_dtype=getattr(torch, dtype_name)
        )
    pipe.set_progress_bar_config(disable=True)
    if options.fuse_qkv:
        # Before quantisation: torchao cannot fuse weights it has already converted.
        pipe.transformer.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.fp8:
        quantize_fp8(pipe.transformer)
    # On the device (so the adapters land there) and before compiling (so the graph has them); compiled, styles
    # switch by hot-swapping weights into fixed slots, which needs no new graph.
    styles = load_styles(pipe, style_files, hotswap=options.compile)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        compile_pipeline(pipe, len(options.buckets))
    return pipe, str(device), styles


def quantize_fp8(module: Any) -> None:
    try:
        quantization = importlib.import_module("torchao.quantization")  # optional: only fp8 hosts install it
    except ImportError as exc:
        raise WorkerSetupError("fp8 = true needs torchao >= 0.9 (pip install torchao), or set fp8 = false") from exc
    quantization.quantize_(module, quantization.Float8DynamicActivationFloat8WeightConfig())


def compile_pipeline(pipe: Any, bucket_count: int) -> None:
    import torch

    # One static graph per resolution bucket (dynamic shapes would give slower kernels); leave room for all of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, bucket_count + 2)
    pipe.transformer = torch.compile(pipe.transformer, mode=COMPILE_MODE, fullgraph=True, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=COMPILE_MODE, dynamic=False)


def rgb_map(channels: int) -> tuple[Any, Any]:
    """A (channels x 3) latent-to-RGB matrix and an RGB bias: FLUX.1's for 16 channels, else a fixed pseudo-random
    one (the same in every run), so that a model with another latent width still gets a preview."""
    import torch

    if channels == len(FLUX_LATENT_RGB):
        return torch.tensor(FLUX_LATENT_RGB), torch.tensor(FLUX_LATENT_RGB_BIAS)
    generator = torch.Generator().manual_seed(channels)
    return torch.randn(channels, 3, generator=generator) / channels**0.5, torch.zeros(3)


def preview_png(latents: Any, width: int, height: int, vae_scale_factor: int) -> bytes:
    """A small PNG projected from FLUX's packed latents (batch, tokens, channels x 2 x 2): no VAE, no second model."""
    import torch
    from diffusers import FluxPipeline
    from PIL import Image

    with torch.no_grad():
        grid = FluxPipeline._unpack_latents(latents[:1].float(), height, width, vae_scale_factor)[0]
        factors, bias = rgb_map(grid.shape[0])
        rgb = torch.einsum("chw,cr->hwr", grid.cpu(), factors) + bias
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return _png(image)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


DEFAULT_GUIDE_STRENGTH = 0.8  # image-guided generation without a strength: mostly new, the input's layout kept


def img2img_steps(steps: int, strength: float) -> int:
    """The steps FluxImg2ImgPipeline really runs for `steps` at `strength` (it skips the first ones)."""
    return steps - int(max(steps - steps * strength, 0))


def _decoded(png: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        return opened.convert("RGB")


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best the standard library offers
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Sink(Protocol):
    """Where a job's progress goes while it runs (the channel to the supervisor)."""

    def send(self, message: Message) -> None: ...


class Cancels(Protocol):
    """Whether a cancel has come for a job (the inbox, which its reader thread keeps up to date)."""

    def cancelled(self, job_id: str) -> bool: ...

    def until_cancelled(self, job_id: str) -> None: ...


JobOutcome = ImageDone | WorkerFailed | CancelledJob


class Runner(Protocol):
    """What the serve loop needs of a loaded worker: a pipeline (FluxRunner) or a stand-in (synthetic.py)."""

    @property
    def device(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def model(self) -> str: ...

    def run(self, spec: JobSpec, progress: Sink, cancels: Cancels) -> JobOutcome: ...

    def memory(self) -> MemoryStats: ...


class FluxRunner:
    """One loaded pipeline on one device, running one job at a time."""

    def __init__(self, pipe: Any, device: str, options: Options, fault: Fault | None, styles: Styles) -> None:
        self.pipe = pipe
        self.device = device
        self.options = options
        self.fault = fault
        self.styles = styles
        self.jobs_run = 0
        self._on_cuda = device.startswith("cuda")
        self._image_to_image: Any = None  # built at the first job that needs it
        self._editor: Any = None

    @property
    def dtype(self) -> str:
        return str(self.pipe.dtype).removeprefix("torch.")

    @property
    def model(self) -> str:
        return self.options.model

    def warm_up(self) -> None:
        """Run every bucket once, so compilation and allocator growth happen before the first user waits."""
        for width, height in self.options.buckets:
            started = time.perf_counter()
            self.pipe(prompt="warm-up", width=width, height=height, num_inference_steps=WARMUP_STEPS)
            log.info("warmed %dx%d in %.1f s", width, height, time.perf_counter() - started)
        self._between_jobs()

    def run(self, spec: JobSpec, progress: Sink, cancels: Cancels) -> JobOutcome:
        import torch

        self.jobs_run += 1
        job_number = self.jobs_run
        if cancels.cancelled(spec.id):
            return CancelledJob(spec.id, 0)
        if self.options.compile and (spec.width, spec.height) not in self.options.buckets:
            log.warning(
                "job %s: %dx%d is not a warmed bucket: torch.compile recompiles", spec.id, spec.width, spec.height
            )

        stopped_after: int | None = None
        try:
            pipe, inputs, steps = self._pipeline_for(spec)
            # Every job sets its style, the base model included: the last job's adapters must not carry over.
            self.styles.apply(spec.style)
        except WorkerSetupError as exc:
            log.error("job %s: %s", spec.id, exc)
            return WorkerFailed(spec.id, WorkerFailure.INTERNAL, str(exc))

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal stopped_after
            step = index + 1
            if self.fault is not None and self.fault.fires(job_number, step):
                inject(self.fault, lambda: cancels.until_cancelled(spec.id))
            if cancels.cancelled(spec.id):
                # FluxPipeline's own stop: it skips the steps left (and resets the flag at its next call).
                pipe._interrupt = True
                stopped_after = step
                return {}
            every = self.options.preview_every
            preview = b""
            if every and step % every == 0 and step < steps:
                preview = preview_png(tensors["latents"], spec.width, spec.height, pipe.vae_scale_factor)
            progress.send(StepProgress(spec.id, step, steps, preview))
            return {}

        extra = {} if spec.guidance is None else {"guidance_scale": spec.guidance}
        started = time.perf_counter()
        try:
            image = pipe(
                prompt=spec.prompt,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                **inputs,
                **extra,
            ).images[0]
            if stopped_after is not None:
                log.info("job %s: cancelled after step %d of %d", spec.id, stopped_after, spec.steps)
                return CancelledJob(spec.id, stopped_after)
            png = _png(image)
        except torch.cuda.OutOfMemoryError as exc:
            log.error("job %s: out of memory: %s", spec.id, exc)
            return WorkerFailed(spec.id, WorkerFailure.OOM, str(exc)[:500])
        except ConnectionError:
            raise  # the supervisor is gone; nobody to report to
        except Exception as exc:
            log.exception("job %s failed", spec.id)
            return WorkerFailed(spec.id, WorkerFailure.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self._between_jobs()
        seconds = time.perf_counter() - started
        log.info(
            "job %s (%s): %dx%d, %d steps in %.2f s", spec.id, spec.model, spec.width, spec.height, spec.steps, seconds
        )
        return ImageDone(spec.id, spec.seed, seconds, png)

    def _pipeline_for(self, spec: JobSpec) -> tuple[Any, dict[str, Any], int]:
        """The pipeline for the job's task, its input arguments, and the steps it will really run."""
        if spec.task is Task.EDIT:
            if spec.style and self.options.kontext_model != self.options.model:
                raise WorkerSetupError(
                    f"style {spec.style!r} adapts {self.options.model}'s transformer, not the Kontext weights"
                    " this worker edits with: edits cannot use a LoRA style here"
                )
            return self._kontext(), {"image": _decoded(spec.image), "max_area": spec.width * spec.height}, spec.steps
        if spec.image:
            strength = DEFAULT_GUIDE_STRENGTH if spec.strength is None else spec.strength
            inputs = {"image": _decoded(spec.image), "strength": strength}
            return self._img2img(), inputs, img2img_steps(spec.steps, strength)
        return self.pipe, {}, spec.steps

    def _img2img(self) -> Any:
        """Image to image on the loaded components (no second copy of the weights, the styles' adapters included)."""
        if self._image_to_image is None:
            from diffusers import FluxImg2ImgPipeline

            self._image_to_image = FluxImg2ImgPipeline.from_pipe(self.pipe)
            self._image_to_image.set_progress_bar_config(disable=True)
        return self._image_to_image

    def _kontext(self) -> Any:
        """FLUX.1 Kontext on the loaded text encoders and VAE, with Kontext's transformer (loaded once, beside the
        model's) or, when the Kontext weights are the model's own, on the very same components."""
        if self._editor is None:
            from diffusers import FluxKontextPipeline

            weights = self.options.kontext_model
            if not weights:
                raise WorkerSetupError("this worker has no Kontext weights ([local] kontext_model is not set)")
            if weights == self.options.model:
                editor = FluxKontextPipeline.from_pipe(self.pipe)
            else:
                from diffusers import FluxTransformer2DModel

                transformer = FluxTransformer2DModel.from_pretrained(  # type: ignore[no-untyped-call]
                    weights, subfolder="transformer", torch_dtype=self.pipe.dtype
                ).to(self.pipe.device)
                editor = FluxKontextPipeline(  # type: ignore[no-untyped-call]
                    **{**self.pipe.components, "transformer": transformer}
                )
            editor.set_progress_bar_config(disable=True)
            self._editor = editor
        return self._editor

    def memory(self) -> MemoryStats:
        if not self._on_cuda:
            return MemoryStats(rss_mb=rss_mb())
        import torch

        mib = 2**20
        return MemoryStats(
            rss_mb=rss_mb(),
            allocated_mb=torch.cuda.memory_allocated() / mib,
            reserved_mb=torch.cuda.memory_reserved() / mib,
            max_allocated_mb=torch.cuda.max_memory_allocated() / mib,
        )

    def _between_jobs(self) -> None:
        # Drop what the last job left (an OOM's traceback holds tensors) and give cached blocks back, so the next
        # job starts from the same footprint and the supervisor's memory figures mean something.
        gc.collect()
        if self._on_cuda:
            import torch

            torch.cuda.empty_cache()
