"""Every model a run loads, found on this machine once, in the driver, before any compute.

A run names models in these fields: `model.base` (a preset, a local diffusers folder or a hub id), `curate.captioner`
(a hub id or a folder), and the metric backbones `evaluate.inception` / `clip` / `dino` / `csd` and any method's
`clip` option (StyleDrop's scorer), each "auto", "toy" (CSD: "off") or a weight file, and the method options that
name a model (StyleAligned's `controlnet` and `depth_model`: a hub id, a folder, or a model shipped in
`style_factory/assets/`: `tiny-controlnet-canny`). `resolve_models` finds each
locally, never asking the network:
- a hub id in `<model.models_dir>/<org>/<name>` (a copied folder), then in `model.models_dir` laid out as a Hugging
  Face cache, then in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), with `local_files_only`;
- a diffusers folder, given or found, is checked for every file its family loads; a captioner's folder for its config
  and weights; a backbone file named in the config for being there.
Whatever is missing is listed in one `MissingModels` (a ConfigError: the job exits 2). With `model.allow_downloads:
true` a hub id that is not found is downloaded once, here, into `<model.models_dir>/<org>/<name>` (or the Hugging Face
cache when there is no models_dir). Workers are handed the local folders and run with the Hub off (`OFFLINE_ENV`).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from style_factory.config import ConfigError, ConfigPath, RunConfig, Style
from style_factory.families import FAMILIES, Family, get_family
from style_factory.methods import METHODS
from style_factory.models import PRESETS, detect_family, shipped_model

# What every Ray worker runs with: libraries load from the folders resolved here and never wait on the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' safetensors file names
# A base model's download: model_index.json and the components the families load, in safetensors, no variants.
BASE_DOWNLOAD_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.pb", "*.h5", "*fp16*",
                        "*non_ema*"]
CAPTIONER_DOWNLOAD_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "tf_model*", "flax_model*"]
BACKBONE_FIELDS = {"evaluate.inception": "inception", "evaluate.clip": "clip", "evaluate.dino": "dino",
                   "evaluate.csd": "csd"}
HOW_TO_STAGE = """What to do (docs/troubleshooting.md, "Running without network, and how to stage models"):
  - on a machine with network, `hf download <id>`, then copy its folder <cache>/models--<org>--<name> into this
    machine's Hugging Face cache (HF_HOME, default ~/.cache/huggingface; hub/ below it), or point HF_HOME there;
  - or copy the model's folder to <models_dir>/<org>/<name> and set model.models_dir (on a cluster: storage every
    node mounts), or give the folder itself as the field's value;
  - or, where the network is reachable, set model.allow_downloads: true: the driver downloads each model once,
    before any worker starts;
  - a backbone file: fix the path, copy the file there, or use auto / toy (CSD: off; `make fetch-weights` fetches
    real ones)."""


@dataclass
class Missing:
    """One model that is not on this machine: the field naming it, its value, where it was looked for, and why."""

    field: str
    name: str
    problem: str
    looked: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"  {self.field}: {self.name!r}: {self.problem}"]
        lines += [f"      looked in {place}" for place in self.looked]
        return "\n".join(lines)


class MissingModels(ConfigError):
    """Models a run needs that are neither on this machine nor downloadable: listed together, with what to do."""

    def __init__(self, source: str, missing: list[Missing]):
        super().__init__(f"{source}: {len(missing)} model(s) this run needs are not on this machine (nothing was "
                         "started):\n" + "\n".join(m.describe() for m in missing) + "\n" + HOW_TO_STAGE)
        self.missing = missing


def find_hub_model(repo_id: str, models_dir: str | None) -> tuple[Path | None, list[str]]:
    """The local folder of hub id `repo_id` (None when it is nowhere here), and the places looked in."""
    looked = []
    caches = [(Path(constants.HF_HUB_CACHE), "the Hugging Face cache: HF_HOME / HF_HUB_CACHE")]
    if models_dir:
        folder = Path(models_dir) / repo_id
        looked.append(f"{folder} (model.models_dir)")
        if folder.is_dir():
            return folder, looked
        caches.insert(0, (Path(models_dir), "model.models_dir, as a Hugging Face cache"))
    for cache, what in caches:
        looked.append(f"{cache / repo_folder_name(repo_id=repo_id, repo_type='model')} ({what})")
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True)), looked
        except LocalEntryNotFoundError:
            continue
    return None, looked


def base_missing_files(base: str, folder: Path, family: str) -> list[str]:
    """The files `Family.load_components` reads that `folder` lacks ([] when the family cannot be told: load_run
    names that problem)."""
    if not (folder / "model_index.json").is_file():
        return ["model_index.json"]
    try:
        found = get_family(family if family != "auto" else detect_family(base, str(folder)))
    except ValueError:
        return []
    return [" or ".join(options) for options in family_files(found)
            if not any((folder / option).is_file() for option in options)]


def family_files(family: Family) -> list[list[str]]:
    """Per file a base of `family` needs, the names that serve (a single or a sharded safetensors file)."""
    wanted = [["scheduler/scheduler_config.json"]]
    for name in ("vae", "unet", *family.text_encoder_classes):
        weights = [f"{name}/{stem}.safetensors{shards}" for stem in WEIGHT_NAMES for shards in ("", ".index.json")]
        wanted += [[f"{name}/config.json"], weights]
    return wanted + [[f"{name}/tokenizer.json", f"{name}/vocab.json"] for name in family.tokenizer_names]


def captioner_missing_files(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    return missing


def download(repo_id: str, models_dir: str | None, ignore: list[str], allow: list[str] | None) -> Path:
    """Fetch `repo_id` once into `<models_dir>/<org>/<name>`, or the Hugging Face cache when models_dir is None."""
    target = {"local_dir": Path(models_dir) / repo_id} if models_dir else {}
    print(f"[model] downloading {repo_id} into {target.get('local_dir', constants.HF_HUB_CACHE)} "
          "(model.allow_downloads)", flush=True)
    return Path(snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore, **target))


def locate(field_name: str, value: str, config: RunConfig, check: Callable[[Path], list[str]], ignore: list[str],
           allow: list[str] | None) -> tuple[Path | None, Missing | None]:
    """The local folder of a model named by folder or hub id, or why it is missing; downloads with allow_downloads.
    `check(folder)` lists the files a folder lacks."""
    model = config.model
    if (shipped := shipped_model(value)) is not None:  # tiny-controlnet-canny
        folder, looked = shipped, []
    elif Path(value).is_dir():
        folder, looked = Path(value), []
    elif Path(value).is_absolute():
        return None, Missing(field_name, value, "folder does not exist")
    else:
        try:
            validate_repo_id(value)
        except HFValidationError:
            return None, Missing(field_name, value, "neither a local folder (absolute, or starting with '.') nor "
                                                    "a hub id (org/name)")
        folder, looked = find_hub_model(value, model.models_dir)
        if model.allow_downloads and (folder is None or check(folder)):  # absent, or an interrupted download
            try:
                folder = download(value, model.models_dir, ignore, allow)
            except Exception as err:  # noqa: BLE001 - network, authentication, disk: each is this model's line
                return None, Missing(field_name, value, f"download failed: {type(err).__name__}: {err}", looked)
        if folder is None:
            close = difflib.get_close_matches(value, PRESETS, n=1) if field_name == "model.base" else []
            hint = f"; did you mean the preset {close[0]!r}?" if close else ""
            return None, Missing(field_name, value, f"not found (a hub id; model.allow_downloads is off){hint}",
                                 looked)
    if lacking := check(folder):
        return None, Missing(field_name, value, f"{folder} lacks {', '.join(lacking)}", looked)
    return folder, None


def backbone_specs(config: RunConfig, styles: list[Style]) -> dict[tuple[str, str], str]:
    """(kind, spec) -> the field naming it, for every metric backbone the run loads from a file: evaluate's, and
    every method option named `clip` (StyleDrop's scorer) of each style's methods."""
    specs = {}
    for field_name, kind in BACKBONE_FIELDS.items():
        specs.setdefault((kind, getattr(config.evaluate, field_name.split(".")[1])), field_name)
    for style in styles:
        for method in style.methods(config):
            options = METHODS[method](style.config).options(style.train_config(config, method))
            if (spec := getattr(options, "clip", None)) is not None:
                specs.setdefault(("clip", spec), f"train.method_options.{method}.clip (style {style.name})")
    return {key: name for key, name in specs.items() if key[1] not in ("auto", "toy", "off")}


def model_options(config: RunConfig, styles: list[Style]) -> dict[tuple[str, str, str], list[dict]]:
    """(method, option, value) -> the option dicts that set it, for every method option marked as a model
    (`ConfigPath(model=True)`: StyleAligned's controlnet and depth_model) that the run's styles use."""
    found: dict[tuple[str, str, str], list[dict]] = {}
    for style in styles:
        for method in style.methods(config):
            options = METHODS[method](style.config).options(style.train_config(config, method))
            for name, info in type(options).model_fields.items():
                value = getattr(options, name)
                if value is None or not any(isinstance(m, ConfigPath) and m.model for m in info.metadata):
                    continue
                sources = [config.train.method_options, style.config.train.get("method_options", {})]
                where = found.setdefault((method, name, value), [])
                where += [s[method] for s in sources if s.get(method, {}).get(name) == value
                          and not any(s[method] is w for w in where)]
    return found


def resolve_models(config: RunConfig, styles: list[Style], source: str) -> dict[str, str]:
    """Field -> local folder of the models the run names by folder or hub id ("model.base" unless it is a preset,
    "curate.captioner" when set), after checking every model it needs; MissingModels lists all that are not here.
    `source` names the config in the message."""
    found: dict[str, str] = {}
    missing: list[Missing] = []
    base = config.model.base
    if base not in PRESETS:
        folder, problem = locate("model.base", base, config,
                                 lambda f: base_missing_files(base, f, config.model.family),
                                 BASE_DOWNLOAD_IGNORE, ["model_index.json", *base_download_folders()])
        found["model.base"] = str(folder)
        missing += [problem] if problem else []
    if (captioner := config.curate.captioner) is not None:
        folder, problem = locate("curate.captioner", captioner, config, captioner_missing_files,
                                 CAPTIONER_DOWNLOAD_IGNORE, None)
        found["curate.captioner"] = str(folder)
        missing += [problem] if problem else []
    for (method, name, value), where in model_options(config, styles).items():
        folder, problem = locate(f"train.method_options.{method}.{name}", value, config, captioner_missing_files,
                                 CAPTIONER_DOWNLOAD_IGNORE, None)
        missing += [problem] if problem else []
        for options in where if folder is not None else []:  # workers are handed the local folder
            options[name] = str(folder)
    if specs := backbone_specs(config, styles):
        # torch, timm and open_clip, imported only when a file is named
        from style_factory.backbones import named_weight_file

        for (kind, spec), field_name in specs.items():
            try:
                named_weight_file(kind, spec)
            except (FileNotFoundError, ValueError) as err:
                missing.append(Missing(field_name, spec, str(err)))
    if missing:
        raise MissingModels(source, missing)
    return found


def base_download_folders() -> list[str]:
    """The component folders any family loads, as download patterns."""
    names = {name for family in FAMILIES.values()
             for name in ("vae", "unet", "scheduler", *family.text_encoder_classes, *family.tokenizer_names)}
    return [f"{name}/*" for name in sorted(names)]
