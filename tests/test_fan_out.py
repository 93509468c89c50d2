"""The fan-out: jobs dealt into groups, each group one Ray Train run whose workers load the base once."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from style_factory.config import RunConfig, TrainConfig, load_styles
from style_factory.curate import curate_styles
from style_factory.run import REGISTRY, Run
from style_factory.train import group_jobs, plan_training, train_all
from style_factory.train_group import group_name
from style_factory.train_job import TrainJob
from tests.helpers import make_style


def job(style: str, steps: int = 10, done: bool = False, tmp: Path | None = None, **train) -> TrainJob:
    model_dir = ""
    if done:  # a finished job: its model card holds its key
        (tmp / style).mkdir(parents=True)
        (tmp / style / "model_card.json").write_text(json.dumps({"key": f"key-{style}"}))
        model_dir = str(tmp / style)
    return TrainJob(style=style, method="styleboost", family="sd1", key=f"key-{style}", base_model="base",
                    curated_path="", model_dir=model_dir, log_path="", storage_path="", style_config={},
                    train=TrainConfig(max_steps=steps, **train).model_dump())


def names(groups: list[list[TrainJob]]) -> list[list[str]]:
    return [[j.style for j in group] for group in groups]


def test_jobs_are_dealt_longest_first_to_the_group_with_the_fewest_steps():
    jobs = [job("a", 10), job("b", 50), job("c", 30), job("d", 20), job("e", 40)]
    assert names(group_jobs(jobs, 2)) == [["b", "d", "a"], ["e", "c"]]  # 80 and 70 steps
    assert names(group_jobs([job("long", 120), job("short", 2), job("other", 2)], 2)) == [
        ["long"], ["short", "other"]]
    assert names(group_jobs(jobs, 8)) == [["b"], ["e"], ["c"], ["d"], ["a"]]  # never more groups than jobs


def test_only_jobs_of_one_kind_share_a_group():
    jobs = [job("a"), job("b", cpus_per_worker=2), job("c"), job("d", cpus_per_worker=2), job("e")]
    assert names(group_jobs(jobs, 2)) == [["a", "e"], ["c"], ["b"], ["d"]]
    other_base = replace(job("f"), base_model="another")
    assert names(group_jobs([job("a"), other_base, job("c")], 1)) == [["a", "c"], ["f"]]


def test_groups_do_not_change_when_jobs_finish(tmp_path):
    """A rerun after an interruption must form the same Ray Train runs, to resume their checkpoints."""
    before = group_jobs([job("a", 30), job("b", 20), job("c", 10)], 2)
    after = group_jobs([job("a", 30, done=True, tmp=tmp_path), job("b", 20), job("c", 10)], 2)
    assert [group_name(g) for g in before] == [group_name(g) for g in after]
    assert group_name([job("a")]) == job("a").trainer_name  # a one-job group keeps the job's name
    assert names(before) == [["a"], ["b", "c"]]
    assert group_name(before[1]).startswith("b-styleboost-key-b+1-")  # the first job, then how many follow


@pytest.fixture(scope="module")
def warm_and_alone(ray_session, tmp_path_factory):
    """alpha then beta trained in turn by one group (one slot), and beta trained alone by a group of its own."""
    root = tmp_path_factory.mktemp("warm")
    make_style(root / "styles", "alpha", "zwx")
    make_style(root / "styles", "beta", "ukj", seed=1)
    config = RunConfig(name="warm", styles_dir=str(root / "styles"), results_dir=str(root / "results"),
                       baselines=[], train=TrainConfig(max_steps=6, checkpoint_every=3))
    run = Run(config=config, styles=load_styles(config, REGISTRY))
    curate_styles(run)
    alpha, beta = plan_training(run)
    together = train_all([alpha, beta], max_concurrent=1)
    alone_dir = root / "alone"
    beta_alone = replace(beta, model_dir=str(alone_dir / "model"), log_path=str(alone_dir / "train_log.jsonl"),
                         storage_path=str(alone_dir / "ray_train"))
    alone = train_all([beta_alone], max_concurrent=1)
    return run, alpha, beta, beta_alone, together, alone


def test_one_group_trains_several_styles_in_one_ray_train_run(warm_and_alone):
    run, alpha, beta, _, together, _ = warm_and_alone
    assert [together[(j.style, "styleboost")]["status"] for j in (alpha, beta)] == ["trained", "trained"]
    assert [p.name for p in (run.dir / "ray_train").iterdir()] == [group_name([alpha, beta])]
    for trained in (alpha, beta):
        log = [json.loads(line) for line in Path(trained.log_path).read_text().splitlines()]
        assert [entry["step"] for entry in log] == list(range(1, 7))
        assert json.loads((Path(trained.model_dir) / "model_card.json").read_text())["train_seconds"] > 0


def test_a_style_trained_after_another_equals_the_style_trained_alone(warm_and_alone):
    """The warm worker resets to the base weights for each job: nothing of alpha leaks into beta."""
    _, alpha, beta, beta_alone, _, alone = warm_and_alone
    assert alone[("beta", "styleboost")]["status"] == "trained"
    unet = "unet/diffusion_pytorch_model.safetensors"
    after_alpha, by_itself = load_file(Path(beta.model_dir) / unet), load_file(Path(beta_alone.model_dir) / unet)
    assert all((after_alpha[name] == by_itself[name]).all() for name in by_itself)
    assert Path(beta.log_path).read_text() == Path(beta_alone.log_path).read_text()
    alpha_unet = load_file(Path(alpha.model_dir) / unet)
    assert any(not (alpha_unet[name] == by_itself[name]).all() for name in by_itself)  # each learnt its own style


def test_a_group_retrains_several_invalidated_jobs_after_its_checkpoints_moved_on(warm_and_alone):
    """Rerun a finished group whose jobs all need training again (their models were deleted): the restored
    checkpoint is beta's, alpha's reports make checkpoint retention delete it, and beta must not reach for it."""
    _, alpha, beta, _, _, _ = warm_and_alone
    unet = "unet/diffusion_pytorch_model.safetensors"
    before = {j.style: load_file(Path(j.model_dir) / unet) for j in (alpha, beta)}
    for trained in (alpha, beta):
        shutil.rmtree(trained.model_dir)
    again = train_all([alpha, beta], max_concurrent=1)
    assert [again[(j.style, "styleboost")]["status"] for j in (alpha, beta)] == ["trained", "trained"], again
    for trained in (alpha, beta):  # trained from the base again, not resumed from a stale checkpoint
        after = load_file(Path(trained.model_dir) / unet)
        assert all((after[name] == before[trained.style][name]).all() for name in after)
