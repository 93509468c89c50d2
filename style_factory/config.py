"""Typed configuration: one schema for a run (`run.yaml`), one for a style (`styles/<name>/style.yaml`).

Everything is validated here, before any compute starts; a bad value raises `ConfigError`
naming the file, the field and what was expected (quoting at most MAX_EXCERPT characters of it). Files are read
within bounds (MAX_YAML_BYTES, MAX_YAML_NODES, MAX_YAML_DEPTH), so that a hostile one fails at once. This module
imports nothing of the project's: the names of methods and families are checked against a `Registry` the caller
hands in (style_factory/run.py's `REGISTRY`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TOKEN = re.compile(r"^[A-Za-z0-9<>_-]{2,32}$")
# Bounds on a config file, which holds a few hundred values in a few KiB: a larger file is refused before it is
# parsed, and a document of more values once its aliases are expanded (a "billion laughs" alias bomb), or nested
# deeper, while it is parsed, before anything (validation, an error message) walks the expansion.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
MAX_EXCERPT = 80  # characters of a value an error message quotes
MAX_PROBLEMS = 20  # problems listed in one ConfigError; the rest are counted
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # train.report_to -> its package
# train fields that change what a run shows while it works, not what it trains: left out of a job's key
WATCH_FIELDS = frozenset({"report_to", "validation_every", "validation_prompts"})
# train fields a sweep cannot vary: the job's seed (train.seeds varies it), nested sections, and the watch fields
UNSWEPT_FIELDS = frozenset({"seed", "seeds", "method_options", "per_method", "export"}) | WATCH_FIELDS
OPTION_PREFIX = "method_options."  # a sweep key naming one of the method's own options: method_options.rank


@dataclass(frozen=True)
class Registry:
    """The names a config may use: methods (name -> class with `trains` and an `Options` schema) and families."""

    methods: Mapping[str, Any]
    families: Collection[str]


@dataclass(frozen=True)
class ConfigPath:
    """Marks a method option that names a file (`Annotated[str | None, ConfigPath()]`): a relative value is read
    against the folder of the config file that sets it (the run config, or a style.yaml's `train` section), as the
    run's own paths are. `spec`: the value is "auto" | "toy" | [ARCH:]path, as evaluate.clip. `lines_into`: the file
    lists names, one a line (blank lines and lines starting with '#' skipped); it is read when the config loads and
    its names become that option, so what it lists is in the job's key and model card. `model`: a hub id or a
    folder; only a local one (absolute, or starting with ".") is resolved, and style_factory/hub.py finds either."""
    spec: bool = False
    lines_into: str | None = None
    model: bool = False


def _registry(info: ValidationInfo) -> Registry | None:
    """The registry this validation was handed; None (names unchecked) for configs built in code."""
    return (info.context or {}).get("registry")


def _excerpt(value: Any) -> str:
    """`value`'s repr, cut to MAX_EXCERPT characters: a message quotes a value, never a whole document."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_EXCERPT else text[: MAX_EXCERPT - 3] + "..."


def _known_method(name: str, info: ValidationInfo) -> str:
    registry = _registry(info)
    if registry is not None and name not in registry.methods:
        raise ValueError(f"unknown method {_excerpt(name)}; expected one of {sorted(registry.methods)}")
    return name


def _style_method(name: str, info: ValidationInfo) -> str:
    """A method a style can train: registered, and not the content adapter, which only a subject trains."""
    if _known_method(name, info) == SUBJECT_METHOD:
        raise ValueError(f"{SUBJECT_METHOD!r} trains a subject's content adapter, not a style: put the subject in "
                         "subjects_dir and name it in evaluate.compose")
    return name


class ConfigError(ValueError):
    """A configuration problem, phrased as `<file>: <field>: <problem>`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    # "tiny-pretrained" (shipped, trained on the toy world), "tiny" / "tiny-sd2" / "tiny-sdxl" (a family's
    # architecture at toy size, random weights), a hub id ("runwayml/stable-diffusion-v1-5") or a local diffusers folder
    # (absolute, or starting with "." and then relative to the config file: "./models/sd15")
    base: str = "tiny-pretrained"
    family: str = "auto"  # "auto": read from the base's model_index.json; or sd1 | sd2 | sdxl
    resolution: int | None = Field(None, ge=32, le=2048, multiple_of=8)  # None: 64 for presets, else the family's
    # where staged models live: metric backbone weights, and hub ids as <org>/<name> folders (or a Hugging Face cache
    # laid out below it); relative: to the config file (style_factory/hub.py)
    models_dir: str | None = None
    # let the driver download a hub id it does not find (model.base, curate.captioner) once, before any worker starts,
    # into models_dir (else the Hugging Face cache); off: a missing model stops the run at once (exit 2)
    allow_downloads: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str, info: ValidationInfo) -> str:
        registry = _registry(info)
        if registry is not None and name != "auto" and name not in registry.families:
            raise ValueError(f"unknown model family {_excerpt(name)}; expected auto or one of "
                             f"{sorted(registry.families)}")
        return name


class CurateConfig(Strict):
    min_ref_images: int = Field(4, ge=1)  # per concept; fewer usable StyleRef images fails the style
    min_side: int = Field(32, ge=8)  # images smaller than this on either side are rejected
    max_aspect: float = Field(4.0, ge=1.0)  # long side / short side; beyond it a centre crop loses the content
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard on the declared header size
    # aspect-ratio buckets (style_factory.decode.bucket_sizes): each image resized and centre-cropped to the bucket of
    # nearest aspect ratio, about resolution^2 pixels, sides multiples of bucket_step; false: the square centre crop
    buckets: bool = False
    bucket_step: int = Field(64, ge=8, multiple_of=8)  # 64 for SD latents; the 64 px presets need 16
    # Images whose 32x32 thumbnails differ in at most this fraction of pixels, as they lie or once scaled and shifted
    # onto each other (a copy cropped or resized a little), are near duplicates (style_factory.curate.differing_fraction).
    near_duplicate_fraction: float = Field(0.03, ge=0, le=1)
    # transformers image-text-to-text model: a hub id, or a folder (absolute, or "./..." relative to the config file);
    # a sidecar .txt wins (docs/config.md lists the captioners that work and their prompts)
    captioner: str | None = None
    caption_prompt: str | None = Field(None, min_length=1)  # what the captioner is asked; None: no text input
    captioner_gpus: float = Field(0, ge=0)  # per captioner actor; 0: on CPU, one actor
    caption_batch_size: int = Field(8, ge=1)  # images per generate call
    caption_max_tokens: int = Field(40, ge=1)  # new tokens per caption, at most (greedy decoding)
    # remove the descriptor's words and style_words from captioner captions (never from sidecars or the template)
    strip_style_words: bool = True
    style_words: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


class ExportConfig(Strict):
    """What a full fine-tune (StyleBoost, DreamBooth) writes beside its diffusers folder (style_factory/checkpoint.py)."""
    single_file: bool = True  # <style>-<method>.safetensors in the original LDM layout, for A1111 and ComfyUI
    single_file_dtype: Literal["fp16", "fp32"] = "fp16"
    # a LoRA of this rank extracted from the fine-tune's weight difference (SVD), its error in the model card;
    # None = none
    extract_lora_rank: int | None = Field(None, ge=1)


class TrainConfig(Strict):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)  # StyleRef images per step (as many Aux images are added)
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_learning_rate: float | None = Field(None, gt=0)  # defaults to learning_rate
    train_text_encoder: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: what the base's scheduler says
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR weighting; None = plain MSE
    random_flip: bool = True
    # probability that a training image's caption is left out of its prompt, which keeps the method's style words
    # (style_factory.loop.drop_captions)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 1337
    # one model per training seed, each through the same fan-out (`train_seed` in results); None = [seed]. The model
    # of `seed` keeps the plain name, the others are named <method>-s<seed>
    seeds: list[int] | None = Field(None, min_length=1)
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(2, ge=0)  # worker restarts from the last checkpoint before the style fails
    num_workers: int = Field(1, ge=1)  # data-parallel workers per style
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; bf16 on GPUs that have it (A100, H100)
    # Fast-step options (style_factory.loop.apply_fast_paths); the defaults suit both CPU and GPU.
    # "auto": fused AdamW on CUDA, plain AdamW on CPU; adamw_8bit needs bitsandbytes (for 16 GB GPUs, full FT).
    optimizer: Literal["auto", "adamw", "adamw_fused", "adamw_8bit"] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: ~+1/3 compute, far less memory
    channels_last: bool = False  # NHWC UNet convolutions; try true on GPU with bf16
    compile: bool = False  # torch.compile the UNet: faster steps after a compile of minutes; for long GPU runs
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per method: its Options schema
    # per method: overrides of this section's own fields, applied last, e.g. {dreambooth: {learning_rate: 5.0e-6}}
    per_method: dict[str, dict[str, Any]] = Field(default_factory=dict)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # Watching (style_factory/tracking.py; not part of a job's key): where each job's scalars and validation images go,
    # "tensorboard" (<run>/tensorboard/<style>/<method>/), "mlflow", "wandb" (when installed); [] = nowhere.
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    validation_every: int = Field(0, ge=0)  # sample validation_prompts every this many steps; 0 = never
    # content prompts (the method adds its style words); None = the first 2 distinct StyleRef captions
    validation_prompts: list[str] | None = Field(None, min_length=1)

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        for name in trackers:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {_excerpt(name)}; expected any of {sorted(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise ValueError(f"{name} is not installed (pip install {TRACKERS[name]}); remove it or install it")
        if len(set(trackers)) != len(trackers):
            raise ValueError("trackers must be unique")
        return trackers

    @field_validator("seeds")
    @classmethod
    def _train_seeds_unique(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds

    def training_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    @field_validator("method_options", "per_method")
    @classmethod
    def _per_method_valid(cls, settings: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        """Each method's options, or its overrides of these settings; unknown keys and bad values fail here."""
        for name, values in settings.items():
            _known_method(name, info)
            if info.field_name == "method_options":
                if (registry := _registry(info)) is not None:
                    try:
                        registry.methods[name].Options.model_validate(values)
                    except ValidationError as err:  # named by the method and option: "styledrop.feedback_images"
                        raise ValueError("; ".join(f"{'.'.join([name, *map(str, e['loc'])])}: "
                                                   f"{e['msg'].removeprefix('Value error, ')}"
                                                   for e in err.errors())) from None
            elif nested := sorted({"method_options", "per_method"} & set(values)):
                raise ValueError(f"{name}: {', '.join(nested)} cannot be set per method")
            else:
                TrainConfig.model_validate(values, context=info.context)
        return settings


class SelectionConfig(Strict):
    """The verdict's rule (style_factory/decide.py): per style, the best model by `primary` among those whose paired
    interval against the base lies wholly on the better side of 0 and whose CLIP-T is at most `content_margin` below
    the base's; else the base. Models whose paired interval against the winner at `tie_level` holds 0 are tied."""
    primary: Literal["kid", "kid_heldout"] = "kid"  # KID to the StyleRef images, or to the held-out ones
    content_margin: float = Field(0.02, ge=0)  # CLIP-T (cosine) a model may lose against the base's
    tie_test: Literal["paired_bootstrap", "none"] = "paired_bootstrap"
    tie_level: float = Field(0.95, gt=0, lt=1)  # confidence level of the paired intervals (also against the base)


STYLE_ADAPTER_METHOD = "styledrop"  # the method whose adapter gives a composition its style
SUBJECT_METHOD = "content"  # the one method a subject trains: its content adapter


class ComposeConfig(Strict):
    """A composition (style_factory/methods/content.py): the style's StyleDrop adapter and a subject's content adapter
    sampled together, eps = (1 - gamma) * eps_style + gamma * eps_content."""
    style: str  # a style folder of styles_dir whose methods include styledrop
    content: str  # a subject folder of subjects_dir
    gamma: float = Field(0.6, ge=0, le=1)  # the content adapter's share (the paper: 0.5-0.7)

    @field_validator("style", "content")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not STYLE_NAME.match(name):
            raise ValueError("must be a folder name: lowercase letters, digits, '-' or '_'")
        return name


class EveryN(Strict):
    every: int = Field(ge=1)  # score the weights of every this-many-th step


class EvaluateConfig(Strict):
    # content prompts; None = style_factory.generate.TOY_PROMPTS for the tiny presets, else DEFAULT_PROMPTS
    prompts: list[str] | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    inception: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to inception-2015-12-05.pt
    clip: str = "auto"  # "auto" (real if found, else toy) | "toy" | [ARCH:]path to an open_clip checkpoint
    dino: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to timm vit_small_patch16_224.dino
    csd: str = "auto"  # "auto" (real if found, else not scored: NaN) | "off" | path to csd_vit_l14.safetensors
    kid_seed: int = 0
    gpus_per_task: float = Field(0, ge=0)
    # images per pipeline call wherever the project samples (evaluation, StyleDrop's feedback, DreamBooth's class
    # images); "auto": 8 on CPU, 32 on a GPU (style_factory.sampling.AUTO_BATCH_SIZE). Each image has its own seeded
    # generator, so the images do not depend on it.
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, strict=True)] = "auto"
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    # style + subject compositions, sampled and scored like the models, with content similarity to the subject
    compose: list[ComposeConfig] = Field(default_factory=list)
    # training steps whose weights are exported beside the final model and scored like it (a `step` column): a list
    # of steps, or {every: N}; steps at or past a job's max_steps are its final model
    checkpoints: list[Annotated[int, Field(ge=1)]] | EveryN = Field(default_factory=list)

    def checkpoint_steps(self, max_steps: int) -> list[int]:
        """The steps before `max_steps` whose weights are kept and scored."""
        if isinstance(self.checkpoints, EveryN):
            return list(range(self.checkpoints.every, max_steps, self.checkpoints.every))
        return sorted({step for step in self.checkpoints if step < max_steps})

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, prompts: list[str] | None) -> list[str] | None:
        if prompts is not None and (not prompts or any(not p.strip() for p in prompts)):
            raise ValueError("must be a non-empty list of non-empty prompts")
        return prompts

    @field_validator("csd")
    @classmethod
    def _csd_has_no_toy(cls, csd: str) -> str:
        if csd == "toy":
            raise ValueError("CSD has no toy stand-in: auto, off, or a path to csd_vit_l14.safetensors")
        return csd

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds

    @model_validator(mode="after")
    def _enough_images(self) -> EvaluateConfig:
        if self.prompts is not None and len(self.prompts) * len(self.seeds) < 2:
            raise ValueError("prompts x seeds must give at least 2 images per model (FID and KID need two)")
        entries = [(c.style, c.content, c.gamma) for c in self.compose]
        if len(set(entries)) != len(entries):
            raise ValueError(f"compose repeats an entry: {_excerpt(entries)}")
        return self


class SweepRange(Strict):
    """A random search's range of one numeric setting: uniform, or log-uniform, between low and high."""
    low: float
    high: float
    log: bool = False  # log-uniform (learning rates)
    integer: bool = False  # rounded to an integer (steps, ranks)

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if not self.low <= self.high:
            raise ValueError("low must not exceed high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SweepConfig(Strict):
    """Train settings to search per method. Every point is a training job of its own, through the same fan-out."""
    search: Literal["grid", "random"] = "grid"  # grid: every combination; random: `budget` draws seeded by `seed`
    budget: int | None = Field(None, ge=1)  # random: points per method
    seed: int = 0  # random: the draws' seed
    # method -> {train field or method_options.<option>: a list of values, or (random only) a SweepRange}
    space: dict[str, dict[str, list[Any] | SweepRange]] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _space_valid(cls, space: dict[str, dict[str, list[Any] | SweepRange]],
                     info: ValidationInfo) -> dict[str, dict[str, list[Any] | SweepRange]]:
        registry = _registry(info)
        for method, axes in space.items():
            _known_method(method, info)
            if not axes:
                raise ValueError(f"{method}: no settings to sweep")
            for name, values in axes.items():
                if isinstance(values, list) and not values:
                    raise ValueError(f"{method}.{name}: an empty list of values")
                samples = values if isinstance(values, list) else [values.low, values.high]
                if registry is not None and not registry.methods[method].trains and not name.startswith(OPTION_PREFIX):
                    raise ValueError(f"{method}.{name}: {method} trains nothing; sweep its own options, "
                                     f"{OPTION_PREFIX}<option>")
                if name.startswith(OPTION_PREFIX):
                    if registry is not None:
                        options = registry.methods[method].Options
                        if name[len(OPTION_PREFIX):] not in options.model_fields:
                            raise ValueError(f"{method}.{name}: not an option of {method}; expected one of "
                                             f"{sorted(OPTION_PREFIX + f for f in options.model_fields)}")
                        for value in samples:
                            options.model_validate({name[len(OPTION_PREFIX):]: value})
                elif name not in TrainConfig.model_fields or name in UNSWEPT_FIELDS:
                    raise ValueError(f"{method}.{name}: not a train setting a sweep can vary; expected one of "
                                     f"{sorted(set(TrainConfig.model_fields) - UNSWEPT_FIELDS)} or "
                                     f"{OPTION_PREFIX}<option>")
                else:
                    for value in samples:
                        TrainConfig.model_validate({name: value}, context=info.context)
        return space

    @model_validator(mode="after")
    def _search_fits(self) -> SweepConfig:
        if self.search == "grid":
            if self.budget is not None:
                raise ValueError("budget is for search: random (a grid has every combination)")
            if any(isinstance(v, SweepRange) for axes in self.space.values() for v in axes.values()):
                raise ValueError("a grid takes lists of values; ranges ({low, high}) need search: random")
        elif self.space and self.budget is None:
            raise ValueError("search: random needs a budget (points per method)")
        return self

    def points(self, method: str) -> list[dict[str, Any]]:
        """The method's points in order ([] when it is not swept); point i is named p<i>. Random draws are seeded by
        `seed` and the method's name, so one method's points do not change with another's space."""
        axes = self.space.get(method)
        if not axes:
            return []
        if self.search == "grid":
            return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
        draw = random.Random(f"{self.seed}:{method}")
        return [{name: draw_value(values, draw) for name, values in axes.items()} for _ in range(self.budget)]


def draw_value(values: list[Any] | SweepRange, draw: random.Random) -> Any:
    """One random draw of a setting: a list's element, or a value in a range (log-uniform where `log`)."""
    if isinstance(values, list):
        return draw.choice(values)
    if values.log:
        value = math.exp(draw.uniform(math.log(values.low), math.log(values.high)))
    else:
        value = draw.uniform(values.low, values.high)
    return round(value) if values.integer else float(f"{value:.4g}")


class RunConfig(Strict):
    # Paths (styles_dir, results_dir, a local model.base, model.models_dir, a local curate.captioner, evaluate's
    # backbone files) that a config file sets relative are relative to that file's folder; left out, the defaults
    # are relative to the current directory (the repository, under make). See load_run_config.
    name: str = "tiny-demo"  # the run id: results land in <results_dir>/<name>/
    styles_dir: str = "styles"
    subjects_dir: str = "subjects"  # subject folders (a style folder's format) that evaluate.compose names
    results_dir: str = "results"
    styles: list[str] = Field(default_factory=list)  # subset to run; empty = every folder in styles_dir
    methods: list[str] | None = None  # sweep these over every style; None = each style's own
    # Zero-shot methods run on every style beside its trained ones: the reference a method must beat.
    baselines: list[str] = Field(default_factory=lambda: ["stylealigned"])
    # Trainings in flight at once; None = as many as the cluster's current CPUs/GPUs fit. On an autoscaling
    # cluster set it to what the cluster can grow to, so waiting trainings ask the autoscaler for nodes.
    max_concurrent_trainings: int | None = Field(None, ge=1)
    # CPUs a local Ray instance offers its tasks; None = every core. Ignored when joining a cluster (RAY_ADDRESS).
    # Fewer CPUs run fewer trainings and sampler actors side by side, each paying its own start-up and imports.
    local_cpus: int | None = Field(None, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)  # train settings searched per method

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, methods: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if methods is not None:
            if not methods:
                raise ValueError("must list at least one method (or be left out)")
            for name in methods:
                _style_method(name, info)
        return methods

    @field_validator("baselines")
    @classmethod
    def _baselines_zero_shot(cls, baselines: list[str], info: ValidationInfo) -> list[str]:
        registry = _registry(info)
        for name in baselines:
            if _style_method(name, info) and registry is not None and registry.methods[name].trains:
                raise ValueError(f"{_excerpt(name)} trains; baselines are zero-shot methods (list it under methods)")
        return baselines

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not STYLE_NAME.match(name):
            raise ValueError("must be a safe directory name: lowercase letters, digits, '-' or '_'")
        return name

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class Concept(Strict):
    token: str  # the rare token bound to this concept's StyleRef images
    class_word: str  # the class word bound to its Aux images (the prior)
    ref: str = "ref"  # StyleRef folder, relative to the style folder
    aux: str = "aux"  # Aux folder, relative to the style folder
    heldout: str | None = None  # held-out StyleRef folder: scored against, never trained on

    def roles(self) -> list[str]:
        """The image folders this concept has, in curation order (a held-out duplicate of a StyleRef is dropped)."""
        return ["ref", "aux"] + (["heldout"] if self.heldout else [])

    @field_validator("token")
    @classmethod
    def _token_shape(cls, token: str) -> str:
        if not TOKEN.match(token):
            raise ValueError("must be 2-32 characters of letters, digits, '<', '>', '_' or '-' (one word)")
        return token

    @field_validator("class_word")
    @classmethod
    def _class_word_not_empty(cls, word: str) -> str:
        if not word.strip():
            raise ValueError("must not be empty")
        return word.strip()


class StyleConfig(Strict):
    display_name: str
    descriptor: str  # a descriptive phrase of the style, used to prompt the untuned base model
    method: str = "styleboost"
    concepts: list[Concept] = Field(min_length=1)
    caption_template: str = "an image"  # caption when there is neither a sidecar .txt nor a captioner
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the run's `train` section

    @field_validator("train")
    @classmethod
    def _train_overrides_valid(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        TrainConfig.model_validate(overrides, context=info.context)  # unknown keys and bad values fail here
        return overrides

    @field_validator("method")
    @classmethod
    def _method_known(cls, name: str, info: ValidationInfo) -> str:
        return _style_method(name, info)

    @field_validator("caption_template")
    @classmethod
    def _template_formats(cls, template: str) -> str:
        try:
            template.format(class_word="style")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"may only use the placeholder {{class_word}} ({_cut(str(err))})") from None
        return template

    @model_validator(mode="after")
    def _tokens_unique(self) -> StyleConfig:
        tokens = [c.token for c in self.concepts]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"concepts repeat a token: {_excerpt(tokens)}")
        return self

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]


class Style(BaseModel):
    """A validated style folder."""

    name: str
    dir: Path
    config: StyleConfig
    subject: bool = False  # a subject of subjects_dir: trains its content adapter only, scored only in compositions

    def concept_dir(self, concept: Concept, role: Literal["ref", "aux", "heldout"]) -> Path:
        return self.dir / getattr(concept, role)

    def train_config(self, run: RunConfig, method: str, point: Mapping[str, Any] | None = None) -> TrainConfig:
        """The run's `train`, then this style's overrides, then `per_method[method]`, then a sweep's `point`. Only
        the method's own options are kept, so a job's key changes with its own settings alone."""
        merged = {**run.train.model_dump(), **self.config.train}
        options, per_method = merged.pop("method_options"), merged.pop("per_method")
        own_options = dict(options.get(method, {}))
        point = dict(point or {})
        for name in [n for n in point if n.startswith(OPTION_PREFIX)]:
            own_options[name[len(OPTION_PREFIX):]] = point.pop(name)
        return TrainConfig.model_validate({**merged, **per_method.get(method, {}), **point,
                                           "method_options": {method: own_options} if own_options or method in options else {}})

    def methods(self, run: RunConfig) -> list[str]:
        if self.subject:
            return [SUBJECT_METHOD]
        chosen = list(run.methods) if run.methods else [self.config.method]
        return chosen + [name for name in run.baselines if name not in chosen]


class _Refused(ValueError):
    """A YAML document past one of the bounds (MAX_YAML_NODES, MAX_YAML_DEPTH)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting every node as a reader that expands aliases (pydantic, repr) would meet it.

    Composing keeps one node per anchor however often it is named, so a small file can stand for billions of
    values; each node's expanded size is known once it is composed, and the running total is checked node by node.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.expanded: dict[int, int] = {}  # id(node) -> nodes in it with aliases expanded, once composed
        self.total = 0  # nodes so far, an alias counted as the nodes it stands for
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        alias = self.check_event(yaml.AliasEvent)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep (MAX_YAML_DEPTH)")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if alias:
            if id(node) not in self.expanded:
                raise _Refused("an alias inside the node it names (a recursive document)")
            self.total += self.expanded[id(node)]
        else:
            children = ([] if isinstance(node, yaml.ScalarNode) else node.value if isinstance(node, yaml.SequenceNode)
                        else [part for pair in node.value for part in pair])
            self.expanded[id(node)] = 1 + sum(self.expanded[id(child)] for child in children)
            self.total += 1
        if self.total > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES} values once its aliases are expanded (MAX_YAML_NODES; "
                           "an alias bomb?)")
        return node


def _read_yaml(path: Path) -> Any:
    """The document in `path`, read safely (no arbitrary objects) and within the MAX_YAML_* bounds."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_YAML_BYTES + 1)  # at most one byte past the cap, however large the file
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: refused: larger than {MAX_YAML_BYTES} bytes (MAX_YAML_BYTES, 1 MiB), far more "
                          "than a config needs")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise ConfigError(f"{path}: refused: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}") from err
    finally:
        loader.dispose()


def _validate(schema: type[BaseModel], data: Any, path: Path | str, registry: Registry) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data, context={"registry": registry})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(_cut(str(p)) for p in e["loc"]) or "(top level)"
            message = e["msg"].replace("Extra inputs are not permitted", "unknown field (misspelled?)")
            shown = e["type"] != "missing" and not isinstance(e["input"], dict)
            got = f" (got {_excerpt(e['input'])})" if shown else ""
            problems.append(f"{path}: {field}: {message}{got}")
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"{path}: ... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise ConfigError("\n".join(problems)) from None


def _local_path(value: str) -> bool:
    """Whether a model or captioner names a local folder rather than a hub id ("org/name")."""
    return Path(value).expanduser().is_absolute() or value.startswith(".")


def _against(folder: Path, value: str) -> str:
    """`value`, a path, absolute: against `folder` when it is relative, "~" expanded."""
    path = Path(value).expanduser()
    return str(path) if path.is_absolute() else os.path.normpath(folder / path)


def _resolve_paths(run: RunConfig, folder: Path) -> None:
    """Make the relative paths that a config file sets absolute against the file's `folder`, so that a run reads the
    same files from any current directory. Fields the file leaves out keep their defaults, relative to the current
    directory (the repository, under make)."""
    for name in ("styles_dir", "subjects_dir", "results_dir"):
        if name in run.model_fields_set:
            setattr(run, name, _against(folder, getattr(run, name)))
    model, curate, evaluate = run.model, run.curate, run.evaluate
    if "base" in model.model_fields_set and _local_path(model.base):
        model.base = _against(folder, model.base)
    if model.models_dir is not None:
        model.models_dir = _against(folder, model.models_dir)
    if curate.captioner is not None and _local_path(curate.captioner):
        curate.captioner = _against(folder, curate.captioner)
    for name in ("inception", "dino"):
        if (spec := getattr(evaluate, name)) not in ("auto", "toy"):
            setattr(evaluate, name, _against(folder, spec))
    if evaluate.csd not in ("auto", "off"):
        evaluate.csd = _against(folder, evaluate.csd)
    evaluate.clip = _against_spec(folder, evaluate.clip)


def _against_spec(folder: Path, value: str) -> str:
    """A backbone spec, "auto" | "toy" | [ARCH:]path, with its path made absolute against `folder`."""
    if value in ("auto", "toy"):
        return value
    arch, separator, spec = value.partition(":")  # split as style_factory.backbones.load_clip splits it
    if not separator:
        arch, spec = "", arch
    return arch + separator + _against(folder, spec)


def _read_names(path: Path, where: str) -> list[str]:
    """The names a list file holds, one a line; blank lines and '#' comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read {path}: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _resolve_option_paths(options: dict[str, dict[str, Any]], folder: Path, registry: Registry, source: Path) -> None:
    """Each method's file options (marked `ConfigPath`) made absolute against `folder`, the folder of the config file
    `source` that sets them; list files are read into the option they fill, which is validated again."""
    for method, values in options.items():
        schema = registry.methods[method].Options
        read = []
        for name, info in schema.model_fields.items():
            marker = next((m for m in info.metadata if isinstance(m, ConfigPath)), None)
            value = values.get(name)
            if marker is None or not isinstance(value, str) or (marker.model and not _local_path(value)):
                continue
            values[name] = (_against_spec if marker.spec else _against)(folder, values[name])
            if marker.lines_into:
                listed = values.pop(name)
                values[marker.lines_into] = _read_names(Path(listed), f"{source}: train.method_options.{method}.{name}")
                read.append(listed)
        if read:
            try:
                schema.model_validate(values)
            except ValidationError as err:
                raise ConfigError("\n".join(
                    f"{source}: {'.'.join(['train.method_options', method, *map(str, e['loc'])])} "
                    f"(read from {', '.join(read)}): {e['msg']}" for e in err.errors())) from None


def load_run_config(path: str | Path | None, registry: Registry) -> RunConfig:
    """The run config from `path`, or the embedded default (tiny-pretrained model, CPU) when None. Relative paths
    the file sets are made absolute against its folder (`_resolve_paths`)."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run config not found")
    run = _validate(RunConfig, _read_yaml(path), path, registry)
    _resolve_paths(run, path.absolute().parent)
    _resolve_option_paths(run.train.method_options, path.absolute().parent, registry, path)
    if "styles_dir" in run.model_fields_set and not Path(run.styles_dir).is_dir():
        raise ConfigError(f"{path}: styles_dir: folder {run.styles_dir} does not exist")
    if _local_path(run.model.base) and not Path(run.model.base).is_dir():
        raise ConfigError(f"{path}: model.base: local diffusers folder {run.model.base} does not exist")
    return run


def load_style(style_dir: str | Path, registry: Registry) -> Style:
    style_dir = Path(style_dir)
    name = style_dir.name
    config_path = style_dir / "style.yaml"
    if not STYLE_NAME.match(name):
        raise ConfigError(f"{style_dir}: style folder name {name!r} is not a safe name "
                          "(lowercase letters, digits, '-' or '_', at most 64 characters)")
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: missing (every style folder needs a style.yaml)")
    config = _validate(StyleConfig, _read_yaml(config_path), config_path, registry)
    _resolve_option_paths(config.train.get("method_options", {}), style_dir.absolute(), registry, config_path)
    style = Style(name=name, dir=style_dir, config=config)
    root = style_dir.resolve()
    for i, concept in enumerate(config.concepts):
        for role in concept.roles():
            folder = style.concept_dir(concept, role)
            if not folder.resolve().is_relative_to(root):
                raise ConfigError(f"{config_path}: concepts.{i}.{role}: {folder} leaves the style folder")
            if not folder.is_dir():
                raise ConfigError(f"{config_path}: concepts.{i}.{role}: folder {folder} does not exist")
    return style


def load_styles(run: RunConfig, registry: Registry, names: list[str] | None = None) -> list[Style]:
    """Every style the run covers (or `names`), validated together: token collisions across styles fail."""
    styles_dir = Path(run.styles_dir)
    if not styles_dir.is_dir():
        raise ConfigError(f"styles_dir: folder {styles_dir.absolute()} does not exist")
    wanted = names or run.styles
    if wanted:
        missing = [n for n in wanted if not (styles_dir / n / "style.yaml").is_file()]
        if missing:
            raise ConfigError(f"{styles_dir}: no style folder with a style.yaml for {missing}")
        dirs = [styles_dir / n for n in wanted]
    else:
        dirs = sorted(d for d in styles_dir.iterdir() if (d / "style.yaml").is_file())
    if not dirs:
        raise ConfigError(f"{styles_dir}: no style folders (each needs a style.yaml)")
    styles = [load_style(d, registry) for d in dirs]
    owner: dict[str, str] = {}
    for style in styles:
        for token in style.config.tokens:
            if token in owner:
                raise ConfigError(f"{style.dir / 'style.yaml'}: token {token!r} is also used by style "
                                  f"{owner[token]!r}; tokens must be unique across styles")
            owner[token] = style.name
    return styles


def load_subjects(run: RunConfig, registry: Registry, styles: list[Style], source: str) -> list[Style]:
    """The subjects that the compositions of `styles` name, each `subjects_dir/<name>/` in a style folder's format.
    Every entry of evaluate.compose is checked, whichever styles this command runs: its style must be a style folder
    whose methods include styledrop, its content a subject folder, and a subject's tokens must be its own."""
    running = {style.name: style for style in styles}
    subjects: dict[str, Style] = {}
    for index, entry in enumerate(run.evaluate.compose):
        where = f"{source}: evaluate.compose.{index}"
        if not (Path(run.styles_dir) / entry.style / "style.yaml").is_file():
            raise ConfigError(f"{where}.style: unknown style {entry.style!r}: no {entry.style}/style.yaml in "
                              f"{run.styles_dir}")
        style = running.get(entry.style) or load_style(Path(run.styles_dir) / entry.style, registry)
        if STYLE_ADAPTER_METHOD not in style.methods(run):
            raise ConfigError(f"{where}.style: style {entry.style!r} does not train {STYLE_ADAPTER_METHOD} (its "
                              f"methods: {style.methods(run)}); add it to the run's methods or the style's method")
        folder = Path(run.subjects_dir) / entry.content
        if not (folder / "style.yaml").is_file():
            raise ConfigError(f"{where}.content: unknown subject {entry.content!r}: no {entry.content}/style.yaml "
                              f"in {run.subjects_dir}")
        if (Path(run.styles_dir) / entry.content / "style.yaml").is_file():
            raise ConfigError(f"{where}.content: {entry.content!r} names a style too; a subject needs a name of its "
                              "own (its curated data and model sit beside the styles')")
        if entry.style in running and entry.content not in subjects:
            subjects[entry.content] = load_style(folder, registry).model_copy(update={"subject": True})
    owner = {token: style.name for style in styles for token in style.config.tokens}
    for subject in subjects.values():
        for token in subject.config.tokens:
            if token in owner:
                raise ConfigError(f"{subject.dir / 'style.yaml'}: token {token!r} is also used by "
                                  f"{owner[token]!r}; a subject's tokens must be its own")
            owner[token] = subject.name
    return list(subjects.values())
