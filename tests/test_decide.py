"""The verdict: the selection rule on constructed result tables, and best.parquet from the real stage on a real run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from style_factory import metrics
from style_factory.config import SelectionConfig
from style_factory.decide import decide
from style_factory.evaluate import FEATURES_SCHEMA, RESULTS_SCHEMA
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE

N_PROMPTS, SEEDS, DIM, BACKBONE, KID_SEED = 12, [0, 1], 8, "toy image embedding (NOT REAL)", 0


def model_features(offset: float, seed: int) -> np.ndarray:
    """One model's images: a Gaussian cloud `offset` away from the StyleRef images' along every axis."""
    return np.random.default_rng(seed).normal(offset, 1.0, (N_PROMPTS * len(SEEDS), DIM)).astype(np.float32)


def make_results(run_dir: Path, models: list[dict], clip_t_base: float = 0.30) -> Path:
    """A run folder as evaluate leaves it, for one style: results.parquet (KIDs computed from the features, as
    evaluate does) and features.parquet. Each of `models` is {"method", "offset", "clip_t", extra columns...}."""
    reference = np.random.default_rng(99).normal(0.0, 1.0, (16, DIM)).astype(np.float32)
    pairs = [(i, s) for i in range(N_PROMPTS) for s in SEEDS]
    features = [{"run_id": "t", "style": "cubism", "method": "ref", "image": f"samples/cubism/ref/ref_{i:03d}.png",
                 "prompt_index": None, "seed": None, "backbone": BACKBONE, "feature": f}
                for i, f in enumerate(reference)]
    rows = []
    for k, model in enumerate([{"method": "base", "offset": 1.5, "clip_t": clip_t_base}, *models]):
        model = dict(model)
        method, offset, clip_t = model.pop("method"), model.pop("offset"), model.pop("clip_t")
        samples_dir = f"samples/cubism/{method}-{k}"
        feats = model_features(offset, seed=k)
        features += [{"run_id": "t", "style": "cubism", "method": method, "image": f"{samples_dir}/p{i:03d}_s{s}.png",
                      "prompt_index": i, "seed": s, "backbone": BACKBONE, "feature": f}
                     for (i, s), f in zip(pairs, feats)]
        rows.append({"run_id": "t", "style": "cubism", "display_name": "Cubism", "method": method,
                     "base_model": "tiny-pretrained", "n_images": len(feats), "n_reference": len(reference),
                     "seeds": SEEDS, "kid": metrics.kid(feats, reference, seed=KID_SEED), "clip_t": clip_t,
                     "inception_backbone": BACKBONE, "backbones_real": False, "samples_dir": samples_dir,
                     "model_dir": "" if method == "base" else f"models/cubism/{method}-{k}", **model})
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    for column in sorted({c for model in models for c in model} - set(RESULTS_SCHEMA.names) - {"offset"}):
        table = table.append_column(column, pa.array([row.get(column) for row in rows]))
    protocol = {"kid_seed": KID_SEED, "family": "sd1", "seeds": SEEDS}
    run_dir.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({"style_factory_protocol": json.dumps(protocol)}),
                   run_dir / "results.parquet")
    pq.write_table(pa.Table.from_pylist(features, schema=FEATURES_SCHEMA), run_dir / "features.parquet")
    return run_dir


def verdict(run_dir: Path, **selection) -> pd.Series:
    best = pd.read_parquet(decide(run_dir, SelectionConfig(**selection)))
    assert len(best) == 1
    return best.iloc[0]


def evidence(row: pd.Series) -> dict[str, dict]:
    return {c["label"]: c for c in json.loads(row["candidates"])}


def test_a_clear_winner_is_named_with_its_runner_up_and_paired_difference(tmp_path):
    run_dir = make_results(tmp_path / "run", [{"method": "styleboost", "offset": 0.0, "clip_t": 0.30},
                                              {"method": "textboost", "offset": 0.9, "clip_t": 0.31}])
    best = verdict(run_dir)
    assert best["method"] == "styleboost" and list(best["tied"]) == []
    assert best["vs_base_ci_high"] < 0 and best["value"] < best["base_value"]
    assert best["runner_up"] == "textboost" and best["runner_up_diff_ci_low"] > 0  # textboost is worse, clearly
    assert best["model_dir"] == "models/cubism/styleboost-1" and best["why"].startswith("lowest KID")
    assert evidence(best)["textboost"]["verdict"] == "eligible"


def test_models_the_paired_test_cannot_tell_apart_are_tied(tmp_path):
    run_dir = make_results(tmp_path / "run", [{"method": "styleboost", "offset": 0.30, "clip_t": 0.30},
                                              {"method": "textboost", "offset": 0.32, "clip_t": 0.30}])
    best = verdict(run_dir)
    other = "textboost" if best["method"] == "styleboost" else "styleboost"
    assert list(best["tied"]) == [other] and best["runner_up"] == other
    assert best["runner_up_diff_ci_low"] <= 0 <= best["runner_up_diff_ci_high"]
    assert f"tied with {other}" in best["why"]
    assert list(verdict(run_dir, tie_test="none")["tied"]) == []


def test_a_kid_winner_that_loses_the_content_is_rejected(tmp_path):
    run_dir = make_results(tmp_path / "run", [{"method": "dreambooth", "offset": 0.0, "clip_t": 0.22},
                                              {"method": "styleboost", "offset": 0.6, "clip_t": 0.29}])
    best = verdict(run_dir)
    assert best["method"] == "styleboost"  # dreambooth's KID is lower, but its CLIP-T is 0.08 below the base's
    assert "CLIP-T 0.220 is more than 0.02 below" in evidence(best)["dreambooth"]["verdict"]
    assert verdict(run_dir, content_margin=0.1)["method"] == "dreambooth"  # a looser floor lets it win


def test_the_base_is_kept_when_no_model_beats_it(tmp_path):
    run_dir = make_results(tmp_path / "run", [{"method": "styleboost", "offset": 1.5, "clip_t": 0.30},
                                              {"method": "textboost", "offset": 2.5, "clip_t": 0.30}])
    best = verdict(run_dir)
    assert best["method"] == "base" and best["label"] == "base" and best["why"].startswith("keep the base")
    assert best["model_dir"] == "" and best["diffusers_load"] == 'StableDiffusionPipeline.from_pretrained("tiny-pretrained")'
    assert np.isnan(best["vs_base"]) and best["runner_up"] == "styleboost"
    assert "did not fall" in evidence(best)["textboost"]["verdict"]


def test_training_seeds_are_averaged_per_configuration_and_settings_kept_apart(tmp_path):
    run_dir = make_results(tmp_path / "run", [
        {"method": "styleboost", "offset": 0.0, "clip_t": 0.30, "train_seed": 1, "step": 4},
        {"method": "styleboost", "offset": 0.5, "clip_t": 0.30, "train_seed": 2, "step": 4},
        {"method": "styleboost", "offset": 1.0, "clip_t": 0.30, "train_seed": 1, "step": 2},
        {"method": "styleboost", "offset": 1.2, "clip_t": 0.30, "train_seed": 2, "step": 2},
    ])
    results = pd.read_parquet(run_dir / "results.parquet")
    best = verdict(run_dir)
    assert best["label"] == "styleboost step=4" and json.loads(best["settings"]) == {"step": 4}
    step4 = results[(results["step"] == 4)]
    assert best["n_train_seeds"] == 2 and best["value"] == pytest.approx(step4["kid"].mean())
    assert best["value_seed_std"] == pytest.approx(step4["kid"].std(ddof=1))
    assert best["train_seed"] == 1 and best["kid"] == pytest.approx(step4["kid"].min())  # the better seed's file
    assert set(evidence(best)) == {"styleboost step=4", "styleboost step=2"}
    assert evidence(best)["styleboost step=2"]["n_train_seeds"] == 2


def test_the_file_to_load_comes_from_what_the_export_wrote(tmp_path):
    run_dir = make_results(tmp_path / "run", [{"method": "styledrop", "offset": 0.0, "clip_t": 0.30}])
    folder = run_dir / "models" / "cubism" / "styledrop-1"
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text(json.dumps({"files": {DIFFUSERS_FILE: {}, KOHYA_FILE: {}}}))
    best = verdict(run_dir)
    assert best["diffusers_load"] == 'pipe.load_lora_weights("models/cubism/styledrop-1")'
    assert best["diffusers_file"] == f"models/cubism/styledrop-1/{DIFFUSERS_FILE}"
    assert best["webui_file"] == f"models/cubism/styledrop-1/{KOHYA_FILE}"


def test_a_style_without_a_verdict_says_why_and_still_reports(tmp_path):
    from style_factory.report import write_report
    from tests.test_report import make_run

    run_dir = make_run(tmp_path / "run", {"pixel-art": ["styleboost"]})  # no base row, no features
    pq.write_table(pa.Table.from_pylist([], schema=FEATURES_SCHEMA), run_dir / "features.parquet")
    best = verdict(run_dir)
    assert best["method"] == "" and best["why"] == "no verdict: expected one base row, found 0"
    assert "no verdict" in write_report(run_dir).read_text(encoding="utf-8")


@pytest.mark.ray
@pytest.mark.slow
def test_the_stage_writes_best_parquet_on_a_real_run(e2e_run):
    run_dir, _, exit_code = e2e_run
    assert exit_code == 0
    best = pd.read_parquet(run_dir / "best.parquet")
    results = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(best["style"]) == ["anime", "pixel-art"]
    for _, row in best.iterrows():
        assert row["method"] in {"base", "styleboost", "stylealigned"} and row["why"]
        rows = results[results["style"] == row["style"]].set_index("method")
        assert row["base_value"] == pytest.approx(rows.loc["base", "kid"])
        labels = {c["label"] for c in json.loads(row["candidates"])}
        assert labels == {"styleboost", "stylealigned"}  # never the noise floor
        for label in labels:  # the paired interval against the base is evaluate's own kid_vs_base interval
            found = evidence(row)[label]
            assert found["vs_base_ci_low"] == pytest.approx(rows.loc[label, "kid_vs_base_ci_low"])
            assert found["vs_base_ci_high"] == pytest.approx(rows.loc[label, "kid_vs_base_ci_high"])
        if row["method"] == "styleboost":
            assert row["diffusers_load"] == f'StableDiffusionPipeline.from_pretrained("{row["model_dir"]}")'
    assert 'id="verdict"' in (run_dir / "report.html").read_text(encoding="utf-8")


def test_a_lead_within_the_spread_between_training_seeds_is_a_tie_not_a_win(tmp_path):
    run_dir = make_results(tmp_path / "run", [
        {"method": "styleboost", "offset": 0.0, "clip_t": 0.30, "train_seed": 1},  # seed-averaged best, but noisy
        {"method": "styleboost", "offset": 0.9, "clip_t": 0.30, "train_seed": 2},
        {"method": "textboost", "offset": 0.8, "clip_t": 0.30, "train_seed": 1},
        {"method": "textboost", "offset": 0.8, "clip_t": 0.30, "train_seed": 2}])
    best = verdict(run_dir)
    assert best["method"] == "styleboost" and best["runner_up"] == "textboost"
    assert best["runner_up_diff_ci_low"] > 0  # the paired test alone would call it a win...
    assert best["runner_up_diff"] <= best["value_seed_std"]  # ...but the lead is within styleboost's seed spread
    assert list(best["tied"]) == ["textboost"] and "tied with textboost" in best["why"]


def test_a_fall_against_the_base_within_the_seed_spread_keeps_the_base(tmp_path):
    run_dir = make_results(tmp_path / "run", [
        {"method": "styleboost", "offset": 0.0, "clip_t": 0.30, "train_seed": 1},
        {"method": "styleboost", "offset": 1.6, "clip_t": 0.30, "train_seed": 2}])
    best = verdict(run_dir)
    styleboost = evidence(best)["styleboost"]
    assert styleboost["vs_base_ci_high"] < 0 and styleboost["seed_std"] >= -styleboost["vs_base"]
    assert best["method"] == "base" and "spread between training seeds" in styleboost["verdict"]
