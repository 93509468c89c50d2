"""One run config sweeping every method over a style: a row per style x method (plus base), on one protocol, and
StyleDrop's style + subject composition (evaluate.compose) in the same run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs import all_styles
from tests.helpers import make_style, style_methods

STEPS = 3


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_style(root / "styles", "inkwash", "qvz", n_ref=5, n_aux=5)
    make_style(root / "subjects", "robot", "sks", n_ref=4, n_aux=0, seed=7)
    config = {
        "name": "sweep", "styles_dir": str(root / "styles"), "subjects_dir": str(root / "subjects"),
        "results_dir": str(root / "results"),
        "methods": style_methods(),
        "train": {"max_steps": STEPS, "checkpoint_every": STEPS, "method_options": {
            "dreambooth": {"num_class_images": 2, "class_inference_steps": 2},
            "styledrop": {"feedback_candidates": 2, "feedback_inference_steps": 2,
                          "feedback_prompts": ["a red circle", "a blue square"]},
            "stylealigned": {"inversion_steps": 2},
        }},
        "evaluate": {"prompts": ["a red circle on a blue background", "a yellow star"], "seeds": [0],
                     "num_inference_steps": 2, "compose": [{"style": "inkwash", "content": "robot", "gamma": 0.6}]},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return root / "results" / "sweep", all_styles.main(["--config", str(path)])


def test_a_row_per_method_plus_base_on_one_protocol(sweep):
    run_dir, exit_code = sweep
    assert exit_code == 0, (run_dir / "summary.json").read_text()
    results = pd.read_parquet(run_dir / "results.parquet")
    results = results[results.method != "noise-floor"]  # the StyleRef split-half row is tested in test_e2e
    results = results[~results.method.str.startswith("compose-")]  # below
    assert sorted(results.method) == sorted(["base", *style_methods()])
    protocol = results[["n_images", "n_reference", "inception_backbone", "clip_backbone", "config_hash"]]
    assert len(protocol.drop_duplicates()) == 1  # identical prompts, seeds and backbones for every model
    assert results.seeds.map(list).map(tuple).nunique() == 1
    assert results[["fid", "kid", "clip_t", "style_sim"]].notna().all().all()


def test_every_model_has_a_card_with_its_data_and_metrics(sweep):
    run_dir, _ = sweep
    for method in style_methods():
        card = json.loads((run_dir / "models" / "inkwash" / method / "model_card.json").read_text())
        assert card["method"] == method and card["tokens"] == ["qvz"] and card["data"]["key"]
        assert card["steps"] == (0 if method == "stylealigned" else STEPS)
        assert set(card["metrics"]) >= {"kid", "fid", "clip_t", "style_sim"}


def test_exports_have_the_files_other_tools_load(sweep):
    run_dir, _ = sweep
    models = run_dir / "models" / "inkwash"
    for full in ("styleboost", "dreambooth"):
        assert (models / full / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for lora in ("textboost", "styledrop"):
        files = {p.name for p in (models / lora).rglob("*.safetensors")}
        assert "pytorch_lora_weights.safetensors" in files and any("kohya" in f for f in files), files
    assert list((models / "textboost").rglob("embeddings/*.safetensors"))
    assert (models / "styledrop-round1" / "feedback" / "curated.parquet").is_file()


def test_a_compose_entry_gives_scored_rows_and_a_report_section(sweep):
    """The style's StyleDrop adapter and the subject's content adapter: the composition is sampled, scored with its
    content figures, kept out of the verdict and shown in the report."""
    run_dir, _ = sweep
    results = pd.read_parquet(run_dir / "results.parquet").set_index("method")
    assert "robot" not in set(results["style"])  # a subject is trained, not scored as a style
    row = results.loc["compose-inkwash-robot-g0.6"]
    assert row["style"] == "inkwash" and row["subject"] == "robot" and row["gamma"] == 0.6 and row["n_images"] == 2
    assert -1 <= row["content_clip_i_ci_low"] <= row["content_clip_i"] <= row["content_clip_i_ci_high"] <= 1
    assert np.isfinite(row[["kid", "clip_t", "style_sim", "content_dino"]].astype(float)).all()
    assert np.isnan(results.loc["styledrop", "content_clip_i"])
    assert "compose" not in pd.read_parquet(run_dir / "best.parquet")["method"].iloc[0]
    page = (run_dir / "report.html").read_text()
    assert "<h2>Compositions</h2>" in page and "samples/inkwash/compose-inkwash-robot-g0.6/p000_s0.png" in page
