"""Single-file checkpoints of full fine-tunes (style_factory/checkpoint.py, the families' `single_file_state_dict`): diffusers'
own single-file loader reads them back to the same weights on every family's preset, and at the real SD 1.5 and
SDXL shapes every weight has one original-layout key that diffusers' converters map back to it."""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
    infer_diffusers_model_type,
)
from real_shapes import sd15_modules, sdxl_modules
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from style_factory.checkpoint import full_model_files, single_file_name, write_single_file
from style_factory.config import ExportConfig
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.lora import add_lora
from style_factory.models import PRESETS, resolve_base_model

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def preset_dirs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("presets")
    return {preset: resolve_base_model(preset, cache) for preset in PRESETS}


@pytest.mark.parametrize("preset,dtype", [("tiny-pretrained", "fp32"), ("tiny", "fp16"), ("tiny-sd2", "fp32"),
                                          ("tiny-sd2", "fp16"), ("tiny-sdxl", "fp32"), ("tiny-sdxl", "fp16")])
def test_from_single_file_loads_every_weight_back(preset, dtype, preset_dirs, tmp_path):
    folder, family = preset_dirs[preset], get_family(PRESETS[preset])
    models = family.load_components(folder)
    path = tmp_path / "model.safetensors"
    write_single_file(path, models, dtype)
    pipe = family.pipeline_class.from_single_file(str(path), config=folder, local_files_only=True,
                                                  **family.pipeline_extras())
    loaded = {"unet": pipe.unet, "vae": pipe.vae, **{name: getattr(pipe, name) for name in models.text_encoders}}
    if family.name == "sdxl":
        # diffusers tells SDXL's two encoders apart by width (768 / 1280); the preset's are both 32 wide, so its
        # pipeline loader reads CLIP-L's keys twice. Its OpenCLIP loader, handed the second embedder's keys, does not.
        state = {k: v for k, v in load_file(path).items() if k.startswith("conditioner.embedders.1.")}
        loaded["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, state, config=folder, subfolder="text_encoder_2", local_files_only=True)
    originals = {"unet": models.unet, "vae": models.vae, **models.text_encoders}
    for name, original in originals.items():
        want, got = weights(original), weights(loaded[name])
        assert set(got) == set(want), name
        for key, value in want.items():
            expected = value if dtype == "fp32" else value.half().float()  # fp16: exactly the rounded weight
            assert torch.equal(got[key], expected), f"{name}.{key}"


def real_components(family: str) -> Components:
    modules = sd15_modules() if family == "sd1" else sdxl_modules()
    with init_empty_weights():
        vae = AutoencoderKL(**SD_VAE)
    return Components(family=get_family(family), vae=vae, unet=modules["unet"],
                      text_encoders={k: v for k, v in modules.items() if k != "unet"}, tokenizers={},
                      noise_scheduler=None, source="")


@pytest.mark.parametrize("family,model_type", [("sd1", "v1"), ("sdxl", "xl_base")])
def test_real_shape_keys_map_one_to_one_and_back(family, model_type):
    """Meta tensors: the converters only rename, slice and concatenate, which meta tensors do."""
    models = real_components(family)
    state = models.family.single_file_state_dict(models)
    parts = {"unet": models.unet, "vae": models.vae, **models.text_encoders}
    assert infer_diffusers_model_type(state) == model_type  # what from_single_file takes it for without a config
    back = {"unet": convert_ldm_unet_checkpoint(state, dict(models.unet.config)),
            "vae": convert_ldm_vae_checkpoint(state, dict(models.vae.config))}
    clip_l = convert_ldm_clip_checkpoint(state)
    back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in clip_l.items()}
    if family == "sdxl":
        back["text_encoder_2"] = convert_open_clip_checkpoint(models.text_encoders["text_encoder_2"], state,
                                                              prefix="conditioner.embedders.1.model.")
    for name, part in parts.items():  # every weight comes back: none was dropped or shares a key with another
        want = part.state_dict()
        assert set(back[name]) == set(want), name
        assert all(back[name][k].shape == v.shape for k, v in want.items()), name


def test_full_model_files_writes_the_single_file_and_skips_adapters(preset_dirs, tmp_path):
    models = get_family("sd1").load_components(preset_dirs["tiny"])
    files = full_model_files("anime", "styleboost", models, lambda: models, ["unet"], ExportConfig())
    files.write(tmp_path)
    assert files.facts == {"single_file": {"file": "anime-styleboost.safetensors", "dtype": "fp16"}}
    state = load_file(tmp_path / single_file_name("anime", "styleboost"))
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state

    assert full_model_files("anime", "styleboost", models, lambda: models, ["unet"],
                            ExportConfig(single_file=False)).facts == {}
    adapted = copy.deepcopy(models)
    add_lora(adapted.unet, 4, 4.0, ["to_q"])
    assert full_model_files("anime", "styledrop", adapted, lambda: models, ["unet"], ExportConfig()).facts == {}
