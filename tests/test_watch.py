"""Watching a run: the progress view's plain lines, TensorBoard event files of a short run (scalars, validation
samples, evaluation metrics) read back with TensorBoard's own reader, and train.report_to checked at load."""
from __future__ import annotations

import importlib.util
import io
import json
import re

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import train
from style_factory.config import ConfigError, load_run_config
from style_factory.progress import Counter, View
from style_factory.run import REGISTRY, load_run, parse_args
from style_factory.train import plan_training
from tests.conftest import E2E_STYLES
from tests.helpers import make_style

STEPS = 4  # the session run's (tests/conftest.py), and the key test's own runs
STYLE = E2E_STYLES[0]


def run_config(root, name: str, **train_fields) -> str:
    config = {"name": name, "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
              "baselines": [], "train": {"max_steps": STEPS, "checkpoint_every": 2, **train_fields},
              "evaluate": {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "num_inference_steps": 3}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def watched_run(e2e_run):
    """The session's end-to-end run (4 steps, validation samples every 2, evaluated) and what it printed."""
    run_dir, config_path, code = e2e_run
    out = (config_path.parent / "stdout.log").read_text()
    assert code == 0, out
    return config_path.parent, run_dir, out


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.ray
@pytest.mark.slow
def test_event_files_hold_training_scalars_validation_images_and_metrics(watched_run):
    _, run_dir, _ = watched_run
    trained = events(run_dir / "tensorboard" / STYLE / "styleboost")
    tags = trained.Tags()
    for tag in ("train/loss", "train/loss/denoising", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert [e.step for e in trained.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    log = [json.loads(line) for line in (run_dir / "logs" / STYLE / "styleboost" / "train_log.jsonl").open()]
    assert [round(e.value, 4) for e in trained.Scalars("train/loss")] == [round(e["loss"], 4) for e in log]
    assert trained.Scalars("train/lr")[0].value == pytest.approx(1e-4)
    assert all(e.value > 0 for e in trained.Scalars("train/grad_norm") + trained.Scalars("train/images_per_s"))
    assert {"validation/0", "validation/1"} <= set(tags["images"])
    assert [e.step for e in trained.Images("validation/0")] == [2, 4]
    assert trained.Images("validation/0")[0].width == 64
    results = json.loads((run_dir / "models" / STYLE / "styleboost" / "model_card.json").read_text())["metrics"]
    kids = trained.Scalars("eval/kid")  # one per evaluation: a test may have rerun the session's run
    assert {k.step for k in kids} == {STEPS} and kids[-1].value == pytest.approx(results["kid"])
    assert {"eval/fid", "eval/clip_t", "eval/style_sim", "eval/kid_vs_base"} <= set(tags["scalars"])
    base = events(run_dir / "tensorboard" / STYLE / "base")
    assert {e.step for e in base.Scalars("eval/kid")} == {0}


@pytest.mark.ray
@pytest.mark.slow
def test_non_tty_run_prints_plain_progress_lines_with_counts(watched_run):
    _, _, out = watched_run
    assert "[progress] train: 8/8 steps trained, 2/2 models, done in" in out  # 2 styles x 4 StyleBoost steps
    # per style: base, StyleBoost and StyleAligned, 2 prompts x 2 seeds
    assert "[progress] sample: 24/24 images sampled, done in" in out
    assert re.search(r"\[progress\] curate: (\d+)/\1 images decoded", out)
    progress = [line for line in out.splitlines() if line.startswith("[progress]")]
    assert "\r" not in out and not any("\x1b[" in line for line in progress)  # no bar redraws, no terminal codes


@pytest.mark.ray
@pytest.mark.slow
def test_tracking_and_validation_leave_training_bitwise_unchanged(watched_run):
    """The same job with no tracker and no validation trains the same weights and losses, bit for bit."""
    root, run_dir, _ = watched_run
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["name"] = "unwatched"
    config["train"].update(report_to=[], validation_every=0)
    (root / "unwatched.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(root / "unwatched.yaml"), "--style", STYLE]) == 0
    plain_dir = root / "results" / "unwatched"
    assert not (plain_dir / "tensorboard").exists()
    log = f"logs/{STYLE}/styleboost/train_log.jsonl"
    assert (plain_dir / log).read_text() == (run_dir / log).read_text()
    cards = [json.loads((d / "models" / STYLE / "styleboost" / "model_card.json").read_text())
             for d in (run_dir, plain_dir)]
    assert cards[0]["files"] == cards[1]["files"]  # every exported file's sha256


def test_watch_settings_are_not_part_of_a_jobs_key(tmp_path):
    """Turning tracking or validation on or off reuses the trained models; a training setting retrains them."""
    make_style(tmp_path / "styles", "ink", "qxv", n_ref=4, n_aux=4)

    def keys(name: str, **train_fields) -> list[str]:
        args = parse_args("test", ["--config", run_config(tmp_path, name, **train_fields)])
        return [job.key for job in plan_training(load_run(args))]

    plain = keys("plain")
    assert keys("watched", report_to=[], validation_every=5, validation_prompts=["a cat"]) == plain
    assert keys("longer", max_steps=STEPS + 1) != plain


def test_plain_lines_at_milestones_and_at_most_every_interval():
    counter, stream = Counter(), io.StringIO()
    view = View(counter.snapshot, stream, plain_seconds=3600)
    counter.report("train", {"a/styleboost": (0, 10), "b/styleboost": (0, 10)})
    view.update()
    counter.report("train", {"a/styleboost": (5, 10)})
    view.update()  # no milestone, the interval not yet passed: no line
    counter.report("train", {"a/styleboost": (10, 10)})
    view.update()  # a model finished
    counter.report("train", {"b/styleboost": (10, 10), "b/styleboost-round1": (3, 10)})  # a part may appear late
    view.update(final=True)
    lines = stream.getvalue().splitlines()
    assert [line.split(", ")[0:2] for line in lines] == [
        ["[progress] train: 0/20 steps trained", "0/2 models"],
        ["[progress] train: 10/20 steps trained", "1/2 models"],
        ["[progress] train: 23/30 steps trained", "2/3 models"]]
    assert lines[0].endswith("ETA --") and re.search(r"/s, ETA \d+m\d\ds$", lines[1])


def test_report_to_an_unknown_tracker_fails_at_load_naming_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"report_to": ["nosuch"]}}))
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.report_to: .*unknown tracker 'nosuch'"):
        load_run_config(path, REGISTRY)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_a_tracker_that_is_not_installed_says_so(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"report_to": ["tensorboard", "wandb"]}}))
    with pytest.raises(ConfigError, match=r"train\.report_to: .*wandb is not installed \(pip install wandb\)"):
        load_run_config(path, REGISTRY)
