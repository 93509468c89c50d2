"""Base models: a hub id or a local diffusers folder (real use), or the offline `tiny` preset.

The tiny preset is a Stable-Diffusion-shaped pipeline (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel with the real CLIP tokenizer) built from small configs with a fixed seed, so every
stage treats it exactly like SD1.5. It is written once as a diffusers folder and loaded from there,
so all Ray workers see bitwise the same weights.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.files import sha256_of

TINY = "tiny"
TINY_VERSION = "tiny-v2"  # bump when the tiny configs change: cached folders are keyed by it
TINY_PRETRAINED = "tiny-pretrained"
TINY_PRETRAINED_DIR_NAME = "tiny-pretrained"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped weights (scripts/train_tiny_pretrained.py)
CLIP_VOCAB_SIZE = 49408
# SD1.x noise schedule, shared by the tiny preset so methods see the same timestep statistics.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def clip_tokenizer_files(out_dir: Path) -> Path:
    """Write CLIP's vocab.json and merges.txt from the BPE file bundled with open_clip (no network)."""
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


# The tiny architecture, shared by the random `tiny` preset and the trained `tiny-pretrained` model:
# 64 px images, 4x16x16 latents, attention at 8x8 and 4x4 (at 16x16 it would cost most of the step).
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), norm_num_groups=16,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=32, norm_num_groups=16,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer, built from the BPE file bundled with open_clip."""
    with tempfile.TemporaryDirectory() as tmp:
        files = clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"),
                             pad_token="<|endoftext|>", model_max_length=77)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The offline `tiny` preset: the tiny architecture with random weights from a fixed seed."""
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)),
        tokenizer=clip_tokenizer(), unet=UNet2DConditionModel(**TINY_UNET),
        scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def resolve_base_model(base: str, cache_dir: str | Path) -> str:
    """What `from_pretrained` should load: the tiny preset's folder (written once), the shipped tiny-pretrained
    folder, a local folder or a hub id."""
    if base == TINY_PRETRAINED:
        return str(ASSETS_DIR / TINY_PRETRAINED_DIR_NAME)
    if base != TINY:
        return base
    folder = Path(cache_dir) / TINY_VERSION
    if not (folder / "model_index.json").is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, folder)  # atomic: concurrent writers race harmlessly, the loser's copy is dropped
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder.resolve())


def base_model_identity(source: str) -> str:
    """What stage keys record of a base model: a hub id as given; a local folder with the names, sizes and
    modification times of its files, so that retrained weights (say a new tiny-pretrained) are never
    mistaken for the old ones. Metadata only: hashing a 4 GB folder on every plan would cost seconds."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sha256_of(source, [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


@dataclass
class Components:
    """The parts of a latent diffusion model that training touches."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str


def load_components(source: str) -> Components:
    """Load from a local diffusers folder or a hub id (hub ids need the weights in the local HF cache offline)."""
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            source=source,
        )
    except OSError as err:
        raise OSError(f"cannot load base model {source!r}: give a local diffusers folder, or a hub id whose "
                      f"weights (safetensors) are in the local Hugging Face cache. ({err})") from err


def load_pipeline(source: str, device: str = "cpu") -> StableDiffusionPipeline:
    """A sampling pipeline with the DDIM scheduler, for any saved model folder or hub id."""
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
