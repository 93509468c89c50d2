"""Adapters shared by the LoRA methods: add them with peft (LoRA, DoRA or LoKr), export them under the family's
kohya names, the layout A1111 and ComfyUI load, and for diffusers in the layout it loads.

What each tool does with each kind (docs/use-your-model.md):
- LoRA: one kohya-layout file under both names; diffusers converts it when it loads it.
- DoRA: the kohya file adds `dora_scale` per module. diffusers drops `dora_scale` from kohya files (with a warning),
  so its file is diffusers' own peft layout (`lora_magnitude_vector`, `.weight` added in a text encoder, where
  transformers looks for it; the adapter config in the metadata). peft keeps
  one magnitude per output row, m / ||W + s BA|| per row; ComfyUI reads a `dora_scale` of shape (out, 1) as such but
  divides by the base weight's row norm ||W|| (comfy/weight_adapter/base.py `weight_decompose`), so the file holds
  m ||W|| / ||W + s BA||, which gives peft's weight there exactly. A1111 (1.10) applies `dora_scale` per input column
  only: peft's DoRA does not load there correctly.
- LoKr: the kohya / LyCORIS file holds `lokr_w1`, `lokr_w2` (or their `_a`, `_b` factors) with peft's alpha / rank
  folded into the w1 factor and no `alpha` (both tools scale by alpha / rank only where a factor is decomposed,
  peft always). diffusers' pipeline loader reads LoRA keys only; its UNet loads the peft-layout file
  (`unet.load_lora_adapter`), as `load_adapter` does. UNet adapters only (StyleDrop): diffusers has no LoKr loader
  for a text encoder."""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from peft import LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict

from style_factory.families.base import Family

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` looks for
KOHYA_FILE = "lora_kohya.safetensors"  # kohya's layout, for ComfyUI and A1111 (a LoRA: the same bytes as the other)
ADAPTERS = ("lora", "dora", "lokr")  # what `method_options.<method>.adapter` may name


def adapter_config(kind: str, rank: int, alpha: float, targets: list[str]) -> PeftConfig:
    """peft's config of an adapter of `kind` (ADAPTERS); each starts as a no-op (B = 0, LoKr's w1 = 0)."""
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian",
                      use_dora=kind == "dora")


def adapter_kind(module: torch.nn.Module) -> str:
    config = module.peft_config["default"]
    return "lokr" if isinstance(config, LoKrConfig) else "dora" if config.use_dora else "lora"


def add_lora(module: torch.nn.Module, rank: int, alpha: float, targets: list[str],
             kind: str = "lora") -> list[torch.nn.Parameter]:
    """Freeze `module`, add an adapter of `kind` (it leaves the module unchanged) and return its weights."""
    module.requires_grad_(False)
    module.add_adapter(adapter_config(kind, rank, alpha, targets))
    return [p for p in module.parameters() if p.requires_grad]


def lora_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # peft would add a resized token embedding (TextBoost's new tokens); those travel as embedding files instead
    return get_peft_model_state_dict(module, save_embedding_layers=False)


def kohya_name(family: Family, component: str, path: str) -> str:
    """The kohya module name of `path` in `component`: `<prefix>_<module path, '.' -> '_'>`."""
    return f"{family.kohya_prefixes[component]}_{family.kohya_module_name(component, path).replace('.', '_')}"


def kohya_parts(kind: str, layer: torch.nn.Module, parts: dict[str, torch.Tensor], config: PeftConfig
                ) -> dict[str, torch.Tensor]:
    """One adapted layer's tensors under kohya's part names, from peft's (`A.weight`, `w1`, ...)."""
    if kind == "lokr":
        scale = config.alpha / config.r
        first = "w1" if "w1" in parts else "w1_a"
        return {f"lokr_{part}": value * scale if part == first else value for part, value in parts.items()}
    down, up = parts["A.weight"], parts["B.weight"]
    state = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(config.lora_alpha))}
    if "magnitude_vector" in parts:
        base = layer.get_base_layer().weight.detach().float()
        merged = base + (config.lora_alpha / config.r) * (up.flatten(1).float() @ down.flatten(1).float()).reshape(
            base.shape)
        rows = (1,) * (base.dim() - 1)
        ratio = base.flatten(1).norm(dim=1) / merged.flatten(1).norm(dim=1)
        state["dora_scale"] = (parts["magnitude_vector"].flatten().float() * ratio).reshape(len(base), *rows).to(down.dtype)
    return state


def kohya_state_dict(family: Family, name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s adapter (component `name`) under the family's kohya names, each module with its kind's parts:
    `.lora_down.weight`, `.lora_up.weight`, `.alpha` (and DoRA's `.dora_scale`), or LoKr's `.lokr_*`."""
    config, kind = module.peft_config["default"], adapter_kind(module)
    weights = lora_weights(module)
    if kind != "lokr" and name.startswith("text_encoder"):
        weights |= zero_out_projections(module, weights)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():  # peft: "<module path>.lora_A.weight", "<path>.lokr_w1", ...
        path, part = key.rsplit(".lokr_" if kind == "lokr" else ".lora_", 1)
        layers.setdefault(path, {})[part] = value
    return {f"{kohya_name(family, name, path)}.{part}": value.contiguous()
            for path, parts in layers.items()
            for part, value in kohya_parts(kind, module.get_submodule(path), parts, config).items()}


def zero_out_projections(encoder: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A zero LoRA on `out_proj` of every attention whose q/k/v have one and whose out_proj has none.

    It changes nothing (its up matrix is zero), but two loaders need it in a kohya file: diffusers tells the kohya
    text-encoder layout by its out_proj keys, and A1111 patches open_clip's fused attention (SDXL's second encoder)
    only when q, k, v and out are all there."""
    added = {}
    for key, down in weights.items():
        if ".self_attn.q_proj.lora_A" in key:
            out = key.replace(".q_proj.", ".out_proj.")
            if out not in weights:
                layer = encoder.get_submodule(key.split(".q_proj.")[0] + ".out_proj")
                layer = getattr(layer, "base_layer", layer)
                added[out] = torch.zeros(len(down), layer.in_features, dtype=down.dtype, device=down.device)
                added[out.replace(".lora_A", ".lora_B")] = torch.zeros(layer.out_features, len(down),
                                                                       dtype=down.dtype, device=down.device)
    return added


def save_lora(out_dir: Path, family: Family, **modules: torch.nn.Module) -> None:
    """Write the adapter of each of `unet=`, `text_encoder=`, `text_encoder_2=` in kohya's layout (with its alpha)
    as `lora_kohya.safetensors`, and as `pytorch_lora_weights.safetensors` (the file `pipe.load_lora_weights(folder)`
    reads): for a LoRA the same bytes, for DoRA and LoKr diffusers' own layout with the adapter config.

    One layout for every tool where one loads everywhere: diffusers converts kohya LoRA files when it loads them, to
    the same outputs as the trained adapter (tests/test_lora_files.py), while ComfyUI and A1111 read kohya names only.
    diffusers' own layout lost StyleDrop's attention layers and the alpha / rank scale in ComfyUI, missed TextBoost's
    text-encoder keys there and matched nothing in A1111."""
    kohya = {k: v for name, module in modules.items() for k, v in kohya_state_dict(family, name, module).items()}
    (Path(out_dir) / KOHYA_FILE).write_bytes(safetensors.torch.save(kohya))
    if all(adapter_kind(module) == "lora" for module in modules.values()):
        (Path(out_dir) / DIFFUSERS_FILE).write_bytes(safetensors.torch.save(kohya))
        return
    layers = {}
    for name, module in modules.items():
        weights = lora_weights(module)
        if name.startswith("text_encoder"):  # transformers looks for a text encoder's magnitude under `.weight`
            weights = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in weights.items()}
        layers[f"{name}_lora_layers"] = weights
        config = module.peft_config["default"].to_dict()
        layers[f"{name}_lora_adapter_metadata"] = json.loads(json.dumps(config, default=sorted))  # sets -> lists
    family.pipeline_class.save_lora_weights(out_dir, weight_name=DIFFUSERS_FILE, **layers)


def load_adapter(pipe: DiffusionPipeline, model_dir: str) -> None:
    """Load what `save_lora` wrote into `pipe`: `pipe.load_lora_weights` for LoRA and DoRA, the UNet's own loader for
    LoKr (diffusers' pipeline loader rejects keys without "lora")."""
    path = Path(model_dir) / DIFFUSERS_FILE
    with safetensors.safe_open(path, "pt") as file:
        lokr = any(".lokr_" in key for key in file.keys())
    if lokr:
        pipe.unet.load_lora_adapter(str(model_dir), weight_name=DIFFUSERS_FILE, prefix="unet")
    else:
        pipe.load_lora_weights(model_dir)
