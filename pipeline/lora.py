"""LoRA adapters shared by the methods: add them with peft, export them for diffusers and, under the family's kohya
names, for A1111 and ComfyUI."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from pipeline.families.base import Family

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` looks for
KOHYA_FILE = "lora_kohya.safetensors"
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
    """Write the LoRA of each of `unet=`, `text_encoder=`, `text_encoder_2=` in diffusers format
    (`pipe.load_lora_weights`) and as a kohya-named copy that A1111 and ComfyUI load."""
    # peft's own key names: convert_state_dict_to_diffusers renames attention layers only, and diffusers' loader,
    # finding peft names among the rest (an MLP adapter), would silently drop the renamed ones
    layers = {f"{name}_lora_layers": lora_weights(module) for name, module in modules.items()}
    metadata = {f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict()
                for name, module in modules.items()}
    family.pipeline_class.save_lora_weights(out_dir, weight_name=DIFFUSERS_FILE, **layers, **metadata)
    kohya = {k: v for name, module in modules.items() for k, v in kohya_state_dict(family, name, module).items()}
    save_file(kohya, Path(out_dir) / KOHYA_FILE)
