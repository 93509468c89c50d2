"""Base models: a hub id or a local diffusers folder (real use), or an offline preset; and which family each is.

Presets, all 64 px and needing no network:
- `tiny-pretrained`: SD 1.x-shaped, trained by this project on its toy world and shipped in `style_factory/assets/`;
- one `tiny-<family>` per family (`tiny` for SD 1.x, `tiny-sd2`, `tiny-sdxl`): the family's architecture at toy size
  with random weights from a fixed seed, written once as a diffusers folder and loaded from there, so every Ray
  worker sees bitwise the same weights.
The family of any other base is read from its `model_index.json` (and `unet/config.json`) in its local folder (a hub
id's is found by style_factory/hub.py before any compute), unless `model.family` names it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from style_factory.families import FAMILIES, Family, get_family
from style_factory.files import make_temp_dir, sha256_of

TINY_PRETRAINED = "tiny-pretrained"
TINY_PRETRAINED_DIR_NAME = "tiny-pretrained"
TINY_CONTROLNET_CANNY = "tiny-controlnet-canny"  # tiny-pretrained's Canny ControlNet (scripts/train_tiny_controlnet.py)
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped weights (scripts/train_tiny_pretrained.py)
TINY_VERSION = "v2"  # bump when a tiny config changes: cached preset folders are keyed by it
PRESET_RESOLUTION = 64
# preset name -> family name
PRESETS = {TINY_PRETRAINED: "sd1", **{family.tiny_preset: name for name, family in FAMILIES.items()}}


SHIPPED = {TINY_PRETRAINED: TINY_PRETRAINED_DIR_NAME, TINY_CONTROLNET_CANNY: TINY_CONTROLNET_CANNY}  # name -> assets/


def shipped_model(name: str) -> Path | None:
    """The folder in `style_factory/assets/` of a model shipped with the package (`tiny-pretrained`, and
    `tiny-controlnet-canny` for StyleAligned's `controlnet`); None for any other name."""
    return ASSETS_DIR / SHIPPED[name] if name in SHIPPED else None


def resolve_base_model(base: str, cache_dir: str | Path) -> str:
    """What `from_pretrained` should load: a preset's folder (a random one is written once), a local folder or a
    hub id."""
    if base == TINY_PRETRAINED:
        return str(shipped_model(base))
    if base not in PRESETS:
        return base
    folder = Path(cache_dir) / f"{base}-{TINY_VERSION}"
    if not (folder / "model_index.json").is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(Path(cache_dir), f".{folder.name}.")
        get_family(PRESETS[base]).build_tiny().save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, folder)  # atomic: concurrent writers race harmlessly, the loser's copy is dropped
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder.resolve())


def _read_config(source: str, name: str) -> dict | None:
    """A JSON file of a local folder; None when it has none."""
    path = Path(source) / name
    return json.loads(path.read_text()) if path.is_file() else None


def detect_family(base: str, source: str) -> str:
    """The family of a base model (`source`: its local folder): a preset's own, else the one whose `matches` accepts
    its model_index.json."""
    if base in PRESETS:
        return PRESETS[base]
    index = _read_config(source, "model_index.json")
    if index is None:
        raise ValueError(f"cannot tell the family of {base!r}: no model_index.json in {source}; set model.family "
                         f"to one of {sorted(FAMILIES)}")
    unet = _read_config(source, "unet/config.json") or {}
    found = [name for name, family in FAMILIES.items() if family.matches(index, unet)]
    if len(found) != 1:
        raise ValueError(f"cannot tell the family of {base!r} (model_index.json names {index.get('_class_name')!r}, "
                         f"matched by {found or 'no family'}); set model.family to one of {sorted(FAMILIES)}")
    return found[0]


def default_resolution(base: str, family: Family) -> int:
    return PRESET_RESOLUTION if base in PRESETS else family.default_resolution


def base_model_identity(source: str) -> str:
    """What stage keys record of a base model: a hub id as given; a local folder with the names, sizes and
    modification times of its files, so that retrained weights (say a new tiny-pretrained) are never
    mistaken for the old ones. Metadata only: hashing a 4 GB folder on every plan would cost seconds."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sha256_of(source, [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
