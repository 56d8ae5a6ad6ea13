"""LoRA adapters for the tiny FLUX.1 pipeline, made in code with peft (no download), for the style tests and bench.

`make_lora` adds a peft LoRA to the tiny transformer, fills its weights from a seed (lora_B non-zero, so the image
changes), saves it with `FluxPipeline.save_lora_weights` as one .safetensors file and returns it with its sha256.
The same arguments give the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import StyleAdapter

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True, slots=True)
class Lora:
    path: Path
    sha256: str
    rank: int
    targets: tuple[str, ...]

    def adapter(self, weight: float = 1.0) -> StyleAdapter:
        return StyleAdapter(file=str(self.path), sha256=self.sha256, weight=weight)


def make_lora(
    model: Path,
    path: Path,
    *,
    seed: int,
    rank: int = 4,
    targets: Sequence[str] = ATTENTION,
    alpha: float | None = None,
    scale: float = 0.5,
) -> Lora:
    """A LoRA for the tiny pipeline at `model`, saved to `path`; `scale` sets how strongly it changes the image."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")  # type: ignore[no-untyped-call]
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(transformer.named_parameters()):
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    layers = get_peft_model_state_dict(transformer, adapter_name="made")
    path.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=layers,
        weight_name=path.name,
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return Lora(path, sha256_of(path), rank, tuple(targets))


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
