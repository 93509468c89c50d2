"""Typed configuration: one schema for a run (`run.yaml`), one for a style (`styles/<name>/style.yaml`).

Everything is validated here, before any compute starts; a bad value raises `ConfigError`
naming the file, the field and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TOKEN = re.compile(r"^[A-Za-z0-9<>_-]{2,32}$")


def _known_method(name: str) -> str:
    from pipeline.methods import METHODS  # imported late: methods import this module

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return name


class ConfigError(ValueError):
    """A configuration problem, phrased as `<file>: <field>: <problem>`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    # "tiny-pretrained" (shipped, trained on the toy world), "tiny" (same architecture, random weights),
    # a hub id ("runwayml/stable-diffusion-v1-5") or a local diffusers folder
    base: str = "tiny-pretrained"
    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    models_dir: str | None = None  # where metric backbone weights live (see README)


class CurateConfig(Strict):
    min_ref_images: int = Field(4, ge=1)  # per concept; fewer usable StyleRef images fails the style
    min_side: int = Field(32, ge=8)  # images smaller than this on either side are rejected
    max_aspect: float = Field(4.0, ge=1.0)  # long side / short side; beyond it a centre crop loses the content
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard on the declared header size
    # Images whose 32x32 thumbnails differ in at most this fraction of pixels are near duplicates.
    near_duplicate_fraction: float = Field(0.03, ge=0, le=1)
    captioner: str | None = None  # transformers image-to-text model (hub id or folder); sidecar .txt wins


class TrainConfig(Strict):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)  # StyleRef images per step (as many Aux images are added)
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_learning_rate: float | None = Field(None, gt=0)  # defaults to learning_rate
    train_text_encoder: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR weighting; None = plain MSE
    random_flip: bool = True
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 1337
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(2, ge=0)  # worker restarts from the last checkpoint before the style fails
    num_workers: int = Field(1, ge=1)  # data-parallel workers per style
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; bf16 on GPUs that have it (A100, H100)
    # Fast-step options (pipeline.train.apply_fast_paths); the defaults suit both CPU and GPU.
    # "auto": fused AdamW on CUDA, plain AdamW on CPU; adamw_8bit needs bitsandbytes (for 16 GB GPUs, full FT).
    optimizer: Literal["auto", "adamw", "adamw_fused", "adamw_8bit"] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: ~+1/3 compute, far less memory
    channels_last: bool = False  # NHWC UNet convolutions; try true on GPU with bf16
    compile: bool = False  # torch.compile the UNet: faster steps after a compile of minutes; for long GPU runs
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per method: its Options schema
    # per method: overrides of this section's own fields, applied last, e.g. {dreambooth: {learning_rate: 5.0e-6}}
    per_method: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("method_options")
    @classmethod
    def _options_valid(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from pipeline.methods import METHODS

        for name, values in options.items():
            _known_method(name)
            METHODS[name].Options.model_validate(values)  # unknown keys and bad values fail here
        return options

    @field_validator("per_method")
    @classmethod
    def _per_method_valid(cls, overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, values in overrides.items():
            _known_method(name)
            if nested := sorted({"method_options", "per_method"} & set(values)):
                raise ValueError(f"{name}: {', '.join(nested)} cannot be set per method")
            TrainConfig.model_validate(values)  # unknown keys and bad values fail here
        return overrides


class EvaluateConfig(Strict):
    # content prompts; None = pipeline.generate.TOY_PROMPTS for the tiny presets, else DEFAULT_PROMPTS
    prompts: list[str] | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    inception: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to inception-2015-12-05.pt
    clip: str = "auto"  # "auto" (real if found, else toy) | "toy" | [ARCH:]path to an open_clip checkpoint
    dino: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to timm vit_small_patch16_224.dino
    kid_seed: int = 0
    gpus_per_task: float = Field(0, ge=0)

    @field_validator("prompts")
    @classmethod
    def _prompts_not_empty(cls, prompts: list[str] | None) -> list[str] | None:
        if prompts is not None and (not prompts or any(not p.strip() for p in prompts)):
            raise ValueError("must be a non-empty list of non-empty prompts")
        return prompts

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
        return self


class RunConfig(Strict):
    name: str = "tiny-demo"  # the run id: results land in <results_dir>/<name>/
    styles_dir: str = "styles"
    results_dir: str = "results"
    styles: list[str] = Field(default_factory=list)  # subset to run; empty = every folder in styles_dir
    methods: list[str] | None = None  # sweep these over every style; None = each style's own
    # Zero-shot methods run on every style beside its trained ones: the reference a method must beat.
    baselines: list[str] = Field(default_factory=lambda: ["stylealigned"])
    # Trainings in flight at once; None = as many as the cluster's current CPUs/GPUs fit. On an autoscaling
    # cluster set it to what the cluster can grow to, so waiting trainings ask the autoscaler for nodes.
    max_concurrent_trainings: int | None = Field(None, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, methods: list[str] | None) -> list[str] | None:
        if methods is not None:
            if not methods:
                raise ValueError("must list at least one method (or be left out)")
            for name in methods:
                _known_method(name)
        return methods

    @field_validator("baselines")
    @classmethod
    def _baselines_zero_shot(cls, baselines: list[str]) -> list[str]:
        from pipeline.methods import METHODS

        for name in baselines:
            if _known_method(name) and METHODS[name].trains:
                raise ValueError(f"{name!r} trains; baselines are zero-shot methods (list it under methods)")
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
    def _train_overrides_valid(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        TrainConfig.model_validate(overrides)  # unknown keys and bad values fail here, not mid-run
        return overrides

    @field_validator("method")
    @classmethod
    def _method_known(cls, name: str) -> str:
        return _known_method(name)

    @field_validator("caption_template")
    @classmethod
    def _template_formats(cls, template: str) -> str:
        try:
            template.format(class_word="style")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"may only use the placeholder {{class_word}} ({err})") from None
        return template

    @model_validator(mode="after")
    def _tokens_unique(self) -> StyleConfig:
        tokens = [c.token for c in self.concepts]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"concepts repeat a token: {tokens}")
        return self

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]


class Style(BaseModel):
    """A validated style folder."""

    name: str
    dir: Path
    config: StyleConfig

    def concept_dir(self, concept: Concept, role: Literal["ref", "aux", "heldout"]) -> Path:
        return self.dir / getattr(concept, role)

    def train_config(self, run: RunConfig, method: str) -> TrainConfig:
        """The run's `train`, then this style's overrides, then `per_method[method]`. Only the method's own
        options are kept, so a job's key changes with its own settings alone."""
        merged = {**run.train.model_dump(), **self.config.train}
        options, per_method = merged.pop("method_options"), merged.pop("per_method")
        own_options = {method: options[method]} if method in options else {}
        return TrainConfig.model_validate({**merged, **per_method.get(method, {}), "method_options": own_options})

    def methods(self, run: RunConfig) -> list[str]:
        chosen = list(run.methods) if run.methods else [self.config.method]
        return chosen + [name for name in run.baselines if name not in chosen]


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}") from err


def _validate(schema: type[BaseModel], data: Any, path: Path | str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            message = e["msg"].replace("Extra inputs are not permitted", "unknown field (misspelled?)")
            got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
            problems.append(f"{path}: {field}: {message}{got}")
        raise ConfigError("\n".join(problems)) from None


def load_run_config(path: str | Path | None = None) -> RunConfig:
    """The run config from `path`, or the embedded default (tiny-pretrained model, CPU) when None."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run config not found")
    run = _validate(RunConfig, _read_yaml(path), path)
    base = Path(run.model.base)
    is_preset = run.model.base in ("tiny", "tiny-pretrained")
    if not is_preset and (base.is_absolute() or run.model.base.startswith(".")) and not base.is_dir():
        raise ConfigError(f"{path}: model.base: local diffusers folder {base} does not exist")
    return run


def load_style(style_dir: str | Path) -> Style:
    style_dir = Path(style_dir)
    name = style_dir.name
    config_path = style_dir / "style.yaml"
    if not STYLE_NAME.match(name):
        raise ConfigError(f"{style_dir}: style folder name {name!r} is not a safe name "
                          "(lowercase letters, digits, '-' or '_', at most 64 characters)")
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: missing (every style folder needs a style.yaml)")
    config = _validate(StyleConfig, _read_yaml(config_path), config_path)
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


def load_styles(run: RunConfig, names: list[str] | None = None) -> list[Style]:
    """Every style the run covers (or `names`), validated together: token collisions across styles fail."""
    styles_dir = Path(run.styles_dir)
    if not styles_dir.is_dir():
        raise ConfigError(f"styles_dir: folder {styles_dir} does not exist")
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
    styles = [load_style(d) for d in dirs]
    owner: dict[str, str] = {}
    for style in styles:
        for token in style.config.tokens:
            if token in owner:
                raise ConfigError(f"{style.dir / 'style.yaml'}: token {token!r} is also used by style "
                                  f"{owner[token]!r}; tokens must be unique across styles")
            owner[token] = style.name
    return styles
