"""Metric backbones: Inception (FID/KID features, Inception Score), CLIP (CLIP-T, style similarity), DINO (style
consistency) and CSD (the field's style similarity).

Real weights are used when they are on disk; nothing is ever downloaded. When they are
missing, the toy CLIP shipped in style_factory/assets/toy-clip (trained by the project on the toy
world, style_factory/pretrain.py) stands in for both, labelled "NOT REAL" in its name and announced
with a warning: its numbers tell models of the toy world apart and are only comparable to other
runs made with it, never to published FID/KID/CLIP scores.

Where weights are looked for with spec="auto" (only there: never in /tmp, clean-fid's own download folder, nor
anywhere else another local user can write, since loading the TorchScript Inception file runs its code):
  Inception: `inception-2015-12-05.pt` in `models_dir`, then ~/.cache/style-factory/.
  CLIP: `open_clip_vit_b_32.safetensors` in `models_dir`, then ~/.cache/style-factory/ (OpenAI
    ViT-B/32 weights in open_clip format), then the local Hugging Face cache entry of
    timm/vit_base_patch32_clip_224.openai (the file open_clip itself would download).
  DINO: `dino_vit_small_patch16_224.safetensors` in `models_dir`, then ~/.cache/style-factory/
    (timm's vit_small_patch16_224.dino), then the local Hugging Face cache entry of that model.
  CSD: `csd_vit_l14.safetensors` in `models_dir`, then ~/.cache/style-factory/. Nothing stands in for it: without
    it the CSD columns are NaN, labelled CSD_NOT_AVAILABLE.
  `make fetch-weights` (scripts/fetch_weights.py) downloads all four there, checked (CSD converted from the Hub's
  pickle to safetensors, so no run unpickles it).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn as nn
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from open_clip.model import _build_vision_tower  # the image tower of an open_clip config, no text tower
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from style_factory import toyworld
from style_factory.renderers import RENDERERS

INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
STYLE_FACTORY_CACHE_DIR = Path("~/.cache/style-factory").expanduser()

CLIP_FILE_NAME = "open_clip_vit_b_32.safetensors"
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_HF_FILE_NAME = "open_clip_model.safetensors"
# OpenAI's CLIP weights were trained with QuickGELU; a checkpoint file carries no such
# metadata, so the quickgelu variant is the default architecture. Checkpoints trained
# with plain GELU (most LAION ones) need an explicit "ViT-B-32:/path/to/file".
DEFAULT_CLIP_ARCH = "ViT-B-32-quickgelu"

NOT_REAL_WARNING = (
    "numbers from it are NOT comparable to published {metrics} scores, "
    "only to other runs made with the same stand-in."
)


@dataclass
class BackboneInfo:
    name: str  # e.g. "inception-2015-12-05" or "toy-clip CLIP (NOT REAL: trained on the toy world)"
    real: bool
    sha256: str | None  # of the weight file


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def batches(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


# ---------------------------------------------------------------------------------------
# The toy CLIP: trained by the project on the toy world (style_factory/pretrain.py)
# ---------------------------------------------------------------------------------------

TOY_CLIP_VISION = dict(image_size=64, patch_size=8, hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4)
TOY_CLIP_DIR_NAME = "toy-clip"
ATTRIBUTES: dict[str, tuple[str, ...]] = {  # what the linear heads read from the image embedding
    "kind": toyworld.KINDS,
    "color": tuple(toyworld.COLORS),
    "size": tuple(toyworld.SIZES),
    "background": tuple(toyworld.BACKGROUNDS),
    "look": tuple(RENDERERS),
}
def attribute_targets(scenes: list[toyworld.Scene], looks: list[str]) -> dict[str, torch.Tensor]:
    """Class indices per head; -100 (ignored by cross-entropy) for object attributes of two-object scenes."""
    targets = {}
    for name, classes in ATTRIBUTES.items():
        values = []
        for scene, look in zip(scenes, looks):
            if name == "look":
                values.append(classes.index(look))
            elif name == "background":
                values.append(classes.index(scene.background))
            elif len(scene.objects) == 1:
                values.append(classes.index(getattr(scene.objects[0], name)))
            else:
                values.append(-100)
        targets[name] = torch.tensor(values)
    return targets


class ToyClip(nn.Module):
    """A transformers CLIPModel plus linear attribute heads on its image embedding.

    Stored without its text tower, which is tiny-pretrained's text encoder (loaded from there): one copy.
    Images go in as uint8 (N, 64, 64, 3) tensors or PIL images; `encode_image`/`encode_text` give the
    open_clip interface that ClipBackbone uses.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip
        dim = clip.config.projection_dim
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(classes)) for name, classes in ATTRIBUTES.items()})

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1]."""
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return self.normalise(torch.from_numpy(np.asarray(image).copy())[None])[0]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixels).pooler_output  # the projected embedding

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids).pooler_output

    def attribute_loss(self, image_embeds: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(self.heads[name](image_embeds), targets[name]) for name in ATTRIBUTES)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = self.encode_image(self.normalise(images.to(next(self.parameters()).device)))
        return {name: head(embeds).argmax(dim=1) for name, head in self.heads.items()}

    def text_encoder(self) -> CLIPTextModel:
        """The text tower as a standalone CLIPTextModel, the diffusion model's text encoder."""
        text_encoder = CLIPTextModel(self.clip.config.text_config)
        text_encoder.load_state_dict(self.clip.text_model.state_dict())
        return text_encoder.eval()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.clip.config.to_json_file(folder / "config.json")
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("clip.text_model.")}
        save_file(state, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path, text_encoder_folder: Path) -> ToyClip:
        toy = cls(CLIPModel(CLIPConfig.from_json_file(folder / "config.json")))
        missing, unexpected = toy.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if unexpected or any(not k.startswith("clip.text_model.") for k in missing):
            raise ValueError(f"{folder / 'model.safetensors'} does not match its config.json")
        text_encoder = CLIPTextModel.from_pretrained(text_encoder_folder, use_safetensors=True)
        toy.clip.text_model.load_state_dict(text_encoder.state_dict())
        return toy.eval()


class ToyClipImageFeatures(nn.Module):
    """The toy CLIP's image embedding in the Inception slot: input float in [0, 255], NCHW."""

    def __init__(self, toy: ToyClip):
        super().__init__()
        self.toy = toy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.toy.encode_image(x / 127.5 - 1)


def toy_clip_model() -> ToyClip:
    from style_factory.models import ASSETS_DIR, TINY_PRETRAINED_DIR_NAME  # models imports diffusers: only when needed

    folder = ASSETS_DIR / TOY_CLIP_DIR_NAME
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"the toy backbone is missing: {folder}; run scripts/train_tiny_pretrained.py")
    return ToyClip.load(folder, ASSETS_DIR / TINY_PRETRAINED_DIR_NAME / "text_encoder")


def toy_info(kind: str) -> BackboneInfo:
    from style_factory.models import ASSETS_DIR

    weight_file = ASSETS_DIR / TOY_CLIP_DIR_NAME / "model.safetensors"
    return BackboneInfo(name=f"toy-clip {kind} (NOT REAL: trained on the toy world)", real=False,
                        sha256=sha256_of_file(weight_file))


# ---------------------------------------------------------------------------------------
# Inception (FID / KID)
# ---------------------------------------------------------------------------------------


class FeatureExtractor:
    """Images -> feature rows through clean-fid's resizer and a model taking float NCHW in [0, 255].

    `class_weight` (classes, feature dims): the Inception network's output layer, without its bias as the original
    Inception Score applies it, so the class logits of an image are `features @ class_weight.T`; None for a network
    without ImageNet classes (the toy one, DINO).
    """

    def __init__(self, model: nn.Module, image_size: int, info: BackboneInfo, device: str,
                 class_weight: np.ndarray | None = None):
        self.model = model.to(device).eval()
        # clean-fid's "clean" mode resizer: PIL bicubic on float32 channels, no quantisation
        self.resize = make_resizer("PIL", False, "bicubic", (image_size, image_size))
        self.info = info
        self.device = device
        self.class_weight = class_weight

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


def find_in_folders(file_name: str, models_dir: str | None) -> Path | None:
    """`file_name` in models_dir, then in ~/.cache/style-factory (where scripts/fetch_weights.py puts it)."""
    for folder in ([Path(models_dir)] if models_dir else []) + [STYLE_FACTORY_CACHE_DIR]:
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def clip_arch(spec: str) -> str:
    """The open_clip architecture of a CLIP spec "[ARCH:]path"."""
    arch, separator, _ = spec.partition(":")
    return arch if separator else DEFAULT_CLIP_ARCH


def named_weight_file(kind: str, spec: str) -> Path:
    """The weight file that an explicit spec (neither "auto" nor "toy", nor "off") of backbone `kind` ("inception",
    "clip", "dino", "csd") names: FileNotFoundError when it is not there, ValueError when InceptionV3W could not open
    it or it is not CSD's safetensors. The driver checks every one of them before any compute
    (style_factory.hub.resolve_models)."""
    path = spec.partition(":")[2] if kind == "clip" and ":" in spec else spec
    weight_file = Path(path).expanduser()
    if kind == "inception" and weight_file.is_dir():
        weight_file = weight_file / INCEPTION_FILE_NAME
    if not weight_file.is_file():
        raise FileNotFoundError(f"{kind} weights not found: {weight_file}")
    if kind == "csd" and weight_file.suffix != ".safetensors":
        raise ValueError(f"CSD weights must be the safetensors file `make fetch-weights` converts the Hub's "
                         f"{CSD_HF_FILE_NAME} into ({CSD_FILE_NAME}), got {weight_file}")
    if kind == "inception" and weight_file.name != INCEPTION_FILE_NAME:
        # InceptionV3W only takes a folder and always opens this exact file name in it
        raise ValueError(f"Inception weight file must be named {INCEPTION_FILE_NAME}, got {weight_file}")
    return weight_file


def find_inception_file(models_dir: str | None) -> Path | None:
    return find_in_folders(INCEPTION_FILE_NAME, models_dir)


def real_inception(weight_file: Path, device: str) -> FeatureExtractor:
    model = InceptionV3W(str(weight_file.parent), download=False, resize_inside=False)
    info = BackboneInfo(name="inception-2015-12-05", real=True, sha256=sha256_of_file(weight_file))
    # clean-fid's features are the TorchScript network's `layers`; its `output` layer (2048 -> 1008 classes) gives
    # the Inception Score's logits, bias left out as its `no_output_bias` does (the original IS code's matmul)
    class_weight = model.base.output.weight.detach().cpu().numpy().astype(np.float64)
    return FeatureExtractor(model, image_size=299, info=info, device=device, class_weight=class_weight)


def toy_inception(device: str) -> FeatureExtractor:
    toy = toy_clip_model()
    return FeatureExtractor(ToyClipImageFeatures(toy), image_size=toy.clip.config.vision_config.image_size,
                             info=toy_info("image embedding"), device=device)


def load_inception(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """spec: "auto" (search, else toy), "toy", or a path to inception-2015-12-05.pt or its folder."""
    weight_file = real_weight_file("inception", spec, models_dir)
    return toy_inception(device) if weight_file is None else real_inception(weight_file, device)


# ---------------------------------------------------------------------------------------
# CLIP (CLIP-T text alignment, style similarity)
# ---------------------------------------------------------------------------------------


def unit_rows_float64(features: torch.Tensor) -> np.ndarray:
    features = features.cpu().numpy().astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


class ImageEmbedder:
    """Images -> unit-norm embedding rows through a model's `encode_image` and its own preprocessing."""

    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], info: BackboneInfo,
                 device: str):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.info = info
        self.device = device

    def embed_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        features = []
        with torch.inference_mode():
            for batch in batches(images, batch_size):
                pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch]).to(self.device)
                features.append(unit_rows_float64(self.model.encode_image(pixels)))
        return np.concatenate(features)


class ClipBackbone(ImageEmbedder):
    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], info: BackboneInfo, device: str):
        super().__init__(model, preprocess, info, device)
        self.tokenizer = tokenizer

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            return unit_rows_float64(self.model.encode_text(tokens))


def find_clip_file(models_dir: str | None) -> Path | None:
    if found := find_in_folders(CLIP_FILE_NAME, models_dir):
        return found
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


def toy_clip(device: str) -> ClipBackbone:
    from style_factory.families.base import clip_tokenizer

    toy, tokenizer = toy_clip_model(), clip_tokenizer()

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    return ClipBackbone(toy, toy.preprocess, tokenize, toy_info("CLIP"), device)


def load_clip(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> ClipBackbone:
    """spec: "auto" (search, else toy), "toy", or an open_clip checkpoint as "path" or "ARCH:path"
    (e.g. "ViT-B-32:/models/clip.safetensors"); the default ARCH is ViT-B-32-quickgelu (OpenAI weights)."""
    weight_file = real_weight_file("clip", spec, models_dir)
    return toy_clip(device) if weight_file is None else real_clip(clip_arch(spec), weight_file, device)


# ---------------------------------------------------------------------------------------
# DINO (style consistency within a generated set, as StyleAligned reports it)
# ---------------------------------------------------------------------------------------

DINO_ARCH = "vit_small_patch16_224.dino"
DINO_FILE_NAME = "dino_vit_small_patch16_224.safetensors"
DINO_HF_REPO = "timm/vit_small_patch16_224.dino"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetNormalised(nn.Module):
    """A timm image model taking FeatureExtractor's float NCHW in [0, 255]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def find_dino_file(models_dir: str | None) -> Path | None:
    if found := find_in_folders(DINO_FILE_NAME, models_dir):
        return found
    cached = try_to_load_from_cache(DINO_HF_REPO, "model.safetensors")  # local lookup only
    return Path(cached) if isinstance(cached, str) else None


def real_dino(weight_file: Path, device: str) -> FeatureExtractor:
    model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0)  # num_classes=0: the CLS embedding
    model.load_state_dict(load_file(str(weight_file)))
    info = BackboneInfo(name=f"timm {DINO_ARCH}", real=True, sha256=sha256_of_file(weight_file))
    return FeatureExtractor(ImageNetNormalised(model), image_size=224, info=info, device=device)


def load_dino(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """spec: "auto" (search, else the toy CLIP's image embedding), "toy", or a path to timm's
    vit_small_patch16_224.dino weights (safetensors)."""
    weight_file = real_weight_file("dino", spec, models_dir)
    return toy_inception(device) if weight_file is None else real_dino(weight_file, device)


# ---------------------------------------------------------------------------------------
# CSD (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models"): the field's style similarity
# ---------------------------------------------------------------------------------------

CSD_ARCH = "ViT-L-14-quickgelu"  # CSD fine-tunes OpenAI's CLIP ViT-L/14 image tower, which uses QuickGELU
CSD_FILE_NAME = "csd_vit_l14.safetensors"  # its weights as `make fetch-weights` converts them from the Hub's pickle
CSD_HF_REPO, CSD_HF_FILE_NAME = "tomg-group-umd/CSD-ViT-L", "pytorch_model.bin"
CSD_HF_REVISION = "5bc26a6fb0487f3f00a2a7313135103a005b1b67"  # pinned: the authors say they may replace the weights
CSD_HF_SHA256 = "40e92fad63a361b8136100cd234c42d401ef9b34ff1748234318929ebcc7e7a1"  # 2,438,228,893 bytes
CSD_NOT_AVAILABLE = "CSD: not available (no weights: make fetch-weights)"
CSD_HEADS = ("last_layer_style", "last_layer_content")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class Csd(nn.Module):
    """CSD's checkpoint layout on open_clip's image tower.

    `backbone`: CLIP ViT-L/14's image tower without its projection (`proj` is None): the pooled 1024-d feature.
    `last_layer_style`, `last_layer_content`: (1024, 768) matrices, CLIP's projection fine-tuned into two heads. The
    style embedding, the one CSD's similarity is the cosine of, is `feature @ last_layer_style`, L2-normalised
    (`encode_image` gives it, ImageEmbedder normalises it). `width`, `layers`, `embed_dim`: ViT-L/14's by default;
    `from_state_dict` builds the size a checkpoint has.
    """

    def __init__(self, width: int | None = None, layers: int | None = None, embed_dim: int | None = None):
        super().__init__()
        config = open_clip.get_model_config(CSD_ARCH)
        vision = {**config["vision_cfg"], **{k: v for k, v in (("width", width), ("layers", layers)) if v}}
        embed_dim = embed_dim or config["embed_dim"]
        self.backbone = _build_vision_tower(embed_dim, vision, quick_gelu=config["quick_gelu"])
        self.backbone.proj = None
        for head in CSD_HEADS:
            self.register_parameter(head, nn.Parameter(vision["width"] ** -0.5 * torch.randn(vision["width"],
                                                                                              embed_dim)))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Csd:
        """The model a state dict in Csd's names describes, with its weights: any key or shape that is not CSD's
        layout is an error."""
        width, embed_dim = state["last_layer_style"].shape
        layers = len({k.split(".")[3] for k in state if k.startswith("backbone.transformer.resblocks.")})
        with torch.device("meta"):  # no random init of 300M parameters that the checkpoint replaces
            model = cls(width, layers, embed_dim)
        model.load_state_dict(state, assign=True)
        return model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels) @ self.last_layer_style


def csd_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights of CSD's released checkpoint in Csd's names, contiguous float32: what CSD_FILE_NAME holds. The
    checkpoint is the training script's: {"model_state_dict": {"module.backbone.…", "module.last_layer_style",
    "module.last_layer_content"} (saved from DistributedDataParallel), the optimisers' states, "iter", "args"}."""
    state = checkpoint.get("model_state_dict", checkpoint)
    return {name.removeprefix("module."): weight.float().contiguous() for name, weight in state.items()}


def real_csd(weight_file: Path, device: str) -> ImageEmbedder:
    model = Csd.from_state_dict(load_file(str(weight_file)))
    # CSD's own preprocessing: bicubic resize of the short side to 224, centre crop, CLIP's mean and std
    preprocess = open_clip.image_transform(model.backbone.image_size[0], is_train=False, mean=CLIP_MEAN,
                                           std=CLIP_STD)
    info = BackboneInfo(name=f"CSD ViT-L/14 style head ({weight_file.name})", real=True,
                        sha256=sha256_of_file(weight_file))
    return ImageEmbedder(model, preprocess, info, device)


def load_csd(spec: str = "auto", models_dir: str | None = None, device: str = "cpu") -> ImageEmbedder | None:
    """spec: "auto" (csd_vit_l14.safetensors if found), "off", or a path to that file. None: no CSD; its columns are
    NaN and its backbone is CSD_NOT_AVAILABLE. Nothing stands in for it: the toy backbone is no style descriptor."""
    weight_file = real_weight_file("csd", spec, models_dir)
    return None if weight_file is None else real_csd(weight_file, device)


# Each backbone's weight file, and what stands in for it without one: the toy model and the metrics it affects.
STAND_INS = {"inception": (INCEPTION_FILE_NAME, "the toy CLIP's image embedding", "FID/KID"),
             "clip": (CLIP_FILE_NAME, "the toy CLIP", "CLIP"),
             "dino": (DINO_FILE_NAME, "the toy CLIP's image embedding", "DINO")}


def real_weight_file(kind: str, spec: str, models_dir: str | None) -> Path | None:
    """The real weight file backbone `kind` loads for `spec`: the named file, or for "auto" the one found in
    models_dir, ~/.cache/style-factory or the Hugging Face cache; None when the toy stands in, with a warning
    that its numbers compare only to other runs made with it. CSD: None when it is "off", or not found (warned)."""
    if kind == "csd" and spec in ("auto", "off"):  # no stand-in: without its weights CSD is not scored
        found = find_in_folders(CSD_FILE_NAME, models_dir) if spec == "auto" else None
        if spec == "auto" and found is None:
            warnings.warn(f"NO CSD WEIGHTS: {CSD_FILE_NAME} is not in models_dir={models_dir} or "
                          f"{STYLE_FACTORY_CACHE_DIR}: style_sim_csd is NaN ({CSD_NOT_AVAILABLE!r}).")
        return found
    if spec not in ("auto", "toy"):
        return named_weight_file(kind, spec)
    file_name, stand_in, metrics = STAND_INS[kind]
    if spec == "toy":
        warnings.warn(f"Using {stand_in} for {metrics}: " + NOT_REAL_WARNING.format(metrics=metrics))
        return None
    finder = {"inception": find_inception_file, "clip": find_clip_file, "dino": find_dino_file}[kind]
    if (found := finder(models_dir)) is not None:
        return found
    warnings.warn(f"NO REAL {kind.upper()} WEIGHTS: {file_name} is not in models_dir={models_dir}, "
                  f"{STYLE_FACTORY_CACHE_DIR} or the Hugging Face cache. Using {stand_in}; " + NOT_REAL_WARNING.format(metrics=metrics))
    return None
