"""Every LoRA key a method exports, at the real SD 1.5 and SDXL shapes (built on the meta device: no memory, no
weights), lands on a module of the real model under the names ComfyUI and AUTOMATIC1111 resolve for that family
(tests/key_rules.py models their rules), at the trained scale and with shapes that fit its weights; and StyleDrop's
adapter stays the small fraction of the UNet Muse's is."""
from __future__ import annotations

import pytest
from accelerate import init_empty_weights

from style_factory.families import get_family
from style_factory.lora import add_lora, kohya_state_dict
from style_factory.methods.styledrop import StyleDropOptions
from style_factory.methods.textboost import TextBoostOptions
from tests.key_rules import a1111_unresolved, comfyui_unresolved, lora_scales, misfit_shapes
from tests.real_shapes import parameter_count, sd15_modules, sdxl_modules

REAL = {"sd1": sd15_modules, "sdxl": sdxl_modules}


@pytest.fixture(scope="module", params=sorted(REAL))
def exported(request):
    """(family, real modules, kohya keys per component, StyleDrop's share of the UNet) for StyleDrop's UNet adapter
    and TextBoost's text-encoder adapters; the modules are a second, plain copy for the tools' rules to look in."""
    family, adapted = get_family(request.param), REAL[request.param]()
    # alpha = rank / 2, so that a lost alpha (both tools then scale by 1) shows
    styledrop, textboost = StyleDropOptions(alpha=2.0), TextBoostOptions(alpha=2.0)
    with init_empty_weights():
        adapter = add_lora(adapted["unet"], styledrop.rank, styledrop.alpha, styledrop.target_modules)
        for name in family.text_encoder_classes:
            add_lora(adapted[name], textboost.rank, textboost.alpha, textboost.target_modules)
    states = {name: kohya_state_dict(family, name, adapted[name]) for name in ("unet", *family.text_encoder_classes)}
    keys = {name: list(state) for name, state in states.items()}
    modules = REAL[request.param]()
    share = sum(p.numel() for p in adapter) / parameter_count(modules["unet"])
    return request.param, modules, keys, share, states


def test_every_exported_key_resolves_in_comfyui(exported):
    family, modules, keys, *_ = exported
    for component, names in keys.items():
        assert names and comfyui_unresolved(names, family, modules) == [], component


def test_every_exported_key_resolves_in_a1111(exported):
    """A1111 patches open_clip's fused attention (SDXL's second encoder) only when q, k, v and out are all present:
    the kohya file carries a zero out_proj pair beside TextBoost's q/k/v (style_factory/lora.py)."""
    family, modules, keys, *_ = exported
    for component, names in keys.items():
        assert a1111_unresolved(names, family, modules) == [], component
    if family == "sdxl":
        without_out = [k for k in keys["text_encoder_2"] if "out_proj" not in k]
        assert set(a1111_unresolved(without_out, family, modules)) == set(without_out)  # why the zero pair is there


def test_styledrops_adapter_is_a_fraction_of_a_percent_of_the_real_unet(exported):
    family, _, _, share, _ = exported
    assert 0 < share < 0.01, f"{family}: {share:.2%}"


def test_a_wrong_name_is_reported_by_both_rule_sets(exported):
    family, modules, keys, *_ = exported
    wrong = [keys["unet"][0].replace("lora_unet_", "lora_unet_down_blocks_9_", 1)]
    assert comfyui_unresolved(wrong, family, modules) == wrong == a1111_unresolved(wrong, family, modules)


def test_both_tools_apply_the_trained_scale_and_every_pair_fits_its_weight(exported):
    """The file's alpha tensors give alpha / rank (here 2 / 4) in both tools; TextBoost's zero out_proj pairs too."""
    family, modules, _, _, states = exported
    for component, state in states.items():
        assert set(lora_scales(state).values()) == {0.5}, component
        assert misfit_shapes(state, family, modules) == [], component
    unet = states["unet"]
    without_alpha = {k: v for k, v in unet.items() if not k.endswith(".alpha")}
    assert set(lora_scales(without_alpha).values()) == {1.0}  # what a file without alpha would load at
    down = next(k for k in unet if k.endswith(".lora_down.weight"))
    transposed = unet | {down: unet[down].flatten(1).T}
    assert misfit_shapes(transposed, family, modules) == [down[:-len(".lora_down.weight")]]
