"""The whole pipeline on the SD 2.x and SDXL presets: every method trains, samples and is scored, and every exported
model loads, as a user would load it, in the family's diffusers pipeline and generates."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from jobs import all_styles
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE
from style_factory.models import resolve_base_model
from tests.helpers import make_style, style_methods

PIPELINES = {"tiny-sd2": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
TOKEN = "qvz"


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def sweep(request, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_style(root / "styles", "inkwash", TOKEN, n_ref=4, n_aux=4)
    config = {
        "name": "sweep", "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
        "model": {"base": request.param}, "methods": style_methods(),
        "train": {"max_steps": 2, "checkpoint_every": 2, "method_options": {
            "dreambooth": {"num_class_images": 2, "class_inference_steps": 2},
            "styledrop": {"feedback_candidates": 2, "feedback_inference_steps": 2, "feedback_prompts": ["a circle"]},
            "stylealigned": {"inversion_steps": 2},
        }},
        "evaluate": {"prompts": ["a red circle", "a yellow star"], "seeds": [0], "num_inference_steps": 2},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    exit_code = all_styles.main(["--config", str(root / "run.yaml")])
    base = resolve_base_model(request.param, root / "results" / "base-models")
    return request.param, root / "results" / "sweep", exit_code, base


def generate(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def test_every_method_trains_samples_and_is_scored(sweep):
    preset, run_dir, exit_code, _ = sweep
    assert exit_code == 0, (run_dir / "summary.json").read_text()
    results = pd.read_parquet(run_dir / "results.parquet")
    scored = results[results.method != "noise-floor"]
    assert sorted(scored.method) == sorted(["base", *style_methods()])
    assert scored[["fid", "kid", "clip_t", "style_sim"]].notna().all().all()
    family = {"tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[preset]
    cards = [json.loads((run_dir / "models" / "inkwash" / m / "model_card.json").read_text()) for m in style_methods()]
    assert {card["family"] for card in cards} == {family}


def test_full_fine_tunes_load_from_their_folder(sweep):
    preset, run_dir, _, base = sweep
    plain = generate(PIPELINES[preset].from_pretrained(base), f"a red circle, {TOKEN} style")
    for method in ("styleboost", "dreambooth"):
        tuned = generate(PIPELINES[preset].from_pretrained(run_dir / "models" / "inkwash" / method),
                         f"a red circle, {TOKEN} style")
        assert not np.array_equal(tuned, plain), method  # the folder holds the trained weights


def load_embeddings(pipe, folder, preset: str) -> None:
    """TextBoost's tokens, loaded the way the family's tools read the file."""
    for path in sorted(folder.glob("*.safetensors")):
        if preset == "tiny-sdxl":
            state = load_file(path)
            pipe.load_textual_inversion(state["clip_l"], token=f"<{path.stem}>", text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=f"<{path.stem}>", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path))


@pytest.mark.parametrize("method", ["styledrop", "textboost"])
def test_both_lora_files_load_and_agree(sweep, method):
    preset, run_dir, _, base = sweep
    folder = run_dir / "models" / "inkwash" / method
    images = []
    for weight_name in (DIFFUSERS_FILE, KOHYA_FILE):
        pipe = PIPELINES[preset].from_pretrained(base)
        if method == "textboost":
            load_embeddings(pipe, folder / "embeddings", preset)
        pipe.load_lora_weights(folder, weight_name=weight_name)
        images.append(generate(pipe, f"a red circle, <{TOKEN}>"))
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)  # the same adapter under either naming
