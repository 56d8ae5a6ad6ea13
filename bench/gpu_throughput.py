"""GPU throughput of the local worker's FLUX.1 set-ups, with random weights (nothing to download).

On a CUDA GPU it builds the real FLUX.1 [dev] and [schnell] transformer and VAE architectures and
times 1024x1024 images at 28 steps ([dev]) and 4 steps ([schnell]) for eager bf16, compiled bf16 and compiled fp8
(torchao), using the worker's own compile and fp8 code. The text encoders are skipped: random T5 (512 x 4096) and
CLIP pooled (768) embeddings go straight in, so the timings are the transformer's steps plus the VAE decode. Between
images it does what the worker does between jobs (gc + empty_cache). Per set-up it reports the median seconds per
image, images per hour, the peak GPU memory and its drift over all timed generations.

On a machine without CUDA it runs the tiny demo pipeline instead, as a smoke check of this script, and says so.

    python -m bench.gpu_throughput --out bench/out/gpu            # the full run (allow an hour on an H100)
    python -m bench.gpu_throughput --models schnell --variants eager --generations 20 --warmup 2   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# As in the worker: before torch is imported.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from engine.backends.demo_model import build_demo_pipeline
from engine.backends.local.pipeline import COMPILE_MODE, WorkerSetupError, compile_pipeline, quantize_fp8

MODELS = {"dev": {"steps": 28, "guidance_embeds": True}, "schnell": {"steps": 4, "guidance_embeds": False}}
VARIANTS = ("eager", "compiled", "compiled-fp8")
MIB = 2**20


@dataclass
class Result:
    model: str
    variant: str
    width: int
    height: int
    steps: int
    skipped: str = ""
    generations: int = 0
    median_s: float = 0.0
    images_per_hour: float = 0.0
    setup_s: float = 0.0  # building, quantising, and the warm-up images (compilation happens there)
    peak_allocated_mb: float = 0.0
    peak_drift_mb: float = 0.0  # peak of the last 10 generations minus peak of the first 10
    reserved_drift_mb: float = 0.0
    seconds: list[float] = field(default_factory=list)


def real_pipeline(model: str) -> Any:
    """FLUX.1 [dev] / [schnell] transformer and VAE with random bf16 weights, created on the GPU."""
    guidance = bool(MODELS[model]["guidance_embeds"])
    with torch.device("cuda"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # created in bf16: a 12B fp32 copy would not fit beside it
        try:
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=19,
                num_single_layers=38,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=guidance,
                axes_dims_rope=(16, 56, 56),
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                norm_num_groups=32,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        finally:
            torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance)
    return _without_text_encoders(transformer, vae, scheduler)


def tiny_pipeline() -> Any:
    full = build_demo_pipeline()
    return _without_text_encoders(full.transformer, full.vae, full.scheduler)


def _without_text_encoders(transformer: Any, vae: Any, scheduler: Any) -> Any:
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        transformer=transformer,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(pipe: Any, device: str) -> dict[str, Any]:
    """Random prompt embeddings of the shapes the text encoders would give (T5: 512 tokens; CLIP: pooled)."""
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    return {
        "prompt_embeds": torch.randn(1, 512, config.joint_attention_dim, generator=generator).to(device, dtype),
        "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, generator=generator).to(device, dtype),
    }


def measure(pipe: Any, result: Result, args: argparse.Namespace, cuda: bool) -> None:
    inputs = embeddings(pipe, "cuda" if cuda else "cpu")

    def generate() -> float:
        started = time.perf_counter()
        pipe(
            **inputs,
            width=result.width,
            height=result.height,
            num_inference_steps=result.steps,
            generator=torch.Generator().manual_seed(len(result.seconds)),
            output_type="pil",
        )
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    setup_started = time.perf_counter()
    for _ in range(args.warmup):
        generate()
    result.setup_s += time.perf_counter() - setup_started
    peaks: list[float] = []
    reserved: list[float] = []
    for _ in range(args.generations):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result.seconds.append(generate())
        gc.collect()  # what the worker does between jobs
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() / MIB)
            torch.cuda.empty_cache()
            reserved.append(torch.cuda.memory_reserved() / MIB)
    result.generations = len(result.seconds)
    result.median_s = statistics.median(result.seconds)
    result.images_per_hour = 3600 / result.median_s
    if peaks:
        window = min(10, len(peaks))
        result.peak_allocated_mb = max(peaks)
        result.peak_drift_mb = max(peaks[-window:]) - max(peaks[:window])
        result.reserved_drift_mb = max(reserved[-window:]) - max(reserved[:window])


def run_variant(model: str, variant: str, args: argparse.Namespace, cuda: bool) -> Result:
    steps = args.steps or int(MODELS[model]["steps"])
    size = args.size if cuda else 64
    result = Result(model, variant, size, size, steps)
    if not cuda and variant != "eager":
        result.skipped = "no CUDA GPU: the CPU smoke check runs eager only"
        return result
    started = time.perf_counter()
    pipe = real_pipeline(model) if cuda else tiny_pipeline()
    try:
        if args.fuse_qkv:
            pipe.transformer.fuse_qkv_projections()
            pipe.vae.fuse_qkv_projections()
        if variant == "compiled-fp8":
            quantize_fp8(pipe.transformer)
        if variant != "eager":
            compile_pipeline(pipe, bucket_count=1)
    except WorkerSetupError as exc:
        result.skipped = str(exc)
        return result
    result.setup_s = time.perf_counter() - started
    measure(pipe, result, args, cuda)
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def markdown(results: list[Result], header: dict[str, Any]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        "| model | set-up | size | steps | s/image (median) | images/hour | peak GPU MiB | peak drift MiB"
        " | reserved drift MiB | generations | set-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.model} | {r.variant} | {r.width}x{r.height} | {r.steps} | skipped: {r.skipped} |")
            continue
        lines.append(
            f"| {r.model} | {r.variant} | {r.width}x{r.height} | {r.steps} | {r.median_s:.3f} | "
            f"{r.images_per_hour:.0f} | {r.peak_allocated_mb:.0f} | {r.peak_drift_mb:+.0f} | "
            f"{r.reserved_drift_mb:+.0f} | {r.generations} | {r.setup_s:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dev,schnell", help="comma-separated: dev, schnell")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--size", type=int, default=1024, help="square image side on the GPU (CPU smoke: 64)")
    parser.add_argument("--steps", type=int, default=0, help="override the steps (default: 28 dev, 4 schnell)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed images first (compilation happens here)")
    parser.add_argument("--generations", type=int, default=100, help="timed images per set-up (>= 20)")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse attention projections in every set-up")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_throughput"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.models) - set(MODELS)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown model or variant: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    header: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "what": "FLUX.1 architectures, random weights, text encoders skipped"
        if cuda
        else "CPU SMOKE CHECK of the tiny demo pipeline: not a GPU measurement",
        "torch": torch.__version__,
        "compile mode": COMPILE_MODE,
        "fused QKV": args.fuse_qkv,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.gpu_throughput", *(argv or sys.argv[1:])]),
    }
    if not cuda:
        print("no CUDA GPU: running the tiny demo pipeline on the CPU as a smoke check (not a GPU number)")
    results = []
    for model in args.models:
        for variant in args.variants:
            result = run_variant(model, variant, args, cuda)
            outcome = f"skipped: {result.skipped}" if result.skipped else f"{result.median_s:.3f} s/image"
            print(f"{model} {variant}: {outcome}", flush=True)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )
    table = markdown(results, header)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
