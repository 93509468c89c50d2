"""The one interface every method implements. The loop in `pipeline/train.py` owns everything else:
data loading, latent caching, the denoising loss, the optimiser, checkpoints and resume."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pipeline.config import StyleConfig, TrainConfig
from pipeline.models import Components, load_pipeline

if TYPE_CHECKING:
    from pipeline.train import TrainJob


@dataclass
class StyleData:
    """A style's curated images as training tensors, with their role, concept and caption."""

    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    roles: np.ndarray  # "ref" | "aux" | "prior" (generated class images)
    concepts: np.ndarray
    captions: list[str]
    tokens: list[str]
    class_words: list[str]

    @classmethod
    def load(cls, path: Path, prior_dirs: Sequence[str] = ()) -> StyleData:
        """The curated table; each generated class-image folder i (pipeline/priors.py) adds concept i's "prior" rows."""
        table = pq.read_table(path).filter(pc.field("role") != "heldout").to_pydict()  # scored, never trained on
        images = [Image.open(io.BytesIO(b)) for b in table["image"]]
        for concept, folder in enumerate(map(Path, prior_dirs)):
            manifest = json.loads((folder / "manifest.json").read_text())
            images += [Image.open(folder / name) for name in manifest["files"]]
            for column, value in (("role", "prior"), ("concept", concept), ("caption", manifest["prompt"]),
                                  ("token", ""), ("class_word", "")):
                table[column] += [value] * len(manifest["files"])
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return cls(pixels=pixels, roles=np.asarray(table["role"]), concepts=np.asarray(table["concept"]),
                   captions=table["caption"], tokens=table["token"], class_words=table["class_word"])

    def indices(self, role: str, concept: int) -> np.ndarray:
        return np.flatnonzero((self.roles == role) & (self.concepts == concept))

    @property
    def num_concepts(self) -> int:
        return int(self.concepts.max()) + 1 if len(self.concepts) else 0


@dataclass
class Batch:
    """What one training step sees: rows of StyleData, their prompts, and per-sample loss weights."""

    rows: np.ndarray
    prompts: list[str]
    weights: torch.Tensor  # the loss is sum(weights * per-sample denoising loss)
    views: np.ndarray | None = None  # per row, an index into Method.image_views; None: the loop flips at random


@dataclass(frozen=True)
class ClassImages:
    """Images the base model generates from a class prompt, as a method's prior (DreamBooth)."""

    prompt: str
    count: int
    num_inference_steps: int
    guidance_scale: float


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    """Subclasses state what differs: what trains, which images and prompts a batch holds, extra losses."""

    name = ""
    Options: type[BaseModel] = NoOptions  # the method's own settings, under train.method_options.<name>
    trains = True  # False: zero-shot, no Ray Train run; `prepare_reference` writes the model folder instead

    def __init__(self, style: StyleConfig | None = None):
        self.style = style  # the style being trained; None where only eval_prompt or load_for_sampling is needed

    def options(self, cfg: TrainConfig) -> BaseModel:
        return self.Options.model_validate(cfg.method_options.get(self.name, {}))

    def check_data(self, data: StyleData, cfg: TrainConfig) -> None:
        """Raise ValueError when the curated data cannot serve this method."""

    def class_images(self, style: StyleConfig, cfg: TrainConfig) -> list[ClassImages]:
        """One generated prior set per concept, for methods whose prior comes from the base model; else none."""
        return []

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        """Set requires_grad on the models and return the optimiser's parameter groups."""
        raise NotImplementedError

    def trained_modules(self, cfg: TrainConfig) -> list[str]:
        """Names of the Components attributes whose weights change (saved in checkpoints)."""
        raise NotImplementedError

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        raise NotImplementedError

    def image_views(self, cfg: TrainConfig) -> list[tuple[str, ...]]:
        """The views of each image whose latents the loop caches, as ops of pipeline.train.VIEW_OPS (() = as is).
        Default: the image and its mirror image when random_flip is on; Batch.views indexes this list."""
        return [(), ("hflip",)] if cfg.random_flip else [()]

    def sample_timesteps(self, count: int, models: Components, generator: torch.Generator) -> torch.Tensor:
        num = models.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, num, (count,), generator=generator)

    def extra_losses(self, models: Components, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, models: Components) -> None:
        """Called after every optimiser step, e.g. to project weights back onto a constraint."""

    def rounds(self, job: TrainJob) -> Iterator[TrainJob]:
        """The training rounds of `job`, in order; each is trained and exported before the next is asked for.
        The last one is the model that is evaluated (it keeps `job`'s key and model_dir). Default: one round."""
        yield job

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        """The prompt that asks this method's model for `content` in the style."""
        raise NotImplementedError

    def export(self, pipe: StableDiffusionPipeline, out_dir: Path, cfg: TrainConfig) -> None:
        """Write the trained model (its components hold the trained weights). Default: a full diffusers folder."""
        pipe.save_pretrained(out_dir, safe_serialization=True)

    def prepare_reference(self, data: StyleData, cfg: TrainConfig, base_model: str, out_dir: Path,
                          device: str) -> None:
        """Zero-shot methods (trains = False): write the model folder from the data and the base model."""
        raise NotImplementedError

    def load_for_sampling(self, base_model: str, model_dir: str, device: str) -> StableDiffusionPipeline:
        """The sampling pipeline for an exported model. Default: the diffusers folder itself."""
        return load_pipeline(model_dir, device)
