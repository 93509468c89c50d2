"""A run folder accumulates, and nothing it reuses is trusted on its marker alone.

One run folder, two styles, real runs of `jobs.all_styles` on the session's Ray: each style run alone under the
same name (both end up in the table and the report), then cached files broken by hand (a truncated latent
cache, a model whose weight file is gone, a garbled model card) and the run repeated once: each break is named, the
output rebuilt, and the results equal the untouched ones. Checkpoint fallback is tested on real checkpoint files.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs import all_styles
from style_factory.config import TrainConfig
from style_factory.evaluate import assemble_scores
from style_factory.loop import build_optimizer, restore_checkpoint, save_checkpoint
from style_factory.methods import get_method
from style_factory.run import load_run, parse_args
from tests.helpers import load_sd1, make_style

METRICS = ["style", "method", "kid", "fid", "clip_t", "style_sim"]


@pytest.fixture(scope="module")
def run_folder(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    make_style(root / "styles", "ink", "qvz", n_ref=4, n_aux=4, seed=1)
    make_style(root / "styles", "chalk", "kzt", n_ref=4, n_aux=4, seed=2)
    config = {"name": "accumulate", "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
              "baselines": [], "train": {"max_steps": 2, "checkpoint_every": 2},
              "evaluate": {"prompts": ["a red circle", "a yellow star"], "seeds": [0], "num_inference_steps": 2}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    def run(*styles: str) -> int:
        return all_styles.main(["--config", str(path)] + [arg for s in styles for arg in ("--style", s)])

    return root / "results" / "accumulate", run


def scores(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "results.parquet")[METRICS].sort_values(["style", "method"], ignore_index=True)


@pytest.fixture(scope="module")
def both_styles(run_folder):
    run_dir, run = run_folder
    assert run("ink") == 0
    assert set(pd.read_parquet(run_dir / "results.parquet")["style"]) == {"ink"}
    assert run("chalk") == 0
    return scores(run_dir)


def test_styles_run_one_after_the_other_all_stay_in_the_table_report_and_summary(run_folder, both_styles):
    run_dir, _ = run_folder
    assert set(both_styles["style"]) == {"ink", "chalk"}
    assert set(pd.read_parquet(run_dir / "features.parquet")["style"]) == {"ink", "chalk"}
    assert set(json.loads((run_dir / "summary.json").read_text())) == {"ink", "chalk"}
    report = (run_dir / "report.html").read_text()
    assert "Ink" in report and "Chalk" in report


def test_broken_cached_files_are_named_rebuilt_and_give_the_same_results(run_folder, both_styles, capsys):
    """A truncated latent cache and a deleted weight file (ink), a garbled model card (chalk): one rerun."""
    run_dir, run = run_folder
    [latents] = (run_dir / "curated" / "ink.latents").glob("*.safetensors")
    latents.write_bytes(latents.read_bytes()[:100])
    weights = run_dir / "models" / "ink" / "styleboost" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    card = run_dir / "models" / "chalk" / "styleboost" / "model_card.json"
    card.write_text(card.read_text()[:40])
    assert run("ink", "chalk") == 0
    out = capsys.readouterr().out
    assert f"{weights} is missing: training it again" in out and weights.is_file()
    assert f"{card} does not parse: training it again" in out and json.loads(card.read_text())["method"] == "styleboost"
    assert latents.with_name(f"{latents.name}.corrupt-0").is_file()  # moved aside (named in the worker's log)
    encoded = load_file(latents)  # and encoded again: per image, its 2 views
    assert sorted(encoded, key=int) == [str(i) for i in range(8)] and encoded["0"].shape[0] == 2
    pd.testing.assert_frame_equal(scores(run_dir), both_styles)


def test_changed_samples_take_their_styles_rows_out_until_evaluated_again(run_folder, both_styles, capsys):
    run_dir, _ = run_folder
    run = load_run(parse_args("", ["--config", str(run_dir.parent.parent / "run.yaml")]))
    marker = run_dir / "samples" / "chalk" / "base" / "samples.json"
    stamp = marker.read_text()
    marker.write_text(json.dumps({**json.loads(stamp), "key": "other"}))
    table, _ = assemble_scores(run)
    assert "chalk: scores left out, the samples of ['base'] changed" in capsys.readouterr().out
    assert set(table.column("style").to_pylist()) == {"ink"}
    marker.write_text(stamp)
    assert set(assemble_scores(run)[0].column("style").to_pylist()) == {"ink", "chalk"}


def test_a_truncated_checkpoint_falls_back_to_the_one_before_then_to_the_base(tiny_model, tmp_path):
    models = load_sd1(tiny_model)
    method, cfg = get_method("styledrop"), TrainConfig()
    groups = method.prepare(models, cfg)
    optimizer = build_optimizer(groups, cfg, torch.device("cpu"))
    earlier, latest = tmp_path / "step_2", tmp_path / "step_4"
    for folder, step in ((earlier, 2), (latest, 4)):
        folder.mkdir()
        save_checkpoint(folder, "job", models, ["unet"], optimizer, step, [0.5] * step)
    (latest / "unet.safetensors").write_bytes((latest / "unet.safetensors").read_bytes()[:64])
    assert restore_checkpoint("job", models, ["unet"], optimizer, [latest, earlier])[:1] == (2,)
    (earlier / "optimizer.pt").write_bytes(b"")
    assert restore_checkpoint("job", models, ["unet"], optimizer, [latest, earlier]) == (0, [], None)
    assert restore_checkpoint("other job", models, ["unet"], optimizer, [tmp_path / "step_2"]) == (0, [], None)
