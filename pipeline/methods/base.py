"""The one interface every method implements. The loop in `pipeline/train.py` owns everything else:
data loading, latent caching, the denoising loss, the optimiser, checkpoints and resume."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pipeline.config import StyleConfig, TrainConfig
from pipeline.models import Components, load_pipeline


@dataclass
class StyleData:
    """A style's curated images as training tensors, with their role, concept and caption."""

    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    roles: np.ndarray  # "ref" | "aux"
    concepts: np.ndarray
    captions: list[str]
    tokens: list[str]
    class_words: list[str]

    @classmethod
    def load(cls, path: Path) -> StyleData:
        table = pq.read_table(path).to_pydict()
        arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in table["image"]]
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


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    """Subclasses state what differs: what trains, which images and prompts a batch holds, extra losses."""

    name = ""
    Options: type[BaseModel] = NoOptions  # the method's own settings, under train.method_options.<name>

    def options(self, cfg: TrainConfig) -> BaseModel:
        return self.Options.model_validate(cfg.method_options.get(self.name, {}))

    def check_data(self, data: StyleData, cfg: TrainConfig) -> None:
        """Raise ValueError when the curated data cannot serve this method."""

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        """Set requires_grad on the models and return the optimiser's parameter groups."""
        raise NotImplementedError

    def trained_modules(self, cfg: TrainConfig) -> list[str]:
        """Names of the Components attributes whose weights change (saved in checkpoints)."""
        raise NotImplementedError

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        raise NotImplementedError

    def sample_timesteps(self, count: int, models: Components, generator: torch.Generator) -> torch.Tensor:
        num = models.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, num, (count,), generator=generator)

    def extra_losses(self, models: Components, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        """The prompt that asks this method's model for `content` in the style."""
        raise NotImplementedError

    def export(self, pipe: StableDiffusionPipeline, out_dir: Path, cfg: TrainConfig) -> None:
        """Write the trained model (its components hold the trained weights). Default: a full diffusers folder."""
        pipe.save_pretrained(out_dir, safe_serialization=True)

    def load_for_sampling(self, base_model: str, model_dir: str, device: str) -> StableDiffusionPipeline:
        """The sampling pipeline for an exported model. Default: the diffusers folder itself."""
        return load_pipeline(model_dir, device)
