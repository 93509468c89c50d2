"""What a full fine-tune (StyleBoost, DreamBooth) writes beside its diffusers folder, for the tools that do not read
diffusers folders and for users who cannot keep a whole model per style:

- `<style>-<method>.safetensors`: the single-file checkpoint, every UNet, VAE and text-encoder weight under the
  original LDM keys (the family's `single_file_state_dict`), in fp16 or fp32 (`train.export`);
- `lora-r<rank>/`: a LoRA extracted from the weight difference to the base, as kohya's
  networks/extract_lora_from_models.py does: per Linear / Conv2d layer, dW = W_tuned - W_base flattened to
  (out, in*k*k), its truncated SVD U S V^T cut to `rank`, up = U sqrt(S), down = sqrt(S) V^T, alpha = rank (scale 1);
  written by style_factory/lora.py's `save_lora` like any of the LoRA methods' adapters. Its error,
  ||dW - up down|| / ||dW||, overall and of the worst layer, goes into the model card.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from style_factory.config import ExportConfig
from style_factory.families.base import Components, unwrapped
from style_factory.lora import add_lora, save_lora

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def single_file_name(style: str, method: str) -> str:
    return f"{style}-{method}.safetensors"


def lora_dir_name(rank: int) -> str:
    return f"lora-r{rank}"


def write_single_file(path: Path, models: Components, dtype: str) -> None:
    """`models` as one safetensors file in the original LDM layout, floating-point weights in `dtype`."""
    state = models.family.single_file_state_dict(models)
    save_file({key: (value.to(DTYPES[dtype]) if value.is_floating_point() else value).contiguous()
               for key, value in state.items()}, str(path))


def lora_targets(module: nn.Module) -> list[str]:
    """The layers a LoRA can carry: every Linear and Conv2d, less a text encoder's output projection (SDXL's
    `text_projection`, which A1111 does not patch)."""
    return [path for path, layer in module.named_modules()
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and path != "text_projection"]


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, rank), down (rank, in*k*k), squared residual norm) of `delta`'s truncated SVD, padded with zeros to
    `rank` where the layer has fewer singular values."""
    flat = delta.detach().flatten(1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    kept = min(rank, len(s))
    up, down = torch.zeros(len(flat), rank), torch.zeros(rank, flat.shape[1])
    up[:, :kept] = u[:, :kept] * s[:kept].sqrt()
    down[:kept] = s[:kept].sqrt()[:, None] * vh[:kept]
    return up, down, float((s[kept:] ** 2).sum())


@dataclass
class Extraction:
    """A LoRA extracted from a fine-tune: per component, a copy of the base module carrying it, and its error."""

    rank: int
    modules: dict[str, nn.Module]
    relative_error: float  # ||dW - BA|| / ||dW|| over every layer together
    worst_layer: str  # "<component>.<module path>"
    worst_relative_error: float
    layers: int

    def facts(self) -> dict:
        return {"rank": self.rank, "folder": lora_dir_name(self.rank), "layers": self.layers,
                "relative_error": self.relative_error, "worst_layer": self.worst_layer,
                "worst_relative_error": self.worst_relative_error}


def extract_lora(base: Components, tuned: Components, names: list[str], rank: int) -> Extraction:
    """The rank-`rank` LoRA of `tuned` - `base` over the layers of components `names` whose weights changed."""
    modules, residual, total, worst = {}, 0.0, 0.0, ("", 0.0)
    count = 0
    for name in names:
        before, after = unwrapped(base.module(name)), unwrapped(tuned.module(name))
        factors = {}
        for path in lora_targets(before):
            delta = after.get_submodule(path).weight.detach() - before.get_submodule(path).weight.detach()
            norm = float(delta.float().pow(2).sum())
            if norm == 0:
                continue
            up, down, rest = low_rank_factors(delta, rank)
            factors[path] = (up, down)
            residual, total = residual + rest, total + norm
            if (rest / norm) ** 0.5 >= worst[1]:
                worst = (f"{name}.{path}", (rest / norm) ** 0.5)
        if not factors:
            continue
        adapted = copy.deepcopy(before)
        add_lora(adapted, rank, float(rank), sorted(factors))
        with torch.no_grad():
            for path, (up, down) in factors.items():
                layer = adapted.get_submodule(path)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(down.reshape(a.shape))
                b.copy_(up.reshape(b.shape))
        modules[name] = adapted
        count += len(factors)
    return Extraction(rank=rank, modules=modules, relative_error=(residual / total) ** 0.5 if total else 0.0,
                      worst_layer=worst[0], worst_relative_error=worst[1], layers=count)


@dataclass
class FullModelFiles:
    """What `export_model` adds to a full fine-tune's folder, and the facts its model card records of them."""

    write: Callable[[Path], None] = lambda out: None
    facts: dict = field(default_factory=dict)


def full_model_files(style: str, method: str, models: Components, base: Callable[[], Components],
                     trained: list[str], cfg: ExportConfig) -> FullModelFiles:
    """The single file and the extracted LoRA of `models` (their trained components `trained`), as `cfg` asks;
    nothing for a model that carries adapters (a LoRA method's export is its adapter). `base` gives the untuned
    components, asked for only when a LoRA is extracted."""
    if any(hasattr(unwrapped(models.module(name)), "peft_config") for name in trained):
        return FullModelFiles()
    extraction = extract_lora(base(), models, trained, cfg.extract_lora_rank) if cfg.extract_lora_rank else None
    facts = {}
    if cfg.single_file:
        facts["single_file"] = {"file": single_file_name(style, method), "dtype": cfg.single_file_dtype}
    if extraction is not None and extraction.modules:
        facts["extracted_lora"] = extraction.facts()

    def write(out: Path) -> None:
        if cfg.single_file:
            write_single_file(out / single_file_name(style, method), models, cfg.single_file_dtype)
        if extraction is not None and extraction.modules:
            (out / lora_dir_name(extraction.rank)).mkdir()
            save_lora(out / lora_dir_name(extraction.rank), models.family, **extraction.modules)

    return FullModelFiles(write, facts)
