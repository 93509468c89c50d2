"""Metric backbones: Inception (FID/KID features) and CLIP (CLIP-T, style similarity).

Real weights are used when they are on disk; nothing is ever downloaded. When they are
missing, a tiny random-init stand-in is built instead, labelled "NOT REAL" in its name
and announced with a warning: its numbers are only good for comparing runs made with
the same stand-in, never for comparing with published FID/KID/CLIP scores.

Where weights are looked for with spec="auto":
  Inception: `inception-2015-12-05.pt` in `models_dir`, then /tmp (where clean-fid itself
    downloads it), then ~/.cache/style-factory/.
  CLIP: `open_clip_vit_b_32.safetensors` in `models_dir` (OpenAI ViT-B/32 weights in
    open_clip format), then the local Hugging Face cache entry of
    timm/vit_base_patch32_clip_224.openai (the file open_clip itself would download).
"""

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from huggingface_hub import try_to_load_from_cache
from PIL import Image

INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
CLEANFID_INCEPTION_DIR = Path("/tmp")  # clean-fid's own hard-coded download folder
STYLE_FACTORY_CACHE_DIR = Path("~/.cache/style-factory").expanduser()

CLIP_FILE_NAME = "open_clip_vit_b_32.safetensors"
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_HF_FILE_NAME = "open_clip_model.safetensors"
# OpenAI's CLIP weights were trained with QuickGELU; a checkpoint file carries no such
# metadata, so the quickgelu variant is the default architecture. Checkpoints trained
# with plain GELU (most LAION ones) need an explicit "ViT-B-32:/path/to/file".
DEFAULT_CLIP_ARCH = "ViT-B-32-quickgelu"

TINY_SEED = 0
TINY_INCEPTION_IMAGE_SIZE = 64
# 64-d so that the feature covariance is full rank with the ~100-300 images per set we score.
TINY_INCEPTION_DIM = 64
TINY_CLIP_CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=64, patch_size=16, width=64, head_width=32, layers=2),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
NOT_REAL_WARNING = (
    "numbers from it are NOT comparable to published {metrics} scores, "
    "only to other runs made with the same stand-in."
)


@dataclass
class BackboneInfo:
    name: str  # e.g. "inception-2015-12-05" or "tiny-random-inception (NOT REAL: offline stand-in)"
    real: bool
    sha256: str | None  # of the weight file when real


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def batches(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def build_with_fixed_seed(build: Callable[[], nn.Module], seed: int = TINY_SEED) -> nn.Module:
    """Random init under a fixed seed, leaving the caller's global torch RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---------------------------------------------------------------------------------------
# Inception (FID / KID)
# ---------------------------------------------------------------------------------------


class TinyInception(nn.Module):
    """A few strided convs + global average pooling; input float in [0, 255], NCHW."""

    def __init__(self, feature_dim: int = TINY_INCEPTION_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, stride=2, padding=1),  # 64 -> 32
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),  # 32 -> 16
            nn.ReLU(),
            nn.Conv2d(64, feature_dim, kernel_size=3, stride=2, padding=1),  # 16 -> 8
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # He init keeps activations O(1) through the ReLUs (PyTorch's default shrinks them
        # layer by layer), so features have roughly Inception's scale and KID's cubic
        # kernel (x.y/d + 1)^3 does not flatten to a constant.
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 128) / 128)  # same input scaling as clean-fid's InceptionV3W


class InceptionBackbone:
    def __init__(self, model: nn.Module, image_size: int, info: BackboneInfo, device: str):
        self.model = model.to(device).eval()
        # clean-fid's "clean" mode resizer: PIL bicubic on float32 channels, no quantisation
        self.resize = make_resizer("PIL", False, "bicubic", (image_size, image_size))
        self.info = info
        self.device = device

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        resized = self.resize(np.array(image.convert("RGB")))  # HWC float32 in [0, 255]
        return torch.from_numpy(resized).permute(2, 0, 1)

    def embed(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        features = []
        with torch.inference_mode():
            for batch in batches(images, batch_size):
                pixels = torch.stack([self.to_tensor(image) for image in batch]).to(self.device)
                features.append(self.model(pixels).cpu().numpy().astype(np.float64))
        return np.concatenate(features)


def find_inception_file(models_dir: str | None) -> Path | None:
    search_dirs = [Path(models_dir)] if models_dir else []
    search_dirs += [CLEANFID_INCEPTION_DIR, STYLE_FACTORY_CACHE_DIR]
    for folder in search_dirs:
        if (folder / INCEPTION_FILE_NAME).is_file():
            return folder / INCEPTION_FILE_NAME
    return None


def real_inception(weight_file: Path, device: str) -> InceptionBackbone:
    model = InceptionV3W(str(weight_file.parent), download=False, resize_inside=False)
    info = BackboneInfo(name="inception-2015-12-05", real=True, sha256=sha256_of_file(weight_file))
    return InceptionBackbone(model, image_size=299, info=info, device=device)


def tiny_inception(device: str) -> InceptionBackbone:
    model = build_with_fixed_seed(TinyInception)
    info = BackboneInfo(name="tiny-random-inception (NOT REAL: offline stand-in)", real=False, sha256=None)
    return InceptionBackbone(model, image_size=TINY_INCEPTION_IMAGE_SIZE, info=info, device=device)


def load_inception(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> InceptionBackbone:
    """spec: "auto" (search, else tiny), "tiny", or a path to inception-2015-12-05.pt or its folder."""
    if spec == "tiny":
        warnings.warn("Using the tiny random-init Inception stand-in: " + NOT_REAL_WARNING.format(metrics="FID/KID"))
        return tiny_inception(device)
    if spec == "auto":
        weight_file = find_inception_file(models_dir)
        if weight_file is None:
            warnings.warn(
                f"NO REAL INCEPTION WEIGHTS: {INCEPTION_FILE_NAME} not found in models_dir={models_dir}, "
                f"{CLEANFID_INCEPTION_DIR} or {STYLE_FACTORY_CACHE_DIR}. Using a tiny random-init stand-in; "
                + NOT_REAL_WARNING.format(metrics="FID/KID")
            )
            return tiny_inception(device)
        return real_inception(weight_file, device)

    weight_file = Path(spec).expanduser()
    if weight_file.is_dir():
        weight_file = weight_file / INCEPTION_FILE_NAME
    if not weight_file.is_file():
        raise FileNotFoundError(f"Inception weights not found: {weight_file}")
    if weight_file.name != INCEPTION_FILE_NAME:
        # InceptionV3W only takes a folder and always opens this exact file name in it
        raise ValueError(f"Inception weight file must be named {INCEPTION_FILE_NAME}, got {weight_file}")
    return real_inception(weight_file, device)


# ---------------------------------------------------------------------------------------
# CLIP (CLIP-T text alignment, style similarity)
# ---------------------------------------------------------------------------------------


def unit_rows_float64(features: torch.Tensor) -> np.ndarray:
    features = features.cpu().numpy().astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


class ClipBackbone:
    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        info: BackboneInfo,
        device: str,
    ):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device

    def embed_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        features = []
        with torch.inference_mode():
            for batch in batches(images, batch_size):
                pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch]).to(self.device)
                features.append(unit_rows_float64(self.model.encode_image(pixels)))
        return np.concatenate(features)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            return unit_rows_float64(self.model.encode_text(tokens))


def find_clip_file(models_dir: str | None) -> Path | None:
    if models_dir and (Path(models_dir) / CLIP_FILE_NAME).is_file():
        return Path(models_dir) / CLIP_FILE_NAME
    cached = try_to_load_from_cache(CLIP_HF_REPO, CLIP_HF_FILE_NAME)  # local lookup only, never downloads
    if isinstance(cached, str):  # None or a "known missing" sentinel otherwise
        return Path(cached)
    return None


def real_clip(arch: str, weight_file: Path, device: str) -> ClipBackbone:
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(weight_file), device=device, weights_only=True
    )
    info = BackboneInfo(name=f"open_clip {arch} ({weight_file.name})", real=True, sha256=sha256_of_file(weight_file))
    return ClipBackbone(model, preprocess, open_clip.get_tokenizer(arch), info, device)


def tiny_clip(device: str) -> ClipBackbone:
    model = build_with_fixed_seed(lambda: open_clip.CLIP(**TINY_CLIP_CONFIG))
    preprocess = open_clip.image_transform(TINY_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the real CLIP BPE tokenizer, context 77
    info = BackboneInfo(name="tiny-random-clip (NOT REAL: offline stand-in)", real=False, sha256=None)
    return ClipBackbone(model, preprocess, tokenizer, info, device)


def load_clip(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> ClipBackbone:
    """spec: "auto" (search, else tiny), "tiny", or an open_clip checkpoint as "path" or "ARCH:path"
    (e.g. "ViT-B-32:/models/clip.safetensors"); the default ARCH is ViT-B-32-quickgelu (OpenAI weights)."""
    if spec == "tiny":
        warnings.warn("Using the tiny random-init CLIP stand-in: " + NOT_REAL_WARNING.format(metrics="CLIP"))
        return tiny_clip(device)
    if spec == "auto":
        weight_file = find_clip_file(models_dir)
        if weight_file is None:
            warnings.warn(
                f"NO REAL CLIP WEIGHTS: {CLIP_FILE_NAME} not found in models_dir={models_dir} and "
                f"{CLIP_HF_REPO} is not in the Hugging Face cache. Using a tiny random-init stand-in; "
                + NOT_REAL_WARNING.format(metrics="CLIP")
            )
            return tiny_clip(device)
        return real_clip(DEFAULT_CLIP_ARCH, weight_file, device)

    arch, separator, path = spec.partition(":")
    if not separator:
        arch, path = DEFAULT_CLIP_ARCH, spec
    weight_file = Path(path).expanduser()
    if not weight_file.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {weight_file}")
    return real_clip(arch, weight_file, device)
