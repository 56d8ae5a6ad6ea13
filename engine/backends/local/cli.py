"""The worker process's command line: `python -m engine.backends.local` or `flux-bot worker`, one per GPU.

The supervisor spawns it with `worker_args` (the inverse of `build_parser`); a systemd unit runs it with
`--listen SOCKET`. The allocator setting goes into the environment here, before anything imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from engine.backends.local.faults import FAULT_ENV, Fault, parse_fault
from engine.backends.local.pipeline import Options, WorkerSetupError, parse_buckets
from engine.backends.local.serving import PipeChannel, serve_pipe, serve_socket
from engine.config import LocalSettings, StyleAdapter
from engine.sd_notify import Notifier

log = logging.getLogger(__name__)

ALLOC_CONF = "expandable_segments:True"

StyleAdapters = dict[str, tuple[StyleAdapter, ...]]
_STYLES = TypeAdapter(StyleAdapters)


def parse_styles(text: str) -> StyleAdapters:
    """`--styles`: JSON {style: [{file, sha256, weight}, ...]}, checked as the config checks a style's adapters."""
    try:
        return _STYLES.validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
        raise argparse.ArgumentTypeError(f"not {{style: [{{file, sha256, weight}}]}} JSON: {problems}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-bot worker", description="Serve FLUX.1 jobs on one device.")
    parser.add_argument("--model", required=True, help="a FluxPipeline folder or a Hugging Face id")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="on CUDA; a CPU uses float32"
    )
    parser.add_argument("--buckets", default="", help="resolution buckets to warm, e.g. 1024x1024,1344x768")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--cpu-offload", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--preview-every", type=int, default=4, help="a preview every N steps; 0 = none")
    parser.add_argument("--kontext-model", default="", help="FLUX.1 Kontext weights for edits (folder or HF id)")
    parser.add_argument(
        "--styles",
        type=parse_styles,
        default={},
        metavar="JSON",
        help='LoRA styles to load: {"STYLE": [{"file": PATH or "hf:OWNER/REPO/FILE", "sha256": HEX, "weight": W}]}',
    )
    parser.add_argument(
        "--listen",
        type=Path,
        metavar="SOCKET",
        help="serve one supervisor on this Unix socket, then exit (a systemd unit); default: stdin/stdout",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        buckets=parse_buckets(args.buckets),
        warmup=args.warmup,
        compile=args.compile,
        fp8=args.fp8,
        fuse_qkv=args.fuse_qkv,
        vae_tiling=args.vae_tiling,
        cpu_offload=args.cpu_offload,
        preview_every=args.preview_every,
        kontext_model=args.kontext_model,
        styles=args.styles,
    )


def worker_args(
    settings: LocalSettings,
    model: str,
    kontext_model: str = "",
    styles: Mapping[str, Sequence[StyleAdapter]] | None = None,
) -> list[str]:
    """The command-line arguments that make a worker serve `settings` and load the adapters of `styles` (the inverse
    of build_parser)."""

    def flag(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    return [
        "--model",
        model,
        "--device",
        settings.device,
        "--dtype",
        settings.dtype,
        "--buckets",
        ",".join(settings.resolution_buckets),
        flag("warmup", settings.warmup),
        flag("compile", settings.compile),
        flag("fp8", settings.fp8),
        flag("fuse-qkv", settings.fuse_qkv),
        flag("vae-tiling", settings.vae_tiling),
        flag("cpu-offload", settings.cpu_offload),
        "--preview-every",
        str(settings.preview_every),
        "--kontext-model",
        kontext_model,
        "--styles",
        json.dumps(
            {name: [adapter.model_dump() for adapter in adapters] for name, adapters in (styles or {}).items()},
            separators=(",", ":"),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s"
    )
    _set_allocator_conf()
    try:
        fault = parse_fault(os.environ.get(FAULT_ENV))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.listen is not None:
        return _main_listening(args.listen, options, fault)
    channel = PipeChannel.from_stdio()
    try:
        return serve_pipe(channel, options, fault)
    except ConnectionError:
        log.warning("the supervisor closed the pipe; exiting")
        return 0


def _main_listening(path: Path, options: Options, fault: Fault | None) -> int:
    notifier = Notifier.from_env()
    try:
        return serve_socket(path, options, fault, notifier)
    except WorkerSetupError as exc:
        log.error("%s", exc)
        return 1
    except ConnectionError:
        log.warning("the supervisor closed the connection; exiting")
        return 0
    finally:
        notifier.stopping()
        notifier.close()


def _set_allocator_conf() -> None:
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" not in current:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = f"{current},{ALLOC_CONF}" if current else ALLOC_CONF
    if "torch" in sys.modules:
        log.warning("torch was imported before the worker started; PYTORCH_CUDA_ALLOC_CONF may not apply")
