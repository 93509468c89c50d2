"""The LoRA files a method exports load in diffusers completely and at the trained scale: a pipeline that loads them
(from the folder, or by either file name) computes what the trained adapter computes, on each family's tiny model,
with alpha != rank so that a lost alpha / rank scale shows."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from style_factory.config import Concept, StyleConfig, TrainConfig
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE
from style_factory.methods import get_method
from style_factory.models import PRESETS, resolve_base_model
from tests.helpers import adapter_outputs

STYLE = StyleConfig(display_name="Ink", descriptor="ink wash painting",
                    concepts=[Concept(token="zwx", class_word="style")])


@pytest.fixture(scope="module")
def base_models(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("base-models")
    return {preset: resolve_base_model(preset, cache) for preset in ("tiny", "tiny-sd2", "tiny-sdxl")}


def trained(method_name: str, preset: str, base: str):
    """The method's adapter on `base`, its up matrices drawn at random (a fresh one is zero, and changes nothing),
    with rank 4 and alpha 2."""
    family = get_family(PRESETS[preset])
    cfg = TrainConfig(method_options={method_name: {"rank": 4, "alpha": 2.0}})
    method = get_method(method_name, STYLE)
    models = family.load_components(base)
    method.prepare(models, cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in method.trained_modules(models, cfg):
            for path, param in models.module(name).named_parameters():
                if "lora_B" in path:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return family, method, models, cfg


def pipeline_parts(family, pipe) -> Components:
    """The parts of a sampling pipeline as the Components `adapter_outputs` reads."""
    return Components(family=family, vae=pipe.vae, unet=pipe.unet, noise_scheduler=pipe.scheduler, source="",
                      text_encoders={name: getattr(pipe, name) for name in family.text_encoder_classes},
                      tokenizers={name: getattr(pipe, name) for name in family.tokenizer_names})


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("method_name", ["styledrop", "textboost"])
def test_diffusers_loads_the_exported_lora_exactly_as_trained(tmp_path, base_models, method_name, preset):
    family, method, models, cfg = trained(method_name, preset, base_models[preset])
    method.export(None, models, tmp_path, cfg)
    assert (tmp_path / DIFFUSERS_FILE).read_bytes() == (tmp_path / KOHYA_FILE).read_bytes()
    expected = adapter_outputs(models, family)
    adapted = [models.module(name) for name in method.trained_modules(models, cfg)]
    for module in adapted:
        module.disable_adapters()
    untuned = adapter_outputs(models, family)
    assert max((a - b).abs().max() for a, b in zip(expected, untuned)) > 1e-2  # so a dropped layer would show
    pipe = method.load_for_sampling(family, base_models[preset], str(tmp_path), "cpu")  # load_lora_weights(folder)
    for weight_name in (DIFFUSERS_FILE, KOHYA_FILE):  # the folder's default file, then the other name
        if weight_name == KOHYA_FILE:
            pipe.unload_lora_weights()
            pipe.load_lora_weights(tmp_path, weight_name=weight_name)
        for ours, theirs in zip(expected, adapter_outputs(pipeline_parts(family, pipe), family)):
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg=weight_name)


def test_the_lora_file_carries_the_trained_alpha(tmp_path, base_models):
    family, method, models, cfg = trained("styledrop", "tiny", base_models["tiny"])
    method.export(None, models, tmp_path, cfg)
    state = load_file(tmp_path / DIFFUSERS_FILE)
    alphas = {v.item() for k, v in state.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    assert alphas == {2.0} and ranks == {4}
