"""End to end on local Ray: two example styles (one with two tokens) through curate -> train -> evaluate -> report."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from diffusers import StableDiffusionPipeline

from jobs import all_styles
from tests.conftest import E2E_STYLES

STYLES = E2E_STYLES


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture
def finished_run(e2e_run):
    return e2e_run  # conftest's session run, shared with the other tests that read a real run folder


def test_every_stage_leaves_its_files(finished_run):
    run_dir, _, exit_code = finished_run
    assert exit_code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {s: {"curate": "ok", "train:styleboost": "ok", "train:stylealigned": "ok", "evaluate:base": "ok",
                           "evaluate:styleboost": "ok", "evaluate:stylealigned": "ok"} for s in STYLES}
    for style in STYLES:
        report = pd.read_csv(run_dir / "curated" / f"{style}.report.csv")
        assert set(report.status) <= {"kept", "rejected"} and (report.status == "kept").sum() >= 8
        curated = pd.read_parquet(run_dir / "curated" / f"{style}.parquet")
        assert len(curated) == (report.status == "kept").sum()
        assert set(curated.role) == {"ref", "aux", "heldout"} and (curated.caption_source == "sidecar").all()
        log = [json.loads(line) for line in (run_dir / "logs" / style / "styleboost" / "train_log.jsonl").open()]
        assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    anime = pd.read_parquet(run_dir / "curated" / "anime.parquet")
    assert set(anime.token) == {"ukj", "zwx"}  # Multi-StyleBoost: two tokens in one style
    assert (run_dir.parent / "latest").resolve() == run_dir


def test_results_table_has_a_row_per_style_and_model(finished_run):
    run_dir, _, _ = finished_run
    results = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(zip(results["style"], results["method"])) == sorted(
        (s, m) for s in STYLES for m in ("base", "styleboost", "stylealigned", "noise-floor"))
    noise_floor = results[results.method == "noise-floor"]
    assert (noise_floor.n_images - noise_floor.n_reference).isin([0, 1]).all()  # even/odd halves of StyleRef
    assert noise_floor.clip_t.isna().all() and noise_floor.kid.notna().all()
    results = results[results.method != "noise-floor"].reset_index(drop=True)
    assert (results.n_images == 4).all() and (results.seeds.map(list) == pd.Series([[0, 1]] * len(results))).all()
    for column in ("fid", "kid", "kid_std", "kid_ci_low", "kid_ci_high", "clip_t", "clip_t_ci_low",
                   "clip_t_ci_high", "style_sim", "style_sim_ci_low", "style_sim_ci_high", "style_consistency",
                   "kid_heldout", "kid_heldout_ci_low", "kid_heldout_ci_high", "style_sim_heldout"):
        assert results[column].notna().all(), column
    assert (results.n_heldout >= 4).all()  # the example styles hold out StyleRef images
    tuned, base = results[results.method != "base"], results[results.method == "base"].set_index("style")
    assert base.kid_vs_base.isna().all() and tuned.kid_vs_base.notna().all()
    assert np.allclose(tuned.kid_vs_base, tuned.kid.to_numpy() - base.loc[tuned["style"], "kid"].to_numpy())
    assert (tuned.kid_vs_base_ci_low <= tuned.kid_vs_base_ci_high).all()
    features = pd.read_parquet(run_dir / "features.parquet")
    per_style = results.groupby("style")[["n_reference", "n_heldout"]].first().to_numpy().sum()
    assert len(features) == 2 * (results.n_images.sum() + per_style)  # toy image embedding (Inception, DINO) + CLIP
    assert (~results.backbones_real).all() and results.inception_backbone.str.contains("NOT REAL").all()
    assert results.config_hash.nunique() == 1 and "torch" in json.loads(results.versions[0])
    protocol = json.loads(pq.read_schema(run_dir / "results.parquet").metadata[b"style_factory_protocol"])
    assert protocol["prompts"] == ["a red circle on a blue background", "a yellow star above a green square"]
    assert protocol["seeds"] == [0, 1] and protocol["sampler"] == "DDIM" and protocol["num_inference_steps"] == 3
    assert all(len(digest) == 64 for digest in protocol["backbone_sha256"].values())
    base_prompt = results[(results["style"] == "anime") & (results.method == "base")].prompt.item()
    tuned_prompt = results[(results["style"] == "anime") & (results.method == "styleboost")].prompt.item()
    assert "ukj illustration" in tuned_prompt and "zwx background" in tuned_prompt and "ukj" not in base_prompt


def test_report_references_only_existing_files(finished_run):
    run_dir, _, _ = finished_run
    parser = ImageSources()
    parser.feed((run_dir / "report.html").read_text())
    files = [s for s in parser.sources if not s.startswith("data:")]
    assert len(files) >= 2 * 2 * 4  # every sample of every model at least
    from urllib.parse import unquote
    assert all((run_dir / unquote(src)).is_file() for src in files)


def test_saved_model_reloads_in_diffusers_and_generates(finished_run):
    run_dir, _, _ = finished_run
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "models" / "anime" / "styleboost", safety_checker=None)
    image = pipe("a red circle, ukj illustration", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    card = json.loads((run_dir / "models" / "anime" / "styleboost" / "model_card.json").read_text())
    assert card["steps"] == 4 and card["tokens"] == ["ukj", "zwx"]


def test_rerun_reuses_finished_stages(finished_run):
    run_dir, config_path, _ = finished_run
    model_file = run_dir / "models" / "pixel-art" / "styleboost" / "unet" / "diffusion_pytorch_model.safetensors"
    watched = [run_dir / "curated" / "pixel-art.parquet", model_file,
               run_dir / "samples" / "pixel-art" / "styleboost" / "samples.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert all_styles.main(["--config", str(config_path)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(stages["curate"] == "reused" and stages["train:styleboost"] == "reused" for stages in summary.values())
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_fan_out_keeps_no_more_trainings_in_flight_than_the_cluster_runs(ray_session):
    from dataclasses import replace

    from style_factory.config import TrainConfig
    from style_factory.train import trainings_that_fit
    from style_factory.train_job import TrainJob

    cpus = ray_session.cluster_resources()["CPU"]
    job = TrainJob(style="s", method="styleboost", family="sd1", key="k", base_model="", curated_path="",
                   model_dir="", log_path="", storage_path="", style_config={},
                   train=TrainConfig(cpus_per_worker=1).model_dump())
    assert trainings_that_fit([job]) == int(cpus)
    two_cpus = replace(job, train=TrainConfig(cpus_per_worker=2).model_dump())
    assert trainings_that_fit([job, two_cpus]) == max(1, int(cpus // 2))  # the largest job sets the pace
    gpu = replace(job, train=TrainConfig(gpus_per_worker=1).model_dump())
    assert trainings_that_fit([gpu]) == max(1, int(ray_session.cluster_resources().get("GPU", 0)))
