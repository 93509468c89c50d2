"""DreamBooth on the tiny preset: the class-image stage (generated once, shared, keyed), batches, a real training run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from style_factory.config import RunConfig, TrainConfig, load_styles
from style_factory.curate import curate_styles
from style_factory.data import StyleData
from style_factory.methods import get_method
from style_factory.priors import generate_class_images, plan_class_images
from style_factory.run import REGISTRY, Run
from style_factory.train import plan_training, train_styles
from tests.helpers import make_style

CLASS_IMAGES = {"num_class_images": 3, "class_inference_steps": 2}


def make_run(root: Path, styles: list[str], **dreambooth) -> Run:
    config = RunConfig(name="db", styles_dir=str(root / "styles"), results_dir=str(root / "results"),
                       methods=["dreambooth"], baselines=[], styles=styles,
                       train={"max_steps": 2, "checkpoint_every": 2, "train_text_encoder": False,
                              "method_options": {"dreambooth": {**CLASS_IMAGES, **dreambooth}}})
    return Run(config=config, styles=load_styles(config, REGISTRY))


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_session) -> Path:
    """Two curated styles whose concepts share the class word "style", and their class images."""
    root = tmp_path_factory.mktemp("dreambooth")
    make_style(root / "styles", "alpha", "zwx", n_ref=4, n_aux=2, seed=1)
    make_style(root / "styles", "beta", "qxp", n_ref=4, n_aux=2, seed=2)
    run = make_run(root, ["alpha", "beta"])
    curate_styles(run)
    assert not run.failed("alpha") and not run.failed("beta"), run.outcomes
    return root


def test_class_images_are_generated_once_and_shared(root):
    run = make_run(root, ["alpha", "beta"])
    folders = generate_class_images(run)
    assert len(folders) == 1  # both styles ask for "style" x 3 at the same settings: one set
    manifest = folders[0] / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["prompt"] == "style"
    assert sorted(p.name for p in folders[0].glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert {tuple(job.prior_dirs) for job in plan_training(run)} == {(str(folders[0]),)}

    assert generate_class_images(run) == []  # the second call generates nothing
    assert manifest.stat().st_mtime_ns == written

    other = make_run(root, ["alpha"], class_prompt="a painting in {class_word}")
    [(folder, request)] = plan_class_images(other).items()
    assert request.prompt == "a painting in style" and folder != folders[0]
    assert not folder.exists()


def test_batches_hold_class_images_with_the_class_prompt_and_prior_weight(root):
    run = make_run(root, ["alpha"])
    generate_class_images(run)
    [job] = plan_training(run)
    cfg = TrainConfig.model_validate({**job.train, "prior_loss_weight": 0.5, "batch_size": 2})
    data = job.load_data()
    assert (data.roles == "prior").sum() == 3 and (data.roles == "aux").sum() == 2
    batch = get_method("dreambooth").sample_batch(data, cfg, np.random.default_rng(0))
    assert list(data.roles[batch.rows]) == ["ref", "ref", "prior", "prior"]
    assert all(p.endswith(", zwx style") for p in batch.prompts[:2])
    assert batch.prompts[2:] == ["style", "style"]
    torch.testing.assert_close(batch.weights, torch.tensor([0.5, 0.5, 0.25, 0.25]))

    without_priors = StyleData.load(Path(job.curated_path))
    with pytest.raises(ValueError, match="no class images"):
        get_method("dreambooth").check_data(without_priors, cfg)


def test_training_with_a_frozen_text_encoder_changes_only_the_unet(root):
    run = make_run(root, ["alpha"])
    trained = train_styles(run)
    assert run.outcomes["alpha"]["train:dreambooth"] == "ok", run.outcomes
    model = Path(trained[("alpha", "dreambooth")])
    base = Path(plan_training(run)[0].base_model)
    for part, changed in (("text_encoder", False), ("unet", True)):
        [weights] = [f.name for f in (base / part).glob("*.safetensors")]
        before, after = load_file(base / part / weights), load_file(model / part / weights)
        equal = [torch.equal(before[k], after[k]) for k in before]
        assert (not all(equal)) if changed else all(equal), part
    assert len(run.train_log("alpha", "dreambooth").read_text().splitlines()) == 2
