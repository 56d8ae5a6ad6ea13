"""The built-in demo model: a tiny FLUX.1 pipeline with random weights, built in code (no download).

It runs the real diffusers FluxPipeline code path on a CPU in well under a second, so a fresh machine can try
flux-bot end to end and the tests can exercise real worker processes. Its images are noise: the weights are random.
The same builder is the test fixture (tests/fakes/tiny_flux.py).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Written last into a finished build: a folder without it is not (or not yet) a complete demo model.
MARKER = "flux_bot_demo.json"
# Bumped whenever the builder changes what it builds, so that folders built by an older flux-bot are rebuilt.
VERSION = 2
SEED = 0

DEMO_NOTICE = (
    "Demo model: a tiny FLUX.1 pipeline with random weights, so every image is noise. "
    "For real images set [local] model in config.toml to a FLUX.1 folder or Hugging Face id "
    "(e.g. black-forest-labs/FLUX.1-schnell) or use the BFL API."
)

# A few words are enough: the tokenizers only need to turn any prompt into ids the tiny encoders accept.
_WORDS = "a photo of the red fox in a snowy forest at sunset blue sky over a mountain lake portrait of an old cat"


def is_demo_model(folder: Path) -> bool:
    """True for a complete folder written by this module (by any version of it)."""
    return (folder / MARKER).is_file()


def _is_current(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / MARKER).read_text()).get("version") == VERSION)
    except (OSError, ValueError):
        return False


def ensure_demo_model(folder: Path) -> Path:
    """Build the demo model into `folder` once; later calls (from any process) reuse the complete folder.

    The build goes into a temporary sibling folder that is renamed into place when complete, so a crash or a
    concurrent builder never leaves a half-written model where a worker would load it.
    """
    folder = folder.resolve()
    if _is_current(folder):
        return folder
    if folder.exists() and not is_demo_model(folder):
        raise FileExistsError(f"{folder} exists but is not a flux-bot demo model; remove it or choose another")
    folder.parent.mkdir(parents=True, exist_ok=True)
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = folder.parent / f".{folder.name}.building-{unique}"
    outdated = folder.parent / f".{folder.name}.outdated-{unique}"
    try:
        _build_into(staging)
        if folder.exists() and not _is_current(folder):
            # Built by an older version: move it aside in one step (a concurrent builder may have done so).
            with contextlib.suppress(FileNotFoundError):
                folder.rename(outdated)
        try:
            staging.rename(folder)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not _is_current(folder):
                raise
        else:
            log.info("built the demo model in %s", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(outdated, ignore_errors=True)
    return folder


def build_demo_pipeline() -> Any:
    """The tiny FluxPipeline in memory (deterministic: fixed seed, the caller's RNG state untouched)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory(prefix="flux-bot-demo-") as scratch:
        clip_tokenizer = _clip_tokenizer(Path(scratch))
    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        transformer = FluxTransformer2DModel(  # type: ignore[no-untyped-call]
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        # Four blocks downsample 8x with 16 latent channels like FLUX.1's VAE: a 1024x1024 demo image then has
        # FLUX's 4,096 image tokens (about 2 s on a CPU) instead of a one-block VAE's 262,144 (which never
        # finishes), and previews use the real FLUX latent-to-RGB map.
        vae = AutoencoderKL(  # type: ignore[no-untyped-call]
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            # The real FLUX.1 VAE's constants, so the pipeline's latent scaling runs as it does in production.
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        )
    return FluxPipeline(  # type: ignore[no-untyped-call]
        scheduler=FlowMatchEulerDiscreteScheduler(),  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _build_into(staging: Path) -> None:
    pipeline = build_demo_pipeline()
    pipeline.save_pretrained(staging)
    marker = {"version": VERSION, "seed": SEED, "notice": DEMO_NOTICE}
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _clip_tokenizer(scratch: Path) -> Any:
    """A byte-level BPE CLIPTokenizer read from a vocab.json + merges.txt written here: letters, digits, 5 merges."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789"
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges = ["t h", "th e</w>", "o f</w>", "a n", "an d</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # FluxPipeline pads CLIP prompts to model_max_length: without 77 here it would pad to a huge default.
    return CLIPTokenizer.from_pretrained(scratch, model_max_length=77)


def _t5_tokenizer() -> Any:
    """A T5TokenizerFast around a `tokenizers` Unigram model trained here on a few words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Every supported transformers version has the fast T5 class; 5.x exports it only lazily, hidden from mypy.
    t5_tokenizer_class = importlib.import_module("transformers").T5TokenizerFast

    def blank(model: Any) -> Any:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        return tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    trained = blank(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=64, special_tokens=specials, unk_token="<unk>", show_progress=False)
    trained.train_from_iterator([_WORDS] * 4, trainer=trainer)
    # Training runs in parallel: scores differ in their last bits from run to run and so does the order of equal
    # scores. Rounded and sorted (special tokens first, keeping their ids), every build is byte-for-byte the same.
    scores = {piece: round(score, 6) for piece, score in json.loads(trained.to_str())["model"]["vocab"]}
    ordinary = sorted((piece for piece in scores if piece not in specials), key=lambda piece: (-scores[piece], piece))
    vocab = [(piece, scores[piece]) for piece in [*specials, *ordinary]]
    backend = blank(models.Unigram(vocab, specials.index("<unk>")))
    # T5 ends every sequence with </s> (id 1: the special tokens come first in the trained vocabulary).
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return t5_tokenizer_class(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
