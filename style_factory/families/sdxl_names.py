"""SDXL UNet module paths in the original Stability (SGM) naming, the one kohya's own SDXL LoRAs use.

kohya sd-scripts trains SDXL on its SGM-named UNet (library/sdxl_original_unet.py), so its LoRA keys read
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; AUTOMATIC1111 and ComfyUI both load that naming on
SDXL. `sgm_unet_name` maps a diffusers UNet2DConditionModel path to it, for the SDXL base 1.0 layout only:

- 3 down blocks of 2 resnets each; down blocks 1 and 2 with attention (2 and 10 transformer blocks), 0 and 1
  with a downsampler: input_blocks 0 (conv_in), 1-2, 3 (downsampler), 4-5, 6 (downsampler), 7-8;
- mid block resnet, attention (10 transformer blocks), resnet: middle_block 0, 1, 2;
- 3 up blocks of 3 resnets each; up blocks 0 and 1 with attention (10 and 2 transformer blocks) and an
  upsampler, third in the block's last output block: output_blocks 0-8, upsamplers at 2.2 and 5.2.

Standard library only: the exporter calls it without building a model.
"""
from __future__ import annotations

import re

# diffusers ResnetBlock2D's parts -> SGM ResBlock's (in_layers = norm, SiLU, conv; out_layers = norm, SiLU,
# dropout, conv); diffusers' one shared `nonlinearity` has no single SGM counterpart
_RESNET = {
    "": "",
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "dropout": "out_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# the parts of an attention (Transformer2DModel) and of its transformer blocks: SGM names them as diffusers does
_TRANSFORMER_BLOCK = {"", "norm1", "norm2", "norm3", "ff", "ff.net", "ff.net.0", "ff.net.0.proj", "ff.net.1",
                      "ff.net.2"} | {f"{attn}{part}" for attn in ("attn1", "attn2")
                                     for part in ("", ".to_q", ".to_k", ".to_v", ".to_out", ".to_out.0", ".to_out.1")}
_ATTENTION = {"", "norm", "proj_in", "proj_out", "transformer_blocks"}

_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding": "time_embed",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding": "label_emb.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# SDXL base: transformer blocks per attention, by block; resnets per block (down, up)
_DOWN_DEPTH = {1: 2, 2: 10}
_MID_DEPTH = 10
_UP_DEPTH = {0: 10, 1: 2}
_DOWN_RESNETS, _UP_RESNETS = 2, 3

_N = r"(0|[1-9]\d*)"  # an index as module paths write it (no "01")
_BLOCK = re.compile(rf"(down_blocks|up_blocks)\.{_N}\.(resnets|attentions)\.{_N}(?:\.(.*))?")
_MID = re.compile(rf"mid_block\.(resnets|attentions)\.{_N}(?:\.(.*))?")
_TRANSFORMER = re.compile(rf"transformer_blocks\.{_N}(?:\.(.*))?")
_DOWNSAMPLER = re.compile(rf"down_blocks\.{_N}\.downsamplers\.0(\.conv)?")
_UPSAMPLER = re.compile(rf"up_blocks\.{_N}\.upsamplers\.0(\.conv)?")


def _attention(rest: str, depth: int) -> str | None:
    """`rest` inside an attention of `depth` transformer blocks: SGM keeps the name, if the part exists."""
    if rest in _ATTENTION:
        return rest
    m = _TRANSFORMER.fullmatch(rest)
    if m and int(m[1]) < depth and (m[2] or "") in _TRANSFORMER_BLOCK:
        return rest
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _convert(path: str) -> str | None:
    if path in _TOP:
        return _TOP[path]
    if m := _BLOCK.fullmatch(path):
        kind, block, part, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5] or ""
        down = kind == "down_blocks"
        resnets, depths = (_DOWN_RESNETS, _DOWN_DEPTH) if down else (_UP_RESNETS, _UP_DEPTH)
        if block > 2 or index >= resnets or (part == "attentions" and block not in depths):
            return None
        # after input_blocks.0 (conv_in) each down block takes 3 input blocks: its 2 resnets (each with its
        # attention) and the downsampler; each up block takes 3 output blocks, the upsampler riding in the last
        number = 1 + 3 * block + index if down else 3 * block + index
        prefix = "input_blocks" if down else "output_blocks"
        if part == "resnets":
            inner = _RESNET.get(rest)
            # a resnet has a shortcut conv only where it changes width: the first of down blocks 1 and 2, and
            # every up resnet (its input has the skip connection concatenated)
            if inner is None or (rest == "conv_shortcut" and down and (block == 0 or index > 0)):
                return None
            return _join(f"{prefix}.{number}.0", inner)
        inner = _attention(rest, depths[block])
        return None if inner is None else _join(f"{prefix}.{number}.1", inner)
    if m := _MID.fullmatch(path):
        part, index, rest = m[1], int(m[2]), m[3] or ""
        if part == "resnets" and index < 2 and rest != "conv_shortcut" and (inner := _RESNET.get(rest)) is not None:
            return _join(f"middle_block.{2 * index}", inner)
        if part == "attentions" and index == 0 and (inner := _attention(rest, _MID_DEPTH)) is not None:
            return _join("middle_block.1", inner)
        return None
    # the last down block has no downsampler and the last up block no upsampler
    if (m := _DOWNSAMPLER.fullmatch(path)) and int(m[1]) < 2:
        return f"input_blocks.{3 + 3 * int(m[1])}.0" + (".op" if m[2] else "")  # SGM's Downsample calls its conv `op`
    if (m := _UPSAMPLER.fullmatch(path)) and int(m[1]) < 2:
        # in the block's last output block, after its resnet (.0) and attention (.1): up blocks 0 and 1 have both
        return f"output_blocks.{3 * int(m[1]) + 2}.2" + (".conv" if m[2] else "")
    return None


def sgm_unet_name(diffusers_path: str) -> str:
    """The SGM module path of `diffusers_path`, a module path of SDXL base's diffusers UNet; kohya's LoRA key is
    `lora_unet_` + the result with '.' -> '_'. E.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
    -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `up_blocks.0.upsamplers.0.conv` -> `output_blocks.2.2.conv`.

    Covers every module holding weights and the resnets, attentions and samplers around them. Raises ValueError
    for a path that is not an SDXL base UNet module or has no SGM counterpart (`time_proj`, `nonlinearity`...)."""
    sgm = _convert(diffusers_path)
    if sgm is None:
        raise ValueError(f"not a module of the SDXL base UNet with an SGM name: {diffusers_path!r}")
    return sgm
