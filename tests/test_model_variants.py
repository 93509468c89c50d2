"""Which models a run trains: one per sweep point and training seed, each with its own key and folder, and the
kept checkpoint steps (evaluate.checkpoints) beside them. Planning only: no Ray, no training."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from style_factory.config import ConfigError, load_run_config, load_styles
from style_factory.files import folder_manifest
from style_factory.run import REGISTRY, Run
from style_factory.train import plan_training
from style_factory.train_job import MODEL_CARD, TrainJob
from tests.helpers import make_style


def run_of(tmp_path: Path, **fields) -> Run:
    styles = tmp_path / "styles"
    if not styles.exists():
        make_style(styles, "alpha", "zwx", n_ref=2, n_aux=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"styles_dir": "styles", "results_dir": "results", "baselines": [],
                                    "methods": ["styleboost", "textboost"], **fields}))
    config = load_run_config(path, REGISTRY)
    return Run(config=config, styles=load_styles(config, REGISTRY))


def config_error(tmp_path: Path, **fields) -> str:
    with pytest.raises(ConfigError) as err:
        run_of(tmp_path, **fields)
    return str(err.value)


def test_a_grid_has_every_combination_in_order(tmp_path):
    sweep = run_of(tmp_path, sweep={"space": {"textboost": {
        "learning_rate": [1e-4, 1e-3], "method_options.rank": [2, 4, 8]}}}).config.sweep
    points = sweep.points("textboost")
    assert len(points) == 6 and points[0] == {"learning_rate": 1e-4, "method_options.rank": 2}
    assert points[-1] == {"learning_rate": 1e-3, "method_options.rank": 8}
    assert sweep.points("styleboost") == []  # not swept


def test_a_random_search_draws_its_budget_from_its_seed(tmp_path):
    space = {"styleboost": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
                            "max_steps": {"low": 2, "high": 9, "integer": True}, "prior_loss_weight": [0.5, 1.0]}}
    sweep = run_of(tmp_path, sweep={"search": "random", "budget": 5, "seed": 3, "space": space}).config.sweep
    points = sweep.points("styleboost")
    assert len(points) == 5 and points == sweep.points("styleboost")  # the same draws every time
    assert all(1e-5 <= p["learning_rate"] <= 1e-3 and 2 <= p["max_steps"] <= 9 and isinstance(p["max_steps"], int)
               and p["prior_loss_weight"] in (0.5, 1.0) for p in points)
    assert len({p["learning_rate"] for p in points}) == 5
    other = run_of(tmp_path, sweep={"search": "random", "budget": 5, "seed": 4, "space": space}).config.sweep
    assert other.points("styleboost") != points


def test_a_sweep_that_cannot_run_fails_at_load_naming_the_field(tmp_path):
    assert "run.yaml: sweep.space: Value error, styleboost.learning_rat: not a train setting" in config_error(
        tmp_path, sweep={"space": {"styleboost": {"learning_rat": [1e-4]}}})
    assert "not a train setting a sweep can vary" in config_error(
        tmp_path, sweep={"space": {"styleboost": {"seed": [1, 2]}}})  # train.seeds varies it
    assert "greater than 0" in config_error(tmp_path, sweep={"space": {"styleboost": {"learning_rate": [-1.0]}}})
    assert "not an option of textboost" in config_error(
        tmp_path, sweep={"space": {"textboost": {"method_options.rnak": [4]}}})
    assert "greater than or equal to 1" in config_error(
        tmp_path, sweep={"space": {"textboost": {"method_options.rank": [0]}}})
    assert "need search: random" in config_error(
        tmp_path, sweep={"space": {"styleboost": {"learning_rate": {"low": 1e-5, "high": 1e-4}}}})
    assert "needs a budget" in config_error(
        tmp_path, sweep={"search": "random", "space": {"styleboost": {"learning_rate": [1e-4]}}})
    assert "seeds must be unique" in config_error(tmp_path, train={"seeds": [1, 1]})
    assert "stylealigned.learning_rate: stylealigned trains nothing; sweep its own options" in config_error(
        tmp_path, baselines=["stylealigned"], sweep={"space": {"stylealigned": {"learning_rate": [1e-4]}}})


def finish(job: TrainJob) -> None:
    """A model folder as the export leaves it: a file, and the card holding the job's key and the file's facts."""
    folder = Path(job.model_dir)
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(job.key.encode())
    (folder / MODEL_CARD).write_text(json.dumps({"key": job.key, "files": folder_manifest(folder)}))


def test_seeds_and_sweep_points_are_models_of_their_own_reused_on_rerun(tmp_path):
    sweep = {"space": {"styleboost": {"learning_rate": [5e-5, 1e-4]}}}
    jobs = plan_training(run_of(tmp_path, sweep=sweep, train={"seeds": [1337, 1338]}))
    names = [job.model_name for job in jobs]
    assert names == ["styleboost-p0", "styleboost-p0-s1338", "styleboost-p1", "styleboost-p1-s1338",
                     "textboost", "textboost-s1338"]
    assert len({job.key for job in jobs}) == 6 and len({job.model_dir for job in jobs}) == 6
    assert jobs[1].columns == {"train_seed": 1338, "sweep.learning_rate": 5e-5} and jobs[4].columns == {
        "train_seed": 1337}
    assert [job.train["seed"] for job in jobs] == [1337, 1338] * 3
    assert [job.train["learning_rate"] for job in jobs[:4]] == [5e-5, 5e-5, 1e-4, 1e-4]
    for job in jobs:
        finish(job)
    again = plan_training(run_of(tmp_path, sweep=sweep, train={"seeds": [1337, 1338]}))
    assert [job.key for job in again] == [job.key for job in jobs] and all(job.is_done() for job in again)
    # adding a seed trains that seed alone; the default seed's model keeps its name and key, as without seeds
    more = plan_training(run_of(tmp_path, sweep=sweep, train={"seeds": [1337, 1338, 7]}))
    assert [job.model_name for job in more if not job.is_done()] == ["styleboost-p0-s7", "styleboost-p1-s7",
                                                                    "textboost-s7"]
    plain = plan_training(run_of(tmp_path))
    assert plain[1].model_name == "textboost" and plain[1].key == jobs[4].key and plain[1].is_done()


def test_kept_checkpoint_steps_are_models_beside_the_final_one(tmp_path):
    [final] = [j for j in plan_training(run_of(tmp_path, train={"max_steps": 4})) if j.method == "styleboost"]
    finish(final)
    every = run_of(tmp_path, train={"max_steps": 4}, evaluate={"checkpoints": {"every": 2}})
    [job] = [j for j in plan_training(every) if j.method == "styleboost"]
    assert job.keep_steps == [2] and job.key == final.key  # keeping a step changes no weight: the same key
    assert not job.is_done() and job.problem() == "its step 2 model: no model yet"  # but the step's model is still to make
    step = job.step_job(2)
    assert step.model_name == "styleboost-step2" and step.model_dir == f"{job.model_dir}-step2"
    assert step.key not in (job.key, job.step_job(3).key) and step.keep_steps == []
    finish(step)
    assert job.is_done()
    listed = run_of(tmp_path, train={"max_steps": 4}, evaluate={"checkpoints": [4, 1, 9, 2]})
    assert [j.keep_steps for j in plan_training(listed)] == [[1, 2], [1, 2]]  # the final step is the model itself


SWEEP_DEMO = Path(__file__).parents[1] / "configs" / "sweep-demo.yaml"


def test_the_sweep_demo_config_plans_its_16_models_each_kept_at_step_2(tmp_path):
    """configs/sweep-demo.yaml on its two example styles: 2 methods x 2 learning rates x 2 training seeds a style,
    every one 4 steps (per_method over pixel-art's own 120), scored at step 2 beside its last."""
    config = yaml.safe_load(SWEEP_DEMO.read_text())
    config.update(styles_dir=str(Path(__file__).parents[1] / "styles"), results_dir=str(tmp_path / "results"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    loaded = load_run_config(tmp_path / "run.yaml", REGISTRY)
    jobs = plan_training(Run(config=loaded, styles=load_styles(loaded, REGISTRY)))
    assert len(jobs) == 16 and len({(job.style, job.key) for job in jobs}) == 16  # uncurated: one data key
    assert {(job.style, job.model_name) for job in jobs} == {
        (style, f"{method}-p{point}{seed}") for style in ("anime", "pixel-art") for method in ("styleboost", "textboost")
        for point in (0, 1) for seed in ("", "-s1338")}
    assert {job.train["max_steps"] for job in jobs} == {4} and all(job.keep_steps == [2] for job in jobs)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_scores_seeds_points_and_steps_and_a_rerun_trains_nothing(ray_session, tmp_path):
    """The sweep demo's dimensions at their least (one style, one method x 2 learning rates x 2 training seeds,
    scored at step 2 and 4): every model is a row with its step, seed and swept value; best.parquet names one."""
    from jobs import all_styles

    make_style(tmp_path / "styles", "alpha", "zwx", n_ref=4, n_aux=4)
    config = {"name": "sweep", "styles_dir": str(tmp_path / "styles"), "results_dir": str(tmp_path / "results"),
              "methods": ["textboost"], "baselines": [],
              "train": {"max_steps": 4, "checkpoint_every": 2, "seeds": [1337, 1338], "batch_size": 1,
                        "report_to": [], "export": {"single_file": False}},  # the least work per model
              "sweep": {"space": {"textboost": {"learning_rate": [1.0e-4, 1.0e-3]}}},
              "evaluate": {"checkpoints": [2], "prompts": ["a large red circle on a white background",
                                                           "a small blue square on a yellow background"],
                           "seeds": [0], "num_inference_steps": 3}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert all_styles.main(["--config", str(path)]) == 0
    run_dir = tmp_path / "results" / "sweep"
    results = pd.read_parquet(run_dir / "results.parquet")
    models = results[results["method"] == "textboost"]
    assert len(models) == 2 * 2 * 2  # points x seeds x steps
    assert sorted(models["step"].unique()) == [2, 4] and sorted(models["train_seed"].unique()) == [1337, 1338]
    assert sorted(models["sweep.learning_rate"].unique()) == [1e-4, 1e-3]
    assert results[results["method"] == "base"]["step"].isna().all()
    assert set(models["model_dir"].str.rsplit("/", n=1).str[1]) == {
        f"textboost-p{point}{seed}{step}" for point in (0, 1) for seed in ("", "-s1338") for step in ("", "-step2")}
    [best] = pd.read_parquet(run_dir / "best.parquet").to_dict("records")
    assert best["style"] == "alpha" and best["method"] in {"base", "textboost"} and best["why"]
    assert best["tied"] is not None
    if best["method"] != "base":
        assert best["n_train_seeds"] == 2 and "step" in json.loads(best["settings"])
    trained = {d.name for d in (run_dir / "models" / "alpha").iterdir()}
    assert {"textboost-p0-s1338-step2", "textboost-p1-step2", "textboost-p1-s1338"} <= trained
    assert all_styles.main(["--config", str(path)]) == 0
    stages = [outcome for stage, outcome in json.loads((run_dir / "summary.json").read_text())["alpha"].items()
              if stage.startswith("train:")]
    assert len(stages) == 4 and set(stages) == {"reused"}


def test_the_report_plots_each_metric_against_the_step(tmp_path):
    """A chart per style and metric, a line per configuration, once some model was scored at two steps."""
    from style_factory.report import write_report
    from tests.test_report import make_run

    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"], "watercolor": ["base", "styleboost"]})
    results = pd.read_parquet(run_dir / "results.parquet")
    results["step"] = results["method"].map({"styleboost": 4})
    results.to_parquet(run_dir / "results.parquet")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "metrics_by_step.png" not in page  # one step per model: nothing to plot against
    earlier = results[results["method"] == "styleboost"].assign(step=2, kid=0.2)
    pd.concat([results, earlier]).to_parquet(run_dir / "results.parquet")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert 'src="report_assets/metrics_by_step.png"' in page
    assert (run_dir / "report_assets" / "metrics_by_step.png").stat().st_size > 0


def test_the_step_of_a_checkpoint_is_read_from_its_folder_name(tmp_path):
    """What the worker compares with a missing kept step before it resumes: a checkpoint's step, from its folder's
    name; another job's checkpoint is no step of this one."""
    from style_factory.worker import checkpoint_prefix, checkpoint_step

    [job, other] = plan_training(run_of(tmp_path, train={"max_steps": 4}, evaluate={"checkpoints": [2]}))
    assert checkpoint_step(job, Path(f"/x/{checkpoint_prefix(job)}-step_0000003")) == 3
    assert checkpoint_step(job, Path(f"/x/{checkpoint_prefix(other)}-step_0000003")) == 0


def test_a_zero_shot_method_sweeps_its_options_as_models_without_a_training_seed(tmp_path):
    sweep = {"space": {"stylealigned": {"method_options.shared_score_scale": [0.5, 1.0]}}}
    jobs = [job for job in plan_training(run_of(tmp_path, baselines=["stylealigned"], sweep=sweep,
                                                train={"seeds": [1337, 1338]})) if job.method == "stylealigned"]
    assert [job.model_name for job in jobs] == ["stylealigned-p0", "stylealigned-p1"]  # the seeds train, it does not
    assert [job.columns for job in jobs] == [{"sweep.method_options.shared_score_scale": 0.5},
                                            {"sweep.method_options.shared_score_scale": 1.0}]
    assert [job.train["method_options"]["stylealigned"]["shared_score_scale"] for job in jobs] == [0.5, 1.0]
    assert len({job.key for job in jobs}) == 2
