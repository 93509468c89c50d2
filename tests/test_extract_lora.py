"""LoRA extraction from a full fine-tune (style_factory/checkpoint.py): the SVD error it reports, its kohya names under
ComfyUI's and A1111's rules at the real shapes, and the LoRA diffusers loads reproducing the fine-tuned UNet."""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from key_rules import a1111_unresolved, comfyui_unresolved
from real_shapes import sd15_modules, sdxl_modules

from style_factory.checkpoint import (
    extract_lora,
    full_model_files,
    lora_dir_name,
    lora_targets,
    low_rank_factors,
)
from style_factory.config import ExportConfig
from style_factory.families import get_family
from style_factory.lora import add_lora, kohya_state_dict

CHANGED = ["conv_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
           "mid_block.resnets.0.conv1", "up_blocks.0.attentions.0.proj_out"]


def fine_tune(models, true_rank: int, seed: int = 0):
    """A copy of `models` whose UNet layers CHANGED moved by a random difference of rank `true_rank`."""
    tuned, generator = copy.deepcopy(models), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in CHANGED:
            weight = tuned.unet.get_submodule(path).weight
            flat = weight.flatten(1)
            delta = torch.randn(len(flat), true_rank, generator=generator) @ torch.randn(
                true_rank, flat.shape[1], generator=generator)
            weight += 0.02 * delta.reshape(weight.shape)
    return tuned


@pytest.fixture(scope="module")
def base(tiny_model):
    return get_family("sd1").load_components(tiny_model)


def test_factors_are_exact_at_the_true_rank_and_lose_the_cut_singular_values():
    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn(24, 3, generator=generator) @ torch.randn(3, 16 * 9, generator=generator)).reshape(24, 16, 3, 3)
    up, down, residual = low_rank_factors(delta, 8)  # rank 8 > 3: padded with zeros
    assert up.shape == (24, 8) and down.shape == (8, 144)
    assert torch.allclose(up @ down, delta.flatten(1), atol=1e-4) and residual < 1e-6
    singular = torch.linalg.svdvals(delta.flatten(1))
    assert low_rank_factors(delta, 1)[2] == pytest.approx(float(singular[1:].pow(2).sum()), rel=1e-4)


@pytest.mark.slow
def test_reported_error_is_zero_at_the_true_rank_and_grows_as_the_rank_is_cut(base):
    tuned = fine_tune(base, true_rank=4)
    errors = {rank: extract_lora(base, tuned, ["unet"], rank) for rank in (4, 2, 1)}
    assert errors[4].layers == len(CHANGED) and errors[4].relative_error < 1e-4
    assert 0.05 < errors[2].relative_error < errors[1].relative_error < 1
    assert errors[1].worst_relative_error >= errors[1].relative_error
    assert errors[1].worst_layer.removeprefix("unet.") in CHANGED


def test_card_facts_name_the_folder_and_the_error(base, tmp_path):
    tuned = fine_tune(base, true_rank=2)
    files = full_model_files("anime", "styleboost", tuned, lambda: base, ["unet", "text_encoder"],
                             ExportConfig(single_file=False, extract_lora_rank=1))
    files.write(tmp_path)
    facts = files.facts["extracted_lora"]
    assert facts["folder"] == lora_dir_name(1) and facts["layers"] == len(CHANGED)  # the text encoder did not move
    assert 0 < facts["relative_error"] <= facts["worst_relative_error"] < 1
    assert {p.name for p in (tmp_path / lora_dir_name(1)).iterdir()} >= {"pytorch_lora_weights.safetensors",
                                                                       "lora_kohya.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_extracted_layers_resolve_in_comfyui_and_a1111_at_real_shape(family):
    """Every layer extraction can target, with the kohya names lora.py gives it (meta device: names only)."""
    build = sd15_modules if family == "sd1" else sdxl_modules
    modules = build()
    adapted = copy.deepcopy(modules)
    keys = []
    for name, module in adapted.items():
        with init_empty_weights():
            add_lora(module, 4, 4.0, lora_targets(module))
        keys += list(kohya_state_dict(get_family(family), name, module))
    assert comfyui_unresolved(keys, family, modules) == []
    assert a1111_unresolved(keys, family, modules) == []


@pytest.mark.slow
@pytest.mark.parametrize("true_rank,rank", [(3, 4), (6, 2)])
def test_diffusers_loads_the_extracted_lora_onto_the_base_as_the_fine_tune(tiny_model, base, true_rank, rank,
                                                                         tmp_path):
    tuned = fine_tune(base, true_rank)
    files = full_model_files("anime", "styleboost", tuned, lambda: base, ["unet"],
                             ExportConfig(single_file=False, extract_lora_rank=rank))
    files.write(tmp_path)
    pipe = get_family("sd1").load_pipeline(tiny_model)
    pipe.load_lora_weights(str(tmp_path / lora_dir_name(rank)))
    generator = torch.Generator().manual_seed(1)
    noisy, hidden = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        want = tuned.unet(noisy, 500, hidden).sample
        got = pipe.unet(noisy, 500, hidden).sample
        untuned = base.unet(noisy, 500, hidden).sample
    error = float((got - want).norm() / (want - untuned).norm())  # of the fine-tune's change of the output
    if true_rank <= rank:
        assert error < 1e-3
    else:
        assert files.facts["extracted_lora"]["relative_error"] > 0.1 and error < 1
