"""The original Stable Diffusion checkpoint layout (CompVis LDM / Stability SGM), the one single-file checkpoints use
and A1111, ComfyUI and diffusers' `from_single_file` read, from diffusers' and transformers' module names.

- UNet under `model.diffusion_model.`: `input_blocks.<n>.<0 resnet | 1 attention>`, `middle_block.<0-2>`,
  `output_blocks.<n>.<0 resnet | 1 attention | last: upsampler>`, numbered from the UNet's own layout
  (`ldm_unet_name`; SDXL's family uses its SGM names, `sdxl_names.sgm_unet_name`);
- VAE under `first_stage_model.`: `encoder.down.<i>.block.<j>`, `decoder.up.<i>` counted from the bottom, mid
  attention as 1x1 convolutions (`vae_state`);
- text encoders in two layouts (`clip_state`, `open_clip_state`): OpenAI CLIP in transformers' names under
  `<prefix>transformer.text_model.` (SD 1.x, SDXL's first), or OpenCLIP's own (`<prefix>model.`:
  `transformer.resblocks.<n>` with q, k, v fused into `attn.in_proj_*`, `positional_embedding`, `ln_final`,
  `text_projection` as a matrix applied on the right) for SD 2.x and SDXL's second.
Every function raises ValueError on a weight it has no name for, so nothing is dropped silently.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from style_factory.families.sdxl_names import _RESNET, _TOP

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def ldm_unet_name(path: str, layers_per_block: int, up_attention: Sequence[bool]) -> str:
    """The LDM module path of a diffusers UNet2DConditionModel module `path`, for a UNet with `layers_per_block`
    resnets per down block (one more per up block) and, per up block, whether it has attention. Each down block
    takes `layers_per_block` + 1 input blocks (its resnets, then its downsampler), each up block as many output
    blocks, its upsampler riding in the last one after the resnet (and the attention, if any)."""
    per = layers_per_block + 1
    if path in _TOP:
        return _TOP[path]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, kind, index, rest = int(m[2]), m[3], int(m[4]), m[5]
        head = (f"input_blocks.{1 + per * block + index}" if m[1] == "down"
                else f"output_blocks.{per * block + index}")
        head += ".1" if kind == "attentions" else ".0"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, rest = m[1], m[3]
        head = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * int(m[2])}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(m[1])
        return f"output_blocks.{per * block + per - 1}.{2 if up_attention[block] else 1}.conv"
    else:
        raise ValueError(f"no LDM name for UNet module {path!r}")
    if kind == "attentions":  # SpatialTransformer names its parts as Transformer2DModel does
        return f"{head}.{rest}"
    if rest not in _RESNET:
        raise ValueError(f"no LDM name for UNet module {path!r}")
    return f"{head}.{_RESNET[rest]}"


def unet_state(state: dict[str, torch.Tensor], name) -> dict[str, torch.Tensor]:
    """A UNet's weights under `model.diffusion_model.`, each module renamed by `name(module path)`."""
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        out[f"{UNET_PREFIX}{name(module)}.{param}"] = value
    return out


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_SAME = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}


def _vae_name(path: str, num_up: int) -> tuple[str, bool]:
    """The LDM path of VAE module `path`, and whether it is an attention projection (a 1x1 convolution there)."""
    side, _, rest = path.partition(".")
    if path in ("quant_conv", "post_quant_conv"):
        return path, False
    if side in ("encoder", "decoder"):
        if rest in _VAE_SAME:
            return path, False
        if rest == "conv_norm_out":
            return f"{side}.norm_out", False
        if (m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest)) and m[4] in _VAE_RESNET:
            block = int(m[2]) if m[1] == "down" else num_up - 1 - int(m[2])  # LDM counts up blocks from the bottom
            return f"{side}.{m[1]}.{block}.block.{m[3]}.{_VAE_RESNET[m[4]]}", False
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            return f"{side}.down.{m[1]}.downsample.conv", False
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            return f"{side}.up.{num_up - 1 - int(m[1])}.upsample.conv", False
        if (m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest)) and m[2] in _VAE_RESNET:
            return f"{side}.mid.block_{int(m[1]) + 1}.{_VAE_RESNET[m[2]]}", False
        if (m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)) and m[1] in _VAE_ATTENTION:
            return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}", m[1] != "group_norm"
    raise ValueError(f"no LDM name for VAE module {path!r}")


def vae_state(state: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """A VAE's weights (`num_up` decoder up blocks) under `first_stage_model.`."""
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        name, projection = _vae_name(module, num_up)
        if projection and param == "weight":
            value = value[:, :, None, None]  # LDM's mid attention projects with 1x1 convolutions
        out[f"{VAE_PREFIX}{name}.{param}"] = value
    return out


def clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text model in transformers' names (SD 1.x's encoder, SDXL's first) under
    `<prefix>transformer.text_model.`; transformers 5's CLIPTextModel lacks the `text_model.` level, so it is added."""
    out = {}
    for key, value in state.items():
        if key.startswith("text_projection"):
            raise ValueError(f"an OpenAI CLIP text encoder of a single file has no projection: {key!r}")
        out[f"{prefix}transformer.text_model.{key.removeprefix('text_model.')}"] = value
    return out


_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower held in transformers' CLIP classes (SD 2.x's encoder, SDXL's second) in OpenCLIP's
    own names under `<prefix>model.`: q, k, v fused into `attn.in_proj_*` (in that order), the projection as
    `text_projection` (hidden, projection), applied as `x @ text_projection`."""
    out, fused = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key in _OPEN_CLIP:
            out[_OPEN_CLIP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, param = m[1], m[2], m[3]
            if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                fused.setdefault((layer, param), {})[qkv[1]] = value
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
            else:
                raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
        else:
            raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
    for (layer, param), parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"layer {layer} lacks one of q, k, v ({param}): OpenCLIP fuses all three")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in "qkv"])
    return {f"{prefix}model.{key}": value for key, value in out.items()}
