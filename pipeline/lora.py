"""LoRA adapters shared by the methods: add them with peft, export them for diffusers and for A1111/ComfyUI."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` looks for
KOHYA_FILE = "lora_kohya.safetensors"


def add_lora(module: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    """Freeze `module`, add a LoRA adapter (B starts at zero, so the module is unchanged) and return its weights."""
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    return [p for p in module.parameters() if p.requires_grad]


def lora_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # peft would add a resized token embedding (TextBoost's new tokens); those travel as embedding files instead
    return get_peft_model_state_dict(module, save_embedding_layers=False)


def kohya_state_dict(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s LoRA under the SD1.x kohya names: `lora_unet_<path>` / `lora_te_text_model_<path>`,
    each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`."""
    config = module.peft_config["default"]
    state = lora_weights(module)
    if name == "text_encoder":  # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya names keep it
        state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}
    converted = convert_state_dict_to_kohya({f"{name}.{k}": v for k, v in state.items()})
    renamed = {}
    for key, value in converted.items():
        key = key.replace("lora_te1_", "lora_te_")  # diffusers writes SDXL's name; SD1.x has one encoder: lora_te_
        # diffusers stores alpha = rank; the adapter's own alpha keeps the scale alpha / rank of training
        renamed[key] = torch.tensor(float(config.lora_alpha)) if key.endswith(".alpha") else value.contiguous()
    return renamed


def save_lora(out_dir: Path, **modules: torch.nn.Module) -> None:
    """Write the LoRA of each of `unet=`, `text_encoder=` in diffusers format (`pipe.load_lora_weights`) and as a
    kohya-named copy that A1111 and ComfyUI load."""
    # peft's own key names: convert_state_dict_to_diffusers renames attention layers only, and diffusers' loader,
    # finding peft names among the rest (an MLP adapter), would silently drop the renamed ones
    layers = {f"{name}_lora_layers": lora_weights(module) for name, module in modules.items()}
    metadata = {f"{name}_lora_adapter_metadata": module.peft_config["default"].to_dict()
                for name, module in modules.items()}
    StableDiffusionPipeline.save_lora_weights(out_dir, weight_name=DIFFUSERS_FILE, **layers, **metadata)
    kohya = {k: v for name, module in modules.items() for k, v in kohya_state_dict(name, module).items()}
    save_file(kohya, Path(out_dir) / KOHYA_FILE)
