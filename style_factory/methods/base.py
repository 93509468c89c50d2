"""The one interface every method implements. The shared loop (`style_factory/loop.py`, run by `style_factory/worker.py`)
owns everything else: data loading, latent caching, the denoising loss, the optimiser, checkpoints and resume; the
model family (`style_factory/families/`) owns what differs between base models. A method reaches the family through the
`Components` it is handed (`models.family`) or the `family` argument, never by importing a stage."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from pydantic import BaseModel, ConfigDict

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.families.base import Components, Family
from style_factory.train_job import TrainJob


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
        """Raise ValueError when the curated data cannot serve this method; every method learns from StyleRef."""
        if not (data.roles == "ref").any():
            raise ValueError(f"{self.name} needs at least one StyleRef image")

    def class_images(self, style: StyleConfig, cfg: TrainConfig) -> list[ClassImages]:
        """One generated prior set per concept, for methods whose prior comes from the base model; else none."""
        return []

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        """Set requires_grad on the models and return the optimiser's parameter groups."""
        raise NotImplementedError

    def trained_modules(self, models: Components, cfg: TrainConfig) -> list[str]:
        """Component names ("unet", "text_encoder", ...) whose weights change (saved in checkpoints)."""
        raise NotImplementedError

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        raise NotImplementedError

    def image_views(self, cfg: TrainConfig) -> list[tuple[str, ...]]:
        """The views of each image whose latents the loop caches, as ops of style_factory.loop.VIEW_OPS (() = as is).
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

    def first_round_settings(self, settings: dict) -> dict:
        """The part of a job's settings (TrainConfig.model_dump) that its rounds before the last depend on, which
        keys them (TrainJob.first_round_key). Default: all of them."""
        return settings

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        """The prompt that asks this method's model for `content` in the style."""
        raise NotImplementedError

    def prompts_around(self, caption: str, style: StyleConfig, count_tokens: Callable[[str], int]) -> list[str]:
        """Every prompt this method builds around a caption, as long as the text encoder sees it (`count_tokens`
        counts CLIP tokens): curation shortens captions until all of them fit. Default: the evaluation prompt, which
        names every concept, so it is the longest training prompt too."""
        return [self.eval_prompt(caption, style)]

    def export(self, pipe: DiffusionPipeline, models: Components, out_dir: Path, cfg: TrainConfig) -> None:
        """Write the trained model: `pipe` is the family's pipeline around `models`, which hold the trained weights.
        Default: a full diffusers folder."""
        pipe.save_pretrained(out_dir, safe_serialization=True)

    def prepare_reference(self, data: StyleData, cfg: TrainConfig, family: Family, base_model: str, out_dir: Path,
                          device: str) -> None:
        """Zero-shot methods (trains = False): write the model folder from the data and the base model."""
        raise NotImplementedError

    def load_for_sampling(self, family: Family, base_model: str, model_dir: str, device: str) -> DiffusionPipeline:
        """The sampling pipeline for an exported model. Default: the diffusers folder itself."""
        return family.load_pipeline(model_dir, device)
