"""tiny-pretrained and the toy backbone: shipped in the repository, following prompts, and learning a style.

These are the tests that show the pipeline learns something on a CPU: the base model draws held-out captions
that the toy backbone reads back, and a short fine-tune moves KID to the StyleRef images with bootstrap
intervals apart while the prompted content is still recognised.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from jobs import all_styles
from style_factory import backbones, pretrain, toyworld
from style_factory.generate import TOY_PROMPTS, sample_name
from style_factory.models import ASSETS_DIR, TINY_PRETRAINED, resolve_base_model
from tests.helpers import REPO, copy_example_styles, load_sd1, load_sd1_pipeline

STYLE = "watercolor"


def test_the_model_and_backbone_load_from_the_repository_alone(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = Path(resolve_base_model(TINY_PRETRAINED, "/nonexistent-cache"))
    assert folder.is_relative_to(REPO) and folder.is_relative_to(ASSETS_DIR)
    weights = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert weights < 32e6  # the issue's ~30 MB budget
    models = load_sd1(str(folder))
    toy = backbones.toy_clip_model()
    # one text tower, stored once: the backbone's is the model's text encoder
    assert torch.equal(toy.clip.text_model.embeddings.token_embedding.weight,
                       models.text_encoders["text_encoder"].get_input_embeddings().weight)
    card = json.loads((folder / "training.json").read_text())
    assert (folder / "README.md").read_text().startswith("# tiny-pretrained")
    assert card["config"] == dataclasses.asdict(pretrain.PretrainConfig())  # the defaults retrain the shipped model
    follow = card["prompt_following_held_out"]
    assert all(follow[f"{name}_accuracy"] > 3 * follow[f"{name}_chance"] for name in ("kind", "color", "background"))


@pytest.mark.slow
def test_the_base_model_draws_held_out_captions_the_backbone_reads_back():
    """Fresh seeds, captions whose (kind, color, background) no training image had: the object's kind, its color
    and the background are read back well above chance."""
    pipe = load_sd1_pipeline(resolve_base_model(TINY_PRETRAINED, "/nonexistent-cache"))
    accuracy = pretrain.prompt_following(pipe, backbones.toy_clip_model(), n_images=32, steps=20, guidance=4.0,
                                         seed=12345)
    assert accuracy["kind_accuracy"] >= 3 * accuracy["kind_chance"], accuracy
    assert accuracy["color_accuracy"] >= 5 * accuracy["color_chance"], accuracy
    assert accuracy["background_accuracy"] >= 5 * accuracy["background_chance"], accuracy


def test_the_backbone_tells_the_looks_apart_and_reads_content_through_them():
    accuracy = pretrain.heads_accuracy(backbones.toy_clip_model(), *pretrain.held_out_heads_set(140, seed=3))
    assert accuracy["look_accuracy"] >= 0.9  # chance is 1/7
    assert accuracy["color_accuracy"] >= 0.8 and accuracy["background_accuracy"] >= 0.9  # chance 1/8 and 1/7
    assert accuracy["kind_accuracy"] >= 0.5  # chance 1/6; the painterly looks blur the smaller shapes


@pytest.mark.slow
def test_pretraining_is_seeded_and_writes_loadable_folders(tmp_path):
    """The whole script at toy scale: both folders load with the pipeline's own loaders; a rerun is bitwise equal."""
    cfg = pretrain.PretrainConfig(plain_scenes=64, styled_scenes_per_look=8, clip_steps=3, clip_batch_size=16,
                                  vae_steps=2, vae_batch_size=4, unet_steps=2, unet_batch_size=8, eval_images=4,
                                  eval_steps=2)
    card = pretrain.pretrain(cfg, tmp_path / "out", tmp_path / "work")
    assert set(card["prompt_following_held_out"]) >= {"kind_accuracy", "color_accuracy", "background_accuracy"}
    models = load_sd1(str(tmp_path / "out" / "tiny-pretrained"))
    toy = backbones.ToyClip.load(tmp_path / "out" / "toy-clip", tmp_path / "out" / "tiny-pretrained" / "text_encoder")
    assert models.vae.config.scaling_factor != 1.0  # set from the latents' spread

    plain, mixed = pretrain.build_data(cfg)
    again = pretrain.train_clip(mixed, models.tokenizers["tokenizer"], cfg, pretrain.Log(tmp_path / "again.log"))
    assert all(torch.equal(a, b) for a, b in zip(toy.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_stored_phases_are_reused_only_with_the_same_settings(tmp_path):
    """CLIP and VAE trained apart (`--only`), then the UNet run finds both; a changed CLIP setting retrains CLIP."""
    cfg = pretrain.PretrainConfig(plain_scenes=48, styled_scenes_per_look=4, clip_steps=2, clip_batch_size=8,
                                  vae_steps=2, vae_batch_size=4, unet_steps=1, unet_batch_size=4, eval_images=2,
                                  eval_steps=2)
    work = tmp_path / "work"
    assert pretrain.pretrain(cfg, tmp_path / "out", work, only="clip") == {}
    assert pretrain.pretrain(cfg, tmp_path / "out", work, only="vae") == {}
    assert not (tmp_path / "out").exists()
    pretrain.pretrain(cfg, tmp_path / "out", work)
    log = (work / "pretrain.log").read_text()
    assert log.count("clip: loaded") == 1 and log.count("vae: loaded") == 1 and log.count("clip step 0:") == 1
    stored = load_sd1(str(tmp_path / "out" / "tiny-pretrained")).text_encoders["text_encoder"]
    assert torch.equal(stored.get_input_embeddings().weight,
                       backbones.ToyClip.load(work / "clip", work / "clip" / "text_encoder")
                       .clip.text_model.embeddings.token_embedding.weight)

    pretrain.pretrain(pretrain.PretrainConfig(**{**vars(cfg), "clip_steps": 3}), tmp_path / "out", work, only="clip")
    log = (work / "pretrain.log").read_text()
    assert log.count("clip step 0:") == 2 and "clip step 2:" in log


@pytest.mark.slow
def test_rendering_does_not_depend_on_the_number_of_processes(monkeypatch):
    scenes = pretrain.training_scenes(2 * pretrain.RENDER_CHUNK + 7, first_seed=3)
    monkeypatch.setattr(pretrain.os, "cpu_count", lambda: 1)
    alone = pretrain.render(scenes, "watercolor", seed=4)
    monkeypatch.setattr(pretrain.os, "cpu_count", lambda: 3)
    assert np.array_equal(alone, pretrain.render(scenes, "watercolor", seed=4))


def test_held_out_captions_never_reach_training():
    plain, mixed = pretrain.build_data(pretrain.PretrainConfig(plain_scenes=400, styled_scenes_per_look=20))
    assert not any(pretrain.is_held_out(scene) for scene in mixed.scenes)
    held_out = {toyworld.caption(s) for s in pretrain.held_out_scenes(50)}
    assert not held_out & set(plain.captions)


# ----------------------------------------------------------------------------- learning a style, end to end


SINGLE_OBJECT_PROMPTS = {i: p for i, p in enumerate(TOY_PROMPTS) if not any(r in p for r in toyworld.RELATIONS)}


@pytest.fixture(scope="module")
def style_run(ray_session, tmp_path_factory):
    """The default demo's training on one style (100 StyleBoost steps at lr 1e-4), the 24 toy prompts x 2 seeds
    sampled at 10 DDIM steps, half the demo's 20 (fewer training steps bring the KID intervals too close)."""
    root = tmp_path_factory.mktemp("learning")
    copy_example_styles(root / "styles", [STYLE])
    config = {
        "name": "learning", "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
        "baselines": [], "train": {"max_steps": 100, "learning_rate": 1e-4},
        "evaluate": {"seeds": [0, 1], "num_inference_steps": 10},
    }
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert all_styles.main(["--config", str(config_path)]) == 0
    return root / "results" / "learning"


def test_fine_tuning_moves_kid_towards_the_style(style_run):
    """KID to the StyleRef images falls with the 95% bootstrap intervals apart, and style similarity rises
    (the figures: docs/tiny-pretrained.md)."""
    results = pd.read_parquet(style_run / "results.parquet").set_index("method")
    base, tuned = results.loc["base"], results.loc["styleboost"]
    assert tuned.kid_ci_high < base.kid_ci_low, results[["kid", "kid_ci_low", "kid_ci_high"]]
    assert tuned.style_sim > base.style_sim


def test_the_tuned_model_still_draws_the_prompted_content(style_run):
    """Single-object prompts: the backbone reads the prompted kind and color back from the styled samples, well
    above chance (1/6 and 1/8; the figures: docs/tiny-pretrained.md)."""
    samples = style_run / "samples" / STYLE / "styleboost"
    seeds = json.loads((samples / "samples.json").read_text())["seeds"]
    toy = backbones.toy_clip_model()
    hits: dict[str, list[bool]] = {"kind": [], "color": []}
    for index, content in SINGLE_OBJECT_PROMPTS.items():
        _, _, color, kind, *_ = content.split()  # "a <size> <color> <kind> ..."
        for seed in seeds:
            image = np.asarray(Image.open(samples / sample_name(index, seed)).convert("RGB"))
            predicted = toy.classify(torch.from_numpy(image[None].copy()))
            hits["kind"].append(backbones.ATTRIBUTES["kind"][predicted["kind"].item()] == kind)
            hits["color"].append(backbones.ATTRIBUTES["color"][predicted["color"].item()] == color)
    assert np.mean(hits["kind"]) >= 3 / len(toyworld.KINDS), hits
    assert np.mean(hits["color"]) >= 3 / len(toyworld.COLORS), hits
