"""DoRA and LoKr (`method_options.<method>.adapter`, style_factory/lora.py): they train, diffusers loads the exported
file to the trained adapter's outputs, and the kohya file's keys resolve in ComfyUI and A1111 at the real SD 1.5
shape and give there the weight peft merges (DoRA: ComfyUI only; A1111 applies DoRA's magnitude per input column)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from style_factory.config import Concept, StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.families import get_family
from style_factory.lora import KOHYA_FILE, add_lora, kohya_name, kohya_state_dict
from style_factory.loop import build_optimizer, encode_latent_cache, optimisation_step
from style_factory.methods import get_method
from style_factory.methods.styledrop import StyleDropOptions
from style_factory.methods.textboost import TextBoostOptions
from tests.key_rules import a1111_merged, a1111_unresolved, comfyui_merged, comfyui_unresolved
from tests.real_shapes import sd15_modules
from tests.helpers import adapter_outputs

STYLE = StyleConfig(display_name="Ink", descriptor="ink wash painting",
                    concepts=[Concept(token="zwx", class_word="style")])
CASES = [("styledrop", "dora"), ("styledrop", "lokr"), ("textboost", "dora")]


def trained(tiny_model: str, method_name: str, kind: str):
    """One optimiser step (Adam moves every adapter weight by about the learning rate: enough to change the output) of
    the method with the adapter `kind` (rank 4, alpha 2: a lost alpha / rank shows), on one 32 px image: 8 x 8
    latents, the size `adapter_outputs` checks at."""
    family = get_family("sd1")
    cfg = TrainConfig(batch_size=1, learning_rate=1e-2, method_options={
        method_name: {"rank": 4, "alpha": 2.0, "adapter": kind, **({"feedback": False} if method_name == "styledrop"
                                                                    else {})}})
    method, models = get_method(method_name, STYLE), family.load_components(tiny_model)
    groups = method.prepare(models, cfg)
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    data = StyleData(images=list(images), roles=np.array(["ref"]), concepts=np.array([0]), captions=["a circle"],
                     tokens=["zwx"], class_words=["style"])
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    optimisation_step(models, method, data, cache, build_optimizer(groups, cfg, torch.device("cpu")), cfg, 0, 0,
                      torch.device("cpu"))
    return family, method, models, cfg


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request, tiny_model, tmp_path_factory):
    """(family, method, models, cfg, export folder, trained outputs) of one trained case, exported: each case is
    trained once, for every test that reads it."""
    family, method, models, cfg = trained(tiny_model, *request.param)
    out = tmp_path_factory.mktemp(f"{request.param[0]}-{request.param[1]}")
    method.export(None, models, out, cfg)
    return family, method, models, cfg, out, adapter_outputs(models, family)


@pytest.mark.slow
def test_the_adapter_trains_and_diffusers_loads_it_as_trained(case, tiny_model):
    family, method, models, cfg, out, expected = case
    adapted = [models.module(name) for name in method.trained_modules(models, cfg)]
    for module in adapted:
        module.disable_adapters()
    untuned = adapter_outputs(models, family)
    for module in adapted:
        module.enable_adapters()
    assert max(float((a - b).abs().max()) for a, b in zip(expected, untuned)) > 1e-3  # training moved it
    pipe = method.load_for_sampling(family, tiny_model, str(out), "cpu")
    parts = copy.copy(models)
    parts.unet, parts.text_encoders = pipe.unet, {"text_encoder": pipe.text_encoder}
    if method.name == "textboost":  # its new tokens come from the embedding files load_for_sampling read
        parts.tokenizers = {"text_encoder": pipe.tokenizer}
    for ours, theirs in zip(expected, adapter_outputs(parts, family)):
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_kohya_file_merges_in_comfyui_to_the_weight_peft_merges(case):
    """Every adapted layer: the weight ComfyUI patches from lora_kohya.safetensors equals peft's merged weight; A1111's
    equals it for LoKr and not for DoRA (its magnitude per input column), as the docs say."""
    family, method, models, cfg, out, _ = case
    state, kind = load_file(out / KOHYA_FILE), cfg.method_options[method.name]["adapter"]
    for name in method.trained_modules(models, cfg):
        merged = copy.deepcopy(models.module(name))
        layers = [(path, layer) for path, layer in merged.named_modules() if hasattr(layer, "get_delta_weight")]
        assert layers
        for path, layer in layers:
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge()
            want, prefix = layer.get_base_layer().weight.detach(), kohya_name(family, name, path)
            torch.testing.assert_close(comfyui_merged(state, prefix, base), want, rtol=1e-5, atol=1e-6, msg=prefix)
            a1111 = a1111_merged(state, prefix, base)
            assert torch.allclose(a1111, want, rtol=1e-5, atol=1e-6) == (kind == "lokr"), prefix


@pytest.mark.slow
def test_every_key_resolves_in_comfyui_and_a1111_at_the_real_sd15_shape():
    family, modules = get_family("sd1"), sd15_modules()
    styledrop, textboost = StyleDropOptions(), TextBoostOptions()
    for kind in ("dora", "lokr"):
        adapted = sd15_modules()
        with init_empty_weights():
            add_lora(adapted["unet"], styledrop.rank, styledrop.alpha, styledrop.target_modules, kind)
            if kind == "dora":
                add_lora(adapted["text_encoder"], textboost.rank, textboost.alpha, textboost.target_modules, kind)
        for name in ("unet", "text_encoder") if kind == "dora" else ("unet",):
            keys = list(kohya_state_dict(family, name, adapted[name]))
            part = ".dora_scale" if kind == "dora" else ".lokr_w1"
            assert any(key.endswith(part) for key in keys), (kind, name)
            assert comfyui_unresolved(keys, "sd1", modules) == [], (kind, name)
            assert a1111_unresolved(keys, "sd1", modules) == [], (kind, name)


def test_textboost_offers_no_lokr():
    with pytest.raises(ValueError, match="adapter"):
        TextBoostOptions(adapter="lokr")
