"""Which kohya-style LoRA key names ComfyUI and AUTOMATIC1111 resolve onto a module of the real SD 1.x / SDXL model.

Each tool's name rules, rewritten from its source:
- ComfyUI: comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`; comfy/utils.py
  `unet_to_diffusers` and its tables (UNET_MAP_RESNET, UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, UNET_MAP_BASIC).
- AUTOMATIC1111 (v1.10): extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`,
  `assign_network_names_to_compvis_modules`, `load_network`, `network_apply_weights`; network_lora.py
  `ModuleTypeLora.create_module`.
Both tools run UNets in the original ldm / SGM naming (`input_blocks.4.1...`), so each tool's name is mapped back
to the diffusers / transformers module path of `modules` (the dict of tests/real_shapes.py), and a key counts as
resolved only when that path is a torch.nn.Linear or Conv2d there.

Both tools then scale each module's up @ down by alpha / rank (`lora_scales`) and reshape it to the weight
(`misfit_shapes`), the same way in each.

DoRA's `dora_scale` and LoKr's factors count as parts; `comfyui_merged` and `a1111_merged` compute the weight each
tool patches from them. Left out: the other formats both tools read (diffusers / peft `unet.…lora_A`, `lycoris_`,
`text_encoders.`, LoHa / OFT / LoKr's Tucker core), Stable Cascade / SD3 / Flux names, SD 2.x.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

Target = tuple[str, str]  # (component of `modules`, module path in kohya's spelling)
COMPONENTS = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")  # LyCORIS's LoKr
# a kohya LoRA's parts, DoRA's magnitude and LoKr's factors (comfy/weight_adapter/lora.py, lokr.py; A1111
# network_lora.py, network_lokr.py, network.py)
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", *(f".{p}" for p in LOKR_PARTS))
PAIR = {"lora_down.weight", "lora_up.weight"}  # both tools build a LoRA only from both matrices


def _complete(parts: set[str]) -> bool:
    """Whether both tools build a module from `parts`: LoRA's pair, or LoKr's w1 and w2 (each whole, or as its
    `_a` and `_b` factors)."""
    return PAIR <= parts or all(f"lokr_{w}" in parts or {f"lokr_{w}_a", f"lokr_{w}_b"} <= parts for w in ("w1", "w2"))


def _us(path: str) -> str:
    return path.replace(".", "_")


# ---- the UNet's ldm / SGM names, shared by both tools' own models (openaimodel.UNetModel)

_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _sgm_name(path: str, per_block: int, up_attention: list[bool]) -> str | None:
    """A diffusers UNet path's SGM path: each down block takes `per_block` + 1 input blocks (its resnets, then the
    downsampler), each up block `per_block` + 1 output blocks (the upsampler rides in the last one)."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        block, index, kind, rest = int(m[2]), int(m[4]), m[3], m[5]
        number = 1 + (per_block + 1) * block + index if m[1] == "down" else (per_block + 1) * block + index
        head = f"{'input' if m[1] == 'down' else 'output'}_blocks.{number}.{1 if kind == 'attentions' else 0}"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, rest = m[1], m[3]
        head = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * int(m[2])}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(per_block + 1) * (int(m[1]) + 1)}.0.op"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(m[1])
        return f"output_blocks.{(per_block + 1) * block + per_block}.{2 if up_attention[block] else 1}.conv"
    else:
        return None
    if kind == "attentions":  # SpatialTransformer names its parts as diffusers' Transformer2DModel does
        return f"{head}.{rest}"
    inner = _SGM_RESNET.get(rest)
    return None if inner is None else f"{head}.{inner}"


def _sgm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers path -> SGM path for each module of `unet` holding a weight, for the layout of its config."""
    per_block = unet.config.layers_per_block
    up_attention = ["CrossAttn" in kind for kind in unet.config.up_block_types]
    names = {}
    for path, module in unet.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            if (sgm := _sgm_name(path, per_block, up_attention)) is not None:
                names[path] = sgm
    return names


def _is_layer(modules: Mapping[str, nn.Module], target: Target) -> bool:
    component, path = target
    root = modules[component]
    # kohya spells text paths with `text_model.`: transformers 5's CLIPTextModel dropped that level (the
    # WithProjection model keeps it)
    if path.startswith("text_model.") and not hasattr(root, "text_model"):
        path = path[len("text_model."):]
    try:
        return isinstance(root.get_submodule(path), (nn.Linear, nn.Conv2d))
    except AttributeError:
        return False


def _parts(keys: list[str], family: str, modules: Mapping[str, nn.Module]) -> dict[str, set[str]]:
    """Each key prefix (module name) with its parts, once `family` and `modules` are checked."""
    if family not in COMPONENTS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(COMPONENTS)}")
    if missing := [c for c in COMPONENTS[family] if c not in modules]:
        raise ValueError(f"family {family!r} needs modules {missing}")
    parts: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, part = key.partition(".")
        parts.setdefault(prefix, set()).add(part)
    return parts


def _report(keys: list[str], parts: Mapping[str, set[str]], targets: Mapping[str, Target | None],
            modules: Mapping[str, nn.Module]) -> list[str]:
    """The keys outside kohya's LoRA parts, or whose prefix lacks the down/up pair or a real Linear/Conv2d target."""
    good = {prefix for prefix, target in targets.items()
            if target is not None and _complete(parts[prefix]) and _is_layer(modules, target)}
    return [key for key in keys if not key.endswith(SUFFIXES) or key.partition(".")[0] not in good]


# ---- ComfyUI

# comfy/utils.py's tables: the diffusers parts unet_to_diffusers names, by where they sit
_COMFY_ATTENTION = {"proj_in", "proj_out", "norm"}  # UNET_MAP_ATTENTIONS
_COMFY_BLOCK = {"norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"} | {  # TRANSFORMER_BLOCKS
    f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
_COMFY_BASIC = set(_SGM_TOP)  # UNET_MAP_BASIC, less its class_embedding (no SD 1.x / SDXL UNet has one)
_COMFY_CLIP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2")  # comfy/lora.py LORA_CLIP_MAP


def _comfy_lists(path: str) -> bool:
    """Whether comfy/utils.py unet_to_diffusers has a diffusers name for `path`."""
    if path in _COMFY_BASIC or re.fullmatch(r"down_blocks\.\d+\.downsamplers\.0\.conv|"
                                            r"up_blocks\.\d+\.upsamplers\.0\.conv", path):
        return True
    m = re.fullmatch(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+\.(.+)", path)
    if m is None:
        return False
    if m[1] == "resnets":
        return m[2] in _SGM_RESNET  # UNET_MAP_RESNET lists the same six parts
    block = re.fullmatch(r"transformer_blocks\.\d+\.(.+)", m[2])
    return m[2] in _COMFY_ATTENTION or (block is not None and block[1] in _COMFY_BLOCK)


def comfyui_names(family: str, modules: Mapping[str, nn.Module]) -> dict[str, Target]:
    """ComfyUI's kohya key map for `family`, each name with the module of `modules` it patches.

    UNet (comfy/lora.py model_lora_keys_unet): `lora_unet_` + every weight name of ComfyUI's SGM model with
    '.' -> '_', plus `lora_unet_` + every diffusers name comfy/utils.py unet_to_diffusers lists, for SD 1.x and
    SDXL alike. Text (model_lora_keys_clip): only the q/k/v/out projections and fc1/fc2 of encoder layers below 32:
    `lora_te_` and `lora_te1_` for CLIP-L, and on SDXL `lora_te2_` for bigG; plus OneTrainer's
    `lora_te1_text_projection` / `lora_te2_text_projection`."""
    names: dict[str, Target] = {}
    for path, sgm in _sgm_names(modules["unet"]).items():
        names[f"lora_unet_{_us(sgm)}"] = ("unet", path)
        if _comfy_lists(path):
            names[f"lora_unet_{_us(path)}"] = ("unet", path)
    encoders = {"text_encoder": ("lora_te_", "lora_te1_")}
    if family == "sdxl":  # clip_g gets lora_te2_ once clip_l is present
        encoders["text_encoder_2"] = ("lora_te2_",)
        names["lora_te2_text_projection"] = ("text_encoder_2", "text_projection")
    # ComfyUI's CLIP-L has a projection; transformers' CLIPTextModel has none, so this one always reports
    names["lora_te1_text_projection"] = ("text_encoder", "text_projection")
    for component, prefixes in encoders.items():
        for layer in range(32):  # ComfyUI's loop bound
            for part in _COMFY_CLIP:
                path = f"text_model.encoder.layers.{layer}.{part}"
                names.update({prefix + _us(path): (component, path) for prefix in prefixes})
    return names


def comfyui_unresolved(keys: Iterable[str], family: str, modules: Mapping[str, nn.Module]) -> list[str]:
    """The keys ComfyUI would not patch onto a real Linear/Conv2d of `modules`: prefix not in its key map
    (comfyui_names), a part other than kohya's `.lora_down.weight` / `.lora_up.weight` / `.alpha`, or a
    prefix without both matrices (comfy/lora.py load_lora reads `lora_up` with `lora_down` and warns
    "lora key not loaded" for the rest)."""
    keys = list(keys)
    parts, names = _parts(keys, family, modules), comfyui_names(family, modules)
    return _report(keys, parts, {prefix: names.get(prefix) for prefix in parts}, modules)


# ---- AUTOMATIC1111

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _compvis(name: str) -> str:
    """networks.py convert_diffusers_name_to_compvis (not its SD 2 branch): diffusers-style names to ldm ones by
    fixed arithmetic written for SD 1's layout (3 ldm blocks per diffusers block; the upsampler at position 1 in
    up block 0, 2 elsewhere). Used for every model, SDXL included; other names come back unchanged."""
    def inner(kind: str, rest: str) -> str:  # resnet parts renamed, attention parts kept
        return rest if kind == "attentions" else _A1111_RESNET.get(rest, rest)

    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{2 * int(m[1]) - 2}{m[2]}"
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        number = 3 * int(m[2]) + int(m[4]) + (1 if m[1] == "down" else 0)  # input_blocks.0 is conv_in
        head = "input" if m[1] == "down" else "output"
        return f"diffusion_model_{head}_blocks_{number}_{1 if m[3] == 'attentions' else 0}_{inner(m[3], m[5])}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        number = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"diffusion_model_middle_block_{number}_{inner(m[1], m[3])}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        return f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):  # to open_clip's names
        rest = m[2]
        for old, new in (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn")):
            if old in rest:  # the first that occurs, as A1111's if / elif chain
                rest = rest.replace(old, new)
                break
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return name


def _a1111_layers(family: str, modules: Mapping[str, nn.Module]) -> dict[str, Target]:
    """networks.py assign_network_names_to_compvis_modules: A1111's own model's module names, '.' -> '_', each
    with its counterpart in `modules` (modules without one, such as open_clip's layer norms, are left out)."""
    layers = {f"diffusion_model_{_us(sgm)}": ("unet", path) for path, sgm in _sgm_names(modules["unet"]).items()}
    clip_l = [("" if hasattr(modules["text_encoder"], "text_model") else "text_model.") + path
              for path, _ in modules["text_encoder"].named_modules() if path]  # kohya's spelling, see _is_layer
    if family == "sd1":  # cond_stage_model.wrapped: FrozenCLIPEmbedder, transformers' CLIPTextModel at .transformer
        return layers | {f"transformer_{_us(path)}": ("text_encoder", path) for path in clip_l}
    # SDXL: conditioner.embedders[i].wrapped, named with their index; embedder 1 is open_clip's bigG, whose
    # attention is one nn.MultiheadAttention (q, k and v packed in in_proj_weight)
    layers |= {f"0_transformer_{_us(path)}": ("text_encoder", path) for path in clip_l}
    for i in range(modules["text_encoder_2"].config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}", f"1_model_transformer_resblocks_{i}"
        layers[f"{theirs}_attn"] = ("text_encoder_2", f"{ours}.self_attn")
        layers[f"{theirs}_attn_out_proj"] = ("text_encoder_2", f"{ours}.self_attn.out_proj")
        layers[f"{theirs}_mlp_c_fc"] = ("text_encoder_2", f"{ours}.mlp.fc1")
        layers[f"{theirs}_mlp_c_proj"] = ("text_encoder_2", f"{ours}.mlp.fc2")
    return layers


def _a1111_match(prefix: str, layers: Mapping[str, Target]) -> tuple[str, Target] | None:
    """networks.py load_network's lookup: the converted name, then a q/k/v name on a MultiheadAttention
    (re_x_proj), then the name as it is with `lora_unet` -> `diffusion_model` ("SDXL loras seem to already have
    correct compvis keys") or `lora_te1_text_model` -> `0_transformer_text_model` / `transformer_text_model`.
    Returns A1111's module name (its sd_key) and the target."""
    key = _compvis(prefix)
    if key in layers:
        return key, layers[key]
    if (m := re.fullmatch(r"(.*)_([qkv]_proj)", key)) and m[1] in layers:
        component, path = layers[m[1]]
        return key, (component, f"{path}.{m[2]}")
    if "lora_unet" in prefix:
        candidates = [prefix.replace("lora_unet", "diffusion_model")]
    elif "lora_te1_text_model" in prefix:
        candidates = [prefix.replace("lora_te1_text_model", head)
                      for head in ("0_transformer_text_model", "transformer_text_model")]
    else:
        return None
    return next(((key, layers[key]) for key in candidates if key in layers), None)


def a1111_unresolved(keys: Iterable[str], family: str, modules: Mapping[str, nn.Module]) -> list[str]:
    """The keys AUTOMATIC1111 would not patch onto a real Linear/Conv2d of `modules`: unmatched by _a1111_match,
    outside kohya's LoRA parts, or without both matrices (network_lora.py builds a LoRA only from lora_up and
    lora_down). And on SDXL's bigG: network_apply_weights patches a MultiheadAttention only when the LoRA holds
    all of its q, k, v and out projections (out_proj's own forward never runs), so a layer missing any of the
    four is silently left out: those keys are reported too."""
    keys = list(keys)
    parts, layers = _parts(keys, family, modules), _a1111_layers(family, modules)
    matches = {prefix: _a1111_match(prefix, layers) for prefix in parts}
    loaded = {match[0] for prefix, match in matches.items() if match is not None and _complete(parts[prefix])}

    def applied(sd_key: str) -> bool:
        m = re.fullmatch(r"(1_model_transformer_resblocks_\d+_attn)_(?:[qkv]|out)_proj", sd_key)
        return m is None or all(f"{m[1]}_{p}_proj" in loaded for p in ("q", "k", "v", "out"))

    targets = {prefix: match[1] if match is not None and applied(match[0]) else None
               for prefix, match in matches.items()}
    return _report(keys, parts, targets, modules)


# ---- what both tools do with a resolved pair


def lora_scales(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each module's factor on up @ down at strength 1, as both tools compute it: alpha / rank, the rank being
    lora_down's first dimension, and 1.0 where the file has no alpha (ComfyUI comfy/weight_adapter/lora.py
    `calculate_weight`; A1111 network.py NetworkModule.calc_scale)."""
    scales = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            prefix = key[:-len(".lora_down.weight")]
            alpha = state.get(f"{prefix}.alpha")
            scales[prefix] = 1.0 if alpha is None else float(alpha) / down.shape[0]
    return scales


def misfit_shapes(state: Mapping[str, torch.Tensor], family: str, modules: Mapping[str, nn.Module]) -> list[str]:
    """The prefixes whose up @ down cannot be reshaped to the weight of the module ComfyUI patches with them: both
    tools flatten each matrix past its first dimension, multiply (out, r) by (r, in * kernel) and reshape to the
    weight (a Linear's (out, in), a Conv2d's (out, in, kh, kw))."""
    names, misfits = comfyui_names(family, modules), []
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key[:-len(".lora_down.weight")]
        up, (component, path) = state[f"{prefix}.lora_up.weight"], names[prefix]
        root = modules[component]
        if path.startswith("text_model.") and not hasattr(root, "text_model"):  # as _is_layer
            path = path[len("text_model."):]
        weight = root.get_submodule(path).weight
        if not (up.shape[0] == weight.shape[0] and up.flatten(1).shape[1] == down.shape[0]
                and down.flatten(1).shape[1] == weight[0].numel()):
            misfits.append(prefix)
    return misfits


def _lora_delta(state: Mapping[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    """alpha / rank * up @ down, reshaped to the weight (both tools)."""
    down, up = state[f"{prefix}.lora_down.weight"].float(), state[f"{prefix}.lora_up.weight"].float()
    return lora_scales({k: v for k, v in state.items() if k.startswith(f"{prefix}.")})[prefix] * (
        up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def _lokr_delta(state: Mapping[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) reshaped to the weight, each factor whole or a @ b; scaled by alpha / dim only where a factor is
    decomposed (dim: w2_b's rows, else w1_b's) and the file has an alpha, else by 1 (ComfyUI lokr.py
    `calculate_weight`, A1111 network_lokr.py with network.py `calc_scale`: the same rule)."""
    factors, dim = [], None
    for w in ("w1", "w2"):
        whole = state.get(f"{prefix}.lokr_{w}")
        if whole is None:
            b = state[f"{prefix}.lokr_{w}_b"].float()
            whole, dim = state[f"{prefix}.lokr_{w}_a"].float() @ b, b.shape[0]
        factors.append(whole.float())
    w1, w2 = factors
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    alpha = state.get(f"{prefix}.alpha")
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(weight.shape)


def _delta(state: Mapping[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    lokr = f"{prefix}.lokr_w1" in state or f"{prefix}.lokr_w1_a" in state
    return (_lokr_delta if lokr else _lora_delta)(state, prefix, weight)


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||.|| over the output axis, per input column (and kernel position), shaped to broadcast as (1, in, ...)."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def comfyui_merged(state: Mapping[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI patches at strength 1 (comfy/weight_adapter/base.py `weight_decompose` with DoRA): W + delta;
    with `dora_scale`, times dora_scale / norm, where a dora_scale of `out` rows takes the norm of each row of the
    *base* weight W, any other the column norms of W + delta (each + float32 eps)."""
    weight = weight.float()
    merged = weight + _delta(state, prefix, weight)
    scale = state.get(f"{prefix}.dora_scale")
    if scale is None:
        return merged
    if scale.shape[0] == weight.shape[0]:
        norm = weight.flatten(1).norm(dim=1).reshape(len(weight), *[1] * (weight.dim() - 1))
    else:
        norm = _column_norms(merged)
    return merged * (scale.float() / (norm + torch.finfo(torch.float32).eps))


def a1111_merged(state: Mapping[str, torch.Tensor], prefix: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight A1111 (1.10) patches at strength 1: W + delta; with `dora_scale`, (W + delta) * dora_scale / its
    column norms, whatever dora_scale's shape (network.py `apply_weight_decompose`)."""
    weight = weight.float()
    merged = weight + _delta(state, prefix, weight)
    scale = state.get(f"{prefix}.dora_scale")
    return merged if scale is None else merged * (scale.float() / _column_norms(merged))
