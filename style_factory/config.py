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
import json
import os
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


@dataclass(frozen=True)
class Registry:
    """The names a config may use: methods (name -> class with `trains` and an `Options` schema) and families."""

    methods: Mapping[str, Any]
    families: Collection[str]


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
    # Images whose 32x32 thumbnails differ in at most this fraction of pixels, as they lie or once scaled and shifted
    # onto each other (a copy cropped or resized a little), are near duplicates (style_factory.curate.differing_fraction).
    near_duplicate_fraction: float = Field(0.03, ge=0, le=1)
    # transformers image-to-text model: a hub id, or a folder (absolute, or "./..." relative to the config file);
    # a sidecar .txt wins
    captioner: str | None = None


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
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 1337
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

    @field_validator("method_options", "per_method")
    @classmethod
    def _per_method_valid(cls, settings: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        """Each method's options, or its overrides of these settings; unknown keys and bad values fail here."""
        for name, values in settings.items():
            _known_method(name, info)
            if info.field_name == "method_options":
                if (registry := _registry(info)) is not None:
                    registry.methods[name].Options.model_validate(values)
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


class EvaluateConfig(Strict):
    # content prompts; None = style_factory.generate.TOY_PROMPTS for the tiny presets, else DEFAULT_PROMPTS
    prompts: list[str] | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    num_inference_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    inception: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to inception-2015-12-05.pt
    clip: str = "auto"  # "auto" (real if found, else toy) | "toy" | [ARCH:]path to an open_clip checkpoint
    dino: str = "auto"  # "auto" (real if found, else toy) | "toy" | path to timm vit_small_patch16_224.dino
    kid_seed: int = 0
    gpus_per_task: float = Field(0, ge=0)
    # images per pipeline call wherever the project samples (evaluation, StyleDrop's feedback, DreamBooth's class
    # images); "auto": 8 on CPU, 32 on a GPU (style_factory.sampling.AUTO_BATCH_SIZE). Each image has its own seeded
    # generator, so the images do not depend on it.
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, strict=True)] = "auto"
    selection: SelectionConfig = Field(default_factory=SelectionConfig)

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
    # Paths (styles_dir, results_dir, a local model.base, model.models_dir, a local curate.captioner, evaluate's
    # backbone files) that a config file sets relative are relative to that file's folder; left out, the defaults
    # are relative to the current directory (the repository, under make). See load_run_config.
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
    def _methods_known(cls, methods: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if methods is not None:
            if not methods:
                raise ValueError("must list at least one method (or be left out)")
            for name in methods:
                _known_method(name, info)
        return methods

    @field_validator("baselines")
    @classmethod
    def _baselines_zero_shot(cls, baselines: list[str], info: ValidationInfo) -> list[str]:
        registry = _registry(info)
        for name in baselines:
            if _known_method(name, info) and registry is not None and registry.methods[name].trains:
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
        return _known_method(name, info)

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
    for name in ("styles_dir", "results_dir"):
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
    if evaluate.clip not in ("auto", "toy"):  # [ARCH:]path, split as style_factory.backbones.load_clip splits it
        arch, separator, spec = evaluate.clip.partition(":")
        if not separator:
            arch, spec = "", arch
        evaluate.clip = arch + separator + _against(folder, spec)


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
