"""LoRA styles on the worker: checked and loaded once at start, switched per job.

A style names up to three LoRA adapters with weights. At start the worker resolves each file (a local path, or
"hf:OWNER/REPO/FILE" already in the Hugging Face cache: GPU hosts run offline), checks its sha256 before anything
reads it as weights, and loads every adapter once. Each job then sets its own style, or the base model for none:
loading an adapter leaves only that one active, so the state a job runs with is always set, never inherited.

Two ways to hold the adapters:
- `NamedAdapters` (torch.compile off): each adapter is a named peft adapter on the transformer; a job calls
  `set_adapters` with its style's adapters and weights, or `disable_lora` for the base model.
- `HotSwapSlots` (torch.compile on): a compiled graph would be rebuilt whenever the set of adapters, their ranks or
  their scales change, so the transformer holds fixed slots (one per adapter position in a style, each covering
  every layer any adapter in that position targets, at the largest rank), made before compiling. A job copies its
  style's weights into the slots with diffusers' hot-swap (`load_lora_weights(..., hotswap=True)`); the base model
  is all-zero slots. Each adapter's weights are kept, ready to copy, in host memory: the weight and the alpha/rank
  scale are folded into lora_B, so every slot keeps a scale of 1 and nothing the graph was compiled for changes.

Refused at start, because LoRAs then fail or silently do nothing: fp8 (torchao quantised weights cannot take a LoRA)
and fuse_qkv (a LoRA on to_q/to_k/to_v loads without error and changes nothing once those are fused).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.backends.local.pipeline import Options, WorkerSetupError
from engine.config import StyleAdapter

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
SLOT_PREFIX = "style_slot_"
BASE_MODEL = ""  # the job's style when it has none


@dataclass(frozen=True, slots=True)
class AdapterFile:
    """One adapter of a style, its file found and its sha256 checked."""

    style: str
    position: int  # its place among the style's adapters
    path: Path
    weight: float


def check_styles(options: Options) -> dict[str, tuple[AdapterFile, ...]]:
    """The styles' adapter files, found and verified; WorkerSetupError for anything that would make a style wrong."""
    if not options.styles:
        return {}
    names = ", ".join(sorted(options.styles))
    if options.fp8:
        raise WorkerSetupError(
            f"styles {names} have LoRA adapters, which cannot be loaded into an fp8-quantised transformer:"
            " set fp8 = false on this host, or leave these styles to other hosts"
        )
    if options.fuse_qkv:
        raise WorkerSetupError(
            f"styles {names} have LoRA adapters, which do nothing on fused q/k/v projections:"
            " set fuse_qkv = false on this host, or leave these styles to other hosts"
        )
    return {
        style: tuple(
            AdapterFile(style, position, verified(style, adapter), adapter.weight)
            for position, adapter in enumerate(adapters)
        )
        for style, adapters in options.styles.items()
    }


def verified(style: str, adapter: StyleAdapter) -> Path:
    """The adapter's file, found and its sha256 checked; WorkerSetupError saying what is wrong otherwise."""
    path = _resolved(style, adapter.file)
    with path.open("rb") as file:
        found = hashlib.file_digest(file, "sha256").hexdigest()
    if found != adapter.sha256:
        raise WorkerSetupError(
            f"style {style}: {adapter.file} has sha256 {found}, expected {adapter.sha256}"
            " (a changed or damaged file: check it, then correct the sha256 in the style's config)"
        )
    return path


def _resolved(style: str, file: str) -> Path:
    if not file.startswith(HF_PREFIX):
        path = Path(file)
        if not path.is_file():
            raise WorkerSetupError(f"style {style}: adapter file {file} does not exist")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    owner, _, rest = file.removeprefix(HF_PREFIX).partition("/")
    name, _, filename = rest.partition("/")
    if not (owner and name and filename):
        raise WorkerSetupError(f"style {style}: {file} is not hf:OWNER/REPO/FILE")
    repo = f"{owner}/{name}"
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as exc:
        raise WorkerSetupError(
            f"style {style}: {file} is not in the Hugging Face cache and this host does not download:"
            f" fetch it once with `huggingface-cli download {repo} {filename}` ({type(exc).__name__})"
        ) from exc


class Styles(Protocol):
    """The styles a worker loaded, and the one switch a job needs."""

    @property
    def names(self) -> tuple[str, ...]: ...

    def apply(self, style: str) -> None:
        """Make the pipeline run `style` (BASE_MODEL: none) from the next call on; WorkerSetupError if not loaded."""


class NoStyles:
    """A worker asked to load no adapters: every job runs the base model."""

    names: tuple[str, ...] = ()

    def apply(self, style: str) -> None:
        if style != BASE_MODEL:
            raise WorkerSetupError(_not_loaded(style, self.names))


def load_styles(pipe: Any, styles: Mapping[str, Sequence[AdapterFile]], *, hotswap: bool) -> Styles:
    """Load every adapter of `styles` into `pipe` once (before it is compiled), the base model set."""
    if not styles:
        return NoStyles()
    loaded: Styles = HotSwapSlots(pipe, styles) if hotswap else NamedAdapters(pipe, styles)
    loaded.apply(BASE_MODEL)
    log.info("styles loaded: %s (%s)", ", ".join(loaded.names), "hot-swap slots" if hotswap else "named adapters")
    return loaded


class NamedAdapters:
    """Each adapter a named peft adapter on the transformer; a job activates its style's ones with their weights."""

    def __init__(self, pipe: Any, styles: Mapping[str, Sequence[AdapterFile]]) -> None:
        self._pipe = pipe
        self._adapters: dict[str, tuple[list[str], list[float]]] = {}
        for style, files in styles.items():
            names = [_adapter_name(file) for file in files]
            for file, name in zip(files, names, strict=True):
                _load(pipe, file, name)
            self._adapters[style] = (names, [file.weight for file in files])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def apply(self, style: str) -> None:
        if style == BASE_MODEL:
            self._pipe.disable_lora()
            return
        if style not in self._adapters:
            raise WorkerSetupError(_not_loaded(style, self.names))
        names, weights = self._adapters[style]
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=weights)


class HotSwapSlots:
    """Fixed adapter slots made before torch.compile; a job hot-swaps its style's weights into them."""

    def __init__(self, pipe: Any, styles: Mapping[str, Sequence[AdapterFile]]) -> None:
        self._pipe = pipe
        extracted = {style: [_effective_weights(pipe, file) for file in files] for style, files in styles.items()}
        slot_count = max(len(files) for files in styles.values())
        self._rank = max(
            down.shape[0] for adapters in extracted.values() for layers in adapters for down, _ in layers.values()
        )
        # Each slot covers every layer an adapter in its position targets: hot-swap zeroes what an adapter leaves out
        # and refuses what the slot lacks, so the union is the one shape that takes them all.
        slot_layers: list[dict[str, tuple[int, int]]] = [{} for _ in range(slot_count)]
        for layers_of_style in extracted.values():
            for position, layers in enumerate(layers_of_style):
                for layer, (down, up) in layers.items():
                    slot_layers[position][layer] = (down.shape[1], up.shape[0])
        self._slots = [f"{SLOT_PREFIX}{position}" for position in range(slot_count)]
        self._weights = {
            style: [self._padded(layers) for layers in layers_of_style] for style, layers_of_style in extracted.items()
        }
        # One zero layer is enough to empty a slot: hot-swap zeroes every layer the state dict leaves out.
        self._empty = [self._zeros(dict([next(iter(layers.items()))])) for layers in slot_layers]
        pipe.enable_lora_hotswap(target_rank=self._rank)
        for slot, layers in zip(self._slots, slot_layers, strict=True):
            with _quiet_loader():
                pipe.load_lora_weights(self._zeros(layers), adapter_name=slot)
        # Loading an adapter makes it the only active one: every slot runs, at the scale of 1 the weights assume.
        pipe.set_adapters(self._slots, adapter_weights=[1.0] * slot_count)
        self._current: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._weights)

    def apply(self, style: str) -> None:
        if style != BASE_MODEL and style not in self._weights:
            raise WorkerSetupError(_not_loaded(style, self.names))
        if style == self._current:
            return
        contents = self._weights.get(style, [])
        self._current = None  # a swap that fails half-way leaves the slots in no known style
        for position, slot in enumerate(self._slots):
            state = contents[position] if position < len(contents) else self._empty[position]
            with _quiet_loader():
                self._pipe.load_lora_weights(state, adapter_name=slot, hotswap=True)
        self._current = style

    def _padded(self, layers: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
        """The adapter as a state dict at the slots' rank (zero rows and columns beyond its own), so that every
        adapter has the slots' config (rank = alpha, scale 1) and hot-swap accepts it."""
        import torch

        state: dict[str, Any] = {}
        for layer, (down, up) in layers.items():
            rank = down.shape[0]
            padded_down = torch.zeros(self._rank, down.shape[1], dtype=down.dtype)
            padded_down[:rank] = down
            padded_up = torch.zeros(up.shape[0], self._rank, dtype=up.dtype)
            padded_up[:, :rank] = up
            state[f"transformer.{layer}.lora_A.weight"] = padded_down
            state[f"transformer.{layer}.lora_B.weight"] = padded_up
        return state

    def _zeros(self, layers: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        import torch

        dtype = self._pipe.transformer.dtype
        state: dict[str, Any] = {}
        for layer, (features_in, features_out) in layers.items():
            state[f"transformer.{layer}.lora_A.weight"] = torch.zeros(self._rank, features_in, dtype=dtype)
            state[f"transformer.{layer}.lora_B.weight"] = torch.zeros(features_out, self._rank, dtype=dtype)
        return state


def _effective_weights(pipe: Any, file: AdapterFile) -> dict[str, tuple[Any, Any]]:
    """{transformer layer: (lora_A, lora_B with the adapter's scale and the style's weight folded in)}, in host
    memory, read through diffusers' own loader (which converts every LoRA format it knows to peft's layout)."""
    import torch
    from peft.tuners.lora import LoraLayer

    name = _adapter_name(file)
    _load(pipe, file, name)
    try:
        if name in getattr(pipe.text_encoder, "peft_config", {}):
            raise WorkerSetupError(
                f"style {file.style}: {file.path} also adapts the text encoder, which hot-swapping cannot switch:"
                " set compile = false on this host to serve this style"
            )
        layers: dict[str, tuple[Any, Any]] = {}
        for layer, module in pipe.transformer.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            if module.use_dora.get(name) or module.lora_bias.get(name):
                raise WorkerSetupError(
                    f"style {file.style}: {file.path} is a DoRA or biased LoRA, which hot-swapping cannot switch:"
                    " set compile = false on this host to serve this style"
                )
            peft_layer: Any = module  # peft's own hints cannot tell its ModuleDicts' Linear layers from tensors
            down = peft_layer.lora_A[name].weight.detach()
            up = peft_layer.lora_B[name].weight.detach()
            scale = float(module.scaling[name]) * file.weight
            with torch.no_grad():
                layers[layer] = (down.to("cpu", copy=True), (up.float() * scale).to("cpu", up.dtype))
    finally:
        pipe.unload_lora_weights()
    return layers


def _load(pipe: Any, file: AdapterFile, name: str) -> None:
    with _quiet_loader():
        try:
            pipe.load_lora_weights(str(file.path), adapter_name=name)
        except (ValueError, RuntimeError, OSError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            message = f"style {file.style}: cannot load {file.path} as a LoRA for this model: {detail}"
            raise WorkerSetupError(message) from exc
    if name not in pipe.get_list_adapters().get("transformer", []):
        raise WorkerSetupError(f"style {file.style}: {file.path} adapts no layer of this model's transformer")


@contextlib.contextmanager
def _quiet_loader() -> Iterator[None]:
    """Without the two notices diffusers and peft give at every load: that a style LoRA has no text-encoder layers,
    and that the model now holds several adapters. Both are what styles are; repeated per job they bury the log."""
    notices = logging.getLogger("diffusers.loaders.lora_base")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        notices.setLevel(level)


def _adapter_name(file: AdapterFile) -> str:
    # Style names are [a-z0-9_-]; ':' cannot occur in one, so these names never collide. No '.': peft keeps
    # adapters in torch ModuleDicts, whose keys cannot contain one.
    return f"{file.style}:{file.position}"


def _not_loaded(style: str, loaded: Sequence[str]) -> str:
    return f"style {style!r} is not loaded on this worker (it has: {', '.join(loaded) or 'no styles'})"
