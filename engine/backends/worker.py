"""The local FLUX.1 worker: one process per GPU, serving jobs for the supervisor (engine/backends/local.py).

Run as `python -m engine.backends.worker --model PATH_OR_ID [--device cuda] ...`, spawned by the supervisor, it
speaks the frames of engine/backends/protocol.py on stdin/stdout, so stdout carries nothing else and every log line
goes to stderr. Run as its own systemd unit (flux-bot-worker@.service) with `--listen SOCKET`, it binds that Unix
socket, loads the model, tells systemd READY=1, serves the same frames to the one supervisor that connects, keeps
systemd's watchdog fed while it makes progress, and exits when that connection ends or on `shutdown`: systemd's
Restart=always then starts a fresh process, which is how a worker unit is recycled.

torch is imported only inside functions: PYTORCH_CUDA_ALLOC_CONF has to be in the environment before torch reads
it, and the supervisor imports this module (for `worker_args`) without needing torch at all.

A `cancel` reaches a job while it runs: a reader thread takes every frame off the channel as it comes and notes a
cancel at once; the job's step callback sees it and sets FluxPipeline's `interrupt`, so the pipeline skips the steps
left. The worker answers `cancelled`, frees what the job held (as between any two jobs) and serves the next job with
the model still loaded. Only the serving thread pings systemd's watchdog, so a step that never returns still stops
the pings.

Test-only fault switch: FLUX_BOT_WORKER_FAULT="oom_at_step=2", "hang_at_step=2", "crash_at_step=2" or
"stall_at_step=2", optionally followed by ";job=N" to fire only in the Nth job this process serves (counted from 1,
warm-up excluded). It lets tests provoke an OOM, a hang (a step that never returns, cancel or not), a native crash
and a slow step (one that lasts until the job is cancelled) through the real code path; it does nothing when unset.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from engine.backends.protocol import (
    PROTOCOL_VERSION,
    CancelledJob,
    Frame,
    JobSpec,
    MemoryStats,
    MessageType,
    ProtocolError,
    WorkerFailure,
    encode,
    read_frame_blocking,
)
from engine.config import LocalSettings
from engine.sd_notify import Notifier, watchdog_interval_s

log = logging.getLogger("engine.backends.worker")

FAULT_ENV = "FLUX_BOT_WORKER_FAULT"
ALLOC_CONF = "expandable_segments:True"
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


class WorkerSetupError(Exception):
    """The configuration cannot be served here (a missing package, fp8 without CUDA...)."""


# ---- the test-only fault switch ----


FaultKind = Literal["oom", "hang", "crash", "stall"]


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    step: int
    job: int | None = None

    def fires(self, job_number: int, step: int) -> bool:
        return step == self.step and (self.job is None or self.job == job_number)


def parse_fault(text: str | None) -> Fault | None:
    if not text:
        return None
    fields: dict[str, int] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"{FAULT_ENV}: expected KEY=NUMBER parts separated by ';', got {part!r}")
        fields[key.strip()] = int(value)
    job = fields.pop("job", None)
    kinds: dict[str, FaultKind] = {
        "oom_at_step": "oom",
        "hang_at_step": "hang",
        "crash_at_step": "crash",
        "stall_at_step": "stall",
    }
    if len(fields) != 1 or next(iter(fields)) not in kinds:
        raise ValueError(f"{FAULT_ENV}: name exactly one of {', '.join(kinds)} (and optionally job=N)")
    ((key, step),) = fields.items()
    return Fault(kinds[key], step, job)


def _inject(fault: Fault, until_cancelled: Callable[[], None]) -> None:
    import torch

    log.warning("%s: injecting %s at step %d", FAULT_ENV, fault.kind, fault.step)
    if fault.kind == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated by {FAULT_ENV})")
    if fault.kind == "crash":
        # No cleanup, no goodbye frame: what a segfault in a CUDA kernel looks like from outside.
        os._exit(70)
    if fault.kind == "stall":
        until_cancelled()
        return
    while True:  # hang: only the supervisor's watchdog (or its cancel bound) ends this
        time.sleep(3600)


# ---- command line ----


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
    parser.add_argument(
        "--listen",
        type=Path,
        metavar="SOCKET",
        help="serve one supervisor on this Unix socket, then exit (a systemd unit); default: stdin/stdout",
    )
    return parser


def worker_args(settings: LocalSettings, model: str) -> list[str]:
    """The command-line arguments that make a worker serve `settings` (the inverse of build_parser)."""

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
    ]


def parse_buckets(text: str) -> list[tuple[int, int]]:
    buckets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, sep, height = item.partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f"resolution bucket {item!r} is not WIDTHxHEIGHT")
        buckets.append((int(width), int(height)))
    return buckets


# ---- transport ----


class Channel(Protocol):
    """Where frames come from and go to: stdin/stdout pipes, a Unix socket, a JetStream consumer later.

    `receive` blocks and is called from the inbox's reader thread while `send` is called from the serving thread.
    """

    def receive(self) -> Frame | None: ...

    def send(self, frame: Frame) -> None: ...


# What the inbox's reader thread hands the serving thread: a frame, None at the end of the stream, or what broke it.
_Inbound = Frame | None | Exception


class PipeChannel:
    def __init__(self, reader: IO[bytes], writer: IO[bytes]) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    def from_stdio(cls) -> PipeChannel:
        # The protocol keeps a private copy of stdout; fd 1 and sys.stdout then point at stderr, so a library that
        # prints can never corrupt a frame.
        protocol_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(sys.stdin.buffer, os.fdopen(protocol_fd, "wb"))

    def receive(self) -> Frame | None:
        return read_frame_blocking(self._reader)

    def send(self, frame: Frame) -> None:
        self._writer.write(encode(frame))
        self._writer.flush()


class Heartbeat:
    """WATCHDOG=1 for systemd, at most once per interval, from the thread that serves jobs.

    Pinged while waiting for a frame and whenever a frame goes out (every step sends progress), so a step that never
    returns stops the pings and systemd kills the unit after WatchdogSec, even with no supervisor watching. Never
    from the inbox's reader thread, which keeps reading whatever the serving thread does.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None) -> None:
        self.notifier = notifier
        self.interval_s = interval_s  # None: no watchdog asked of this process
        self._due = 0.0

    def beat(self) -> None:
        if self.interval_s is not None and time.monotonic() >= self._due:
            self.notifier.watchdog()
            self._due = time.monotonic() + self.interval_s

    def wait_readable(self, sock: socket.socket) -> None:
        """Block until `sock` has something to read (a frame, a connection, its end), pinging meanwhile."""
        while not select.select([sock], [], [], self.interval_s)[0]:
            self.beat()

    def wait(self, frames: queue.Queue[_Inbound]) -> _Inbound:
        """The next item of `frames`, pinging while none comes."""
        while True:
            try:
                return frames.get(timeout=self.interval_s)
            except queue.Empty:
                self.beat()


class SocketChannel:
    """Frames over one connection accepted on a worker unit's socket."""

    def __init__(self, conn: socket.socket, heartbeat: Heartbeat) -> None:
        self._conn = conn
        # Unbuffered: select() sees only what the kernel holds, so a read-ahead buffer could keep a frame it waits for.
        self._reader = conn.makefile("rb", buffering=0)
        self._heartbeat = heartbeat

    def wait_readable(self) -> None:
        self._heartbeat.wait_readable(self._conn)

    def receive(self) -> Frame | None:
        return read_frame_blocking(self._reader)

    def send(self, frame: Frame) -> None:
        self._conn.sendall(encode(frame))
        self._heartbeat.beat()

    def close(self) -> None:
        self._reader.close()
        self._conn.close()


class Inbox:
    """The supervisor's frames, read on a thread of their own so that a cancel reaches a job while it runs.

    The reader thread queues every frame, in order, for the serving thread, and notes a cancel the moment it arrives
    (and the end of the stream, which cancels whatever runs: nobody is left to take its result). The serving thread
    forgets a cancel once it has answered it, so a cancel never outlives its answer.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._frames: queue.Queue[_Inbound] = queue.Queue()
        self._cancelled: set[str] = set()
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="inbox", daemon=True).start()

    def next(self, heartbeat: Heartbeat) -> Frame | None:
        item = heartbeat.wait(self._frames)
        if isinstance(item, Exception):
            raise item
        return item

    def cancelled(self, job_id: str) -> bool:
        with self._changed:
            return self._ended or job_id in self._cancelled

    def until_cancelled(self, job_id: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._ended or job_id in self._cancelled)

    def answered(self, job_id: str) -> None:
        with self._changed:
            self._cancelled.discard(job_id)

    def _read(self) -> None:
        try:
            while True:
                frame = self._channel.receive()
                with self._changed:
                    if frame is None:
                        self._ended = True
                    elif frame.type is MessageType.CANCEL and isinstance(job_id := frame.header.get("id"), str):
                        self._cancelled.add(job_id)
                    self._changed.notify_all()
                # Queued after it is noted: a job stopped by a cancel always finds that cancel in the queue.
                self._frames.put(frame)
                if frame is None or frame.type is MessageType.SHUTDOWN:
                    return
        except (ProtocolError, OSError) as exc:  # the serving thread raises it, as if it had read the frame itself
            with self._changed:
                self._ended = True
                self._changed.notify_all()
            self._frames.put(exc)


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660, in place of the stale one a previous process left there."""
    try:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise WorkerSetupError(f"{path} exists and is not a socket")
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Through the umask rather than a chmod after bind(), which would leave a moment with a wider mode.
        umask = os.umask(0o117)
        try:
            listener.bind(str(path))
        finally:
            os.umask(umask)
        listener.listen()
    except OSError as exc:
        raise WorkerSetupError(f"cannot listen on {path}: {exc}") from exc
    return listener


# ---- the pipeline ----


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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(
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
        )


def load_pipeline(options: Options) -> tuple[Any, str]:
    """FluxPipeline with the configured switches applied, and the device it runs on."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

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
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        compile_pipeline(pipe, len(options.buckets))
    return pipe, str(device)


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


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best the standard library offers
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FluxWorker:
    """Serves jobs from one channel with one loaded pipeline."""

    def __init__(self, pipe: Any, device: str, options: Options, fault: Fault | None) -> None:
        self.pipe = pipe
        self.device = device
        self.options = options
        self.fault = fault
        self.jobs_served = 0
        self._on_cuda = device.startswith("cuda")

    def warm_up(self) -> None:
        """Run every bucket once, so compilation and allocator growth happen before the first user waits."""
        for width, height in self.options.buckets:
            started = time.perf_counter()
            self.pipe(prompt="warm-up", width=width, height=height, num_inference_steps=WARMUP_STEPS)
            log.info("warmed %dx%d in %.1f s", width, height, time.perf_counter() - started)
        self._between_jobs()

    def serve(self, channel: Channel, heartbeat: Heartbeat) -> int:
        inbox = Inbox(channel)
        stopped: dict[str, CancelledJob] = {}  # jobs a cancel stopped, until that cancel comes up in the queue
        while True:
            frame = inbox.next(heartbeat)
            if frame is None or frame.type is MessageType.SHUTDOWN:
                return 0  # the end of the stream means the supervisor is gone: free the GPU rather than linger
            if frame.type is MessageType.JOB:
                result = self.run(JobSpec.from_frame(frame), channel, inbox)
                if isinstance(result, CancelledJob):
                    stopped[result.id] = result
                else:
                    channel.send(result)
            elif frame.type is MessageType.CANCEL:
                # One answer per cancel, in stream order: whatever this job sent came before it, nothing comes after.
                job_id = frame.text("id")
                inbox.answered(job_id)
                channel.send(stopped.pop(job_id, CancelledJob(job_id, None)).to_frame())
            elif frame.type is MessageType.STATS:
                channel.send(self.memory().to_frame())
            else:
                channel.send(_failure(None, WorkerFailure.INTERNAL, f"unexpected {frame.type} message"))

    def ready_frame(self, load_s: float) -> Frame:
        header = {
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "device": self.device,
            "dtype": str(self.pipe.dtype).removeprefix("torch."),
            "model": self.options.model,
            "load_s": round(load_s, 3),
        }
        return Frame(MessageType.READY, header)

    def run(self, spec: JobSpec, channel: Channel, inbox: Inbox) -> Frame | CancelledJob:
        import torch

        self.jobs_served += 1
        job_number = self.jobs_served
        if inbox.cancelled(spec.id):
            return CancelledJob(spec.id, 0)
        if self.options.compile and (spec.width, spec.height) not in self.options.buckets:
            log.warning(
                "job %s: %dx%d is not a warmed bucket: torch.compile recompiles", spec.id, spec.width, spec.height
            )

        stopped_after: int | None = None

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal stopped_after
            step = index + 1
            if self.fault is not None and self.fault.fires(job_number, step):
                _inject(self.fault, lambda: inbox.until_cancelled(spec.id))
            if inbox.cancelled(spec.id):
                # FluxPipeline's own stop: it skips the steps left (and resets the flag at its next call).
                pipe._interrupt = True
                stopped_after = step
                return {}
            every = self.options.preview_every
            preview = b""
            if every and step % every == 0 and step < spec.steps:
                preview = preview_png(tensors["latents"], spec.width, spec.height, pipe.vae_scale_factor)
            channel.send(Frame(MessageType.PROGRESS, {"id": spec.id, "step": step, "total": spec.steps}, preview))
            return {}

        extra = {} if spec.guidance is None else {"guidance_scale": spec.guidance}
        started = time.perf_counter()
        try:
            image = self.pipe(
                prompt=spec.prompt,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                **extra,
            ).images[0]
            if stopped_after is not None:
                log.info("job %s: cancelled after step %d of %d", spec.id, stopped_after, spec.steps)
                return CancelledJob(spec.id, stopped_after)
            png = _png(image)
        except torch.cuda.OutOfMemoryError as exc:
            log.error("job %s: out of memory: %s", spec.id, exc)
            return _failure(spec.id, WorkerFailure.OOM, str(exc)[:500])
        except ConnectionError:
            raise  # the supervisor is gone; nobody to report to
        except Exception as exc:
            log.exception("job %s failed", spec.id)
            return _failure(spec.id, WorkerFailure.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self._between_jobs()
        seconds = time.perf_counter() - started
        log.info("job %s: %dx%d, %d steps in %.2f s", spec.id, spec.width, spec.height, spec.steps, seconds)
        return Frame(MessageType.DONE, {"id": spec.id, "seed": spec.seed, "seconds": seconds}, png)

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


def _failure(job_id: str | None, reason: WorkerFailure, detail: str) -> Frame:
    return Frame(MessageType.FAILED, {"id": job_id, "reason": reason.value, "detail": detail})


def _set_allocator_conf() -> None:
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" not in current:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = f"{current},{ALLOC_CONF}" if current else ALLOC_CONF
    if "torch" in sys.modules:
        log.warning("torch was imported before the worker started; PYTORCH_CUDA_ALLOC_CONF may not apply")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options.from_args(args)
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
        return _serve_pipe(channel, options, fault)
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


def _serve_pipe(channel: Channel, options: Options, fault: Fault | None) -> int:
    code = _greet(channel)
    if code is not None:
        return code
    loaded = _load(options, fault)
    if isinstance(loaded, Frame):
        channel.send(loaded)
        return 1
    worker, load_s = loaded
    channel.send(worker.ready_frame(load_s))
    return worker.serve(channel, Heartbeat(Notifier(None), None))


def serve_socket(path: Path, options: Options, fault: Fault | None, notifier: Notifier) -> int:
    """Serve one supervisor on a Unix socket at `path`; the exit code once it is done.

    The socket is bound before the model loads: a supervisor connects at once and waits for `ready`, as it waits
    for a worker it spawned, instead of polling a socket that appears only minutes later. READY=1 to systemd means
    the model is loaded.
    """
    listener = bind_socket(path)
    loaded = _load(options, fault)
    if isinstance(loaded, Frame):
        _tell_a_waiting_supervisor(listener, loaded)
        return 1
    worker, load_s = loaded
    heartbeat = Heartbeat(notifier, watchdog_interval_s())
    notifier.ready()
    notifier.status(f"waiting for the supervisor on {path}")
    while True:
        heartbeat.wait_readable(listener)
        conn, _ = listener.accept()
        channel = SocketChannel(conn, heartbeat)
        channel.wait_readable()
        code = _greet(channel)
        if code != 0:
            break
        channel.close()  # gone before its hello (a supervisor that gave up while we loaded): wait for the next
    # One supervisor per process: a second is refused at once rather than queued behind this one for good.
    listener.close()
    if code is not None:
        return code
    log.info("serving the supervisor on %s", path)
    notifier.status(f"serving the supervisor on {path}")
    channel.send(worker.ready_frame(load_s))
    return worker.serve(channel, heartbeat)


def _tell_a_waiting_supervisor(listener: socket.socket, failure: Frame) -> None:
    """Send `failure` to a supervisor already connected and waiting for `ready`; with none, the journal has it."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    conn.setblocking(True)
    channel = SocketChannel(conn, Heartbeat(Notifier(None), None))
    with contextlib.suppress(ConnectionError, ProtocolError):
        if _greet(channel) is None:
            channel.send(failure)
    channel.close()


def _greet(channel: Channel) -> int | None:
    """None once the peer has opened with a hello of this protocol version; else the exit code (0: it left)."""
    hello = channel.receive()
    if hello is None:
        return 0
    if hello.type is not MessageType.HELLO or hello.header.get("version") != PROTOCOL_VERSION:
        detail = f"expected hello with protocol version {PROTOCOL_VERSION}, got {hello.type} {dict(hello.header)}"
        channel.send(_failure(None, WorkerFailure.INTERNAL, detail))
        return 2
    return None


def _load(options: Options, fault: Fault | None) -> tuple[FluxWorker, float] | Frame:
    """The loaded (and warmed) worker with its load time in seconds, or the `failed` frame that says why not."""
    started = time.perf_counter()
    try:
        pipe, device = load_pipeline(options)
        worker = FluxWorker(pipe, device, options, fault)
        if options.warmup:
            worker.warm_up()
    except Exception as exc:
        log.exception("cannot serve %s", options.model)
        return _failure(None, WorkerFailure.INTERNAL, f"cannot load {options.model}: {exc}"[:1000])
    from engine.backends.demo_model import DEMO_NOTICE, is_demo_model

    if is_demo_model(Path(options.model)):
        log.warning("%s", DEMO_NOTICE)
    load_s = time.perf_counter() - started
    log.info("serving %s on %s (%.1f s to load)", options.model, device, load_s)
    return worker, load_s


if __name__ == "__main__":
    exit_code = main()
    # Skip the interpreter's teardown (1-2 s with torch loaded): the supervisor waits for this exit before it starts
    # a successor, and nothing is left to flush but the log.
    logging.shutdown()
    os._exit(exit_code)
