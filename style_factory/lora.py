"""LoRA adapters shared by the methods: add them with peft, export them under the family's kohya names, the one
layout diffusers, A1111 and ComfyUI all load."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from style_factory.families.base import Family

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` looks for
KOHYA_FILE = "lora_kohya.safetensors"  # the same file, under the name earlier exports gave ComfyUI and A1111
# the prefix diffusers' convert_state_dict_to_kohya gives each component (SDXL's names)
DIFFUSERS_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def add_lora(module: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    """Freeze `module`, add a LoRA adapter (B starts at zero, so the module is unchanged) and return its weights."""
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    return [p for p in module.parameters() if p.requires_grad]


def lora_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # peft would add a resized token embedding (TextBoost's new tokens); those travel as embedding files instead
    return get_peft_model_state_dict(module, save_embedding_layers=False)


def kohya_state_dict(family: Family, name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s LoRA (component `name`) under the family's kohya names: `<prefix>_<module path, '.' -> '_'>`,
    each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`."""
    config = module.peft_config["default"]
    weights = lora_weights(module)
    if name.startswith("text_encoder"):
        weights |= zero_out_projections(module, weights)
    state = {}
    for key, value in weights.items():
        path, weight = key.rsplit(".lora_", 1)  # peft: "<module path>.lora_A.weight"
        state[f"{name}.{family.kohya_module_name(name, path)}.lora_{weight}"] = value
    ours, theirs = family.kohya_prefixes[name] + "_", DIFFUSERS_KOHYA_PREFIXES[name] + "_"
    renamed = {}
    for key, value in convert_state_dict_to_kohya(state).items():
        key = ours + key[len(theirs):] if ours != theirs else key
        # diffusers stores alpha = rank; the adapter's own alpha keeps the scale alpha / rank of training
        renamed[key] = torch.tensor(float(config.lora_alpha)) if key.endswith(".alpha") else value.contiguous()
    return renamed


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
    """Write the LoRA of each of `unet=`, `text_encoder=`, `text_encoder_2=` in kohya's layout (with its alpha), once
    as `pytorch_lora_weights.safetensors` (the file `pipe.load_lora_weights(folder)` reads) and once, the same bytes,
    as `lora_kohya.safetensors`.

    One layout for every tool: diffusers converts kohya files when it loads them, to the same outputs as the trained
    adapter (tests/test_lora_files.py), while ComfyUI and A1111 read kohya names only. diffusers' own layout lost
    StyleDrop's attention layers and the alpha / rank scale in ComfyUI, missed TextBoost's text-encoder keys there and
    matched nothing in A1111, so a user had to know which of two files to pick; now either name loads everywhere."""
    kohya = {k: v for name, module in modules.items() for k, v in kohya_state_dict(family, name, module).items()}
    data = safetensors.torch.save(kohya)
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        (Path(out_dir) / name).write_bytes(data)
