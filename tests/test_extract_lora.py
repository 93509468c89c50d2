"""LoRA extraction from a full fine-tune (style_factory/checkpoint.py): the SVD error it reports, its kohya names under
ComfyUI's and A1111's rules at the real shapes, the LoRA diffusers loads reproducing the fine-tuned UNet, and the
extracted LoRA evaluated as a model of its own (`<method>-lora<rank>`: planned, sampled from its file, its files in
best.parquet)."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
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
from style_factory.config import ExportConfig, RunConfig, load_styles
from style_factory.decide import load_files
from style_factory.evaluate import RESULTS_SCHEMA, plan_samples, record_metrics_in_card
from style_factory.families import get_family
from style_factory.files import folder_manifest, read_json, write_json_atomic
from style_factory.generate import load_sampling_pipeline
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE, add_lora, kohya_state_dict
from style_factory.run import REGISTRY, Run
from style_factory.sampling import draws, sample_draws
from style_factory.train_job import MODEL_CARD
from tests.helpers import load_sd1_pipeline, make_style

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


@pytest.fixture(scope="module")
def extractions(base) -> dict:
    """The export's files (`full_model_files`) of one fine-tune of the tiny model, with a LoRA extracted at rank 1
    and at rank 2."""
    tuned = fine_tune(base, true_rank=2)
    return {rank: full_model_files("alpha", "styleboost", tuned, lambda: base, ["unet"],
                                   ExportConfig(single_file=False, extract_lora_rank=rank)) for rank in (1, 2)}


def run_with_extraction(root, tiny_model, files, key: str = "fine-tune"):
    """A run of one style whose StyleBoost model (card key `key`) is the folder the export writes with `files` (a
    fine-tune of the tiny model and its extracted LoRA); (run, trained models as train_styles returns them)."""
    make_style(root / "styles", "alpha", "zwx")
    config = RunConfig(styles_dir=str(root / "styles"), results_dir=str(root / "results"), model={"base": "tiny"},
                       methods=["styleboost"], evaluate={"prompts": ["a red circle", "a blue square"], "seeds": [0],
                                                         "num_inference_steps": 2})
    run = Run(config=config, styles=load_styles(config, REGISTRY), local_base=tiny_model)
    folder = run.model_dir("alpha", "styleboost")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files.write(folder)
    write_json_atomic(folder / MODEL_CARD, {"key": key, "method": "styleboost", "steps": 4, "columns": {},
                                            **files.facts, "files": folder_manifest(folder)})
    return run, {("alpha", "styleboost"): str(folder)}


def planned(run, trained) -> dict:
    return {Path(job.out_dir).name: job for job in plan_samples(run, trained)}


def test_the_extracted_lora_is_planned_as_a_model_of_its_own(tmp_path, tiny_model, extractions):
    run, trained = run_with_extraction(tmp_path, tiny_model, extractions[1])
    jobs = planned(run, trained)
    assert set(jobs) == {"base", "styleboost", "styleboost-lora1"}
    lora, tuned = jobs["styleboost-lora1"], jobs["styleboost"]
    folder = trained["alpha", "styleboost"]
    assert (lora.method, lora.model_dir, lora.extracted_from) == ("styleboost-lora1", f"{folder}/lora-r1", folder)
    assert lora.prompts == tuned.prompts != jobs["base"].prompts and lora.seeds == tuned.seeds
    assert lora.out_dir == str(run.samples_dir("alpha", "styleboost-lora1"))
    # keyed by the fine-tune's key and the rank
    other_source = planned(*run_with_extraction(tmp_path, tiny_model, extractions[1], key="another fine-tune"))
    other_rank = planned(*run_with_extraction(tmp_path, tiny_model, extractions[2]))
    assert set(other_rank) == {"base", "styleboost", "styleboost-lora2"}
    assert other_rank["styleboost"].key == tuned.key != other_source["styleboost"].key
    assert len({lora.key, other_source["styleboost-lora1"].key, other_rank["styleboost-lora2"].key, tuned.key}) == 4


@pytest.mark.slow
def test_the_extracted_lora_samples_as_the_base_with_its_file_alone(tmp_path, tiny_model, extractions):
    run, trained = run_with_extraction(tmp_path, tiny_model, extractions[2])
    job = planned(run, trained)["styleboost-lora2"]

    def images(pipe) -> np.ndarray:  # the job's first image: one is enough to tell the models apart
        return np.stack([np.asarray(image, np.int16) for image in sample_draws(pipe, job, draws(job)[:1])])

    got = images(load_sampling_pipeline(job, "cpu"))
    by_hand = load_sd1_pipeline(tiny_model)
    by_hand.load_lora_weights(job.model_dir)
    assert np.array_equal(got, images(by_hand))
    by_hand.unload_lora_weights()
    assert np.abs(got - images(by_hand)).max() > 10  # not the base's images


def test_best_parquet_names_the_extracted_lora_file_and_its_card_entry_gets_its_scores(tmp_path, tiny_model,
                                                                                      extractions):
    run, trained = run_with_extraction(tmp_path, tiny_model, extractions[1])
    job = planned(run, trained)["styleboost-lora1"]
    folder = str(Path(job.model_dir).relative_to(run.dir))
    files = load_files(run.dir, pd.Series({"method": job.method, "model_dir": folder}), "sd1")
    assert files == {"diffusers_load": f'pipe.load_lora_weights("{folder}")', "embeddings": [],
                     "diffusers_file": f"{folder}/{DIFFUSERS_FILE}", "webui_file": f"{folder}/{KOHYA_FILE}"}
    record_metrics_in_card(job, {name: 0.5 for name in RESULTS_SCHEMA.names})
    card = read_json(Path(job.extracted_from) / MODEL_CARD)  # the LoRA folder has no card: its fine-tune's holds it
    assert card["extracted_lora"]["metrics"]["kid"] == 0.5 and "relative_error" in card["extracted_lora"]
    assert "metrics" not in card
