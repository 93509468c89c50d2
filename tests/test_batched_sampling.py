"""Batched sampling: `evaluate.batch_size` images per pipeline call, across the prompts and seeds of one model.

Every image is drawn from its own seeded generator, so cutting a set into batches differently must leave its images
as they are, up to the round-off of batched float kernels (convolutions and matmuls block a batch of another size
differently). TOLERANCE bounds that: the largest difference of any pixel channel between the PNGs made at batch 1
and at batch N, in 8-bit levels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from style_factory.config import ConfigError, RunConfig, load_run_config, load_styles
from style_factory.evaluate import plan_samples
from style_factory.generate import generate_all
from style_factory.methods.base import ClassImages
from style_factory.methods.stylealigned import StyleAlignedOptions, StyleAlignedSampler, ddim_invert
from style_factory.priors import write_class_images
from style_factory.run import REGISTRY, Run
from style_factory.sampling import SampleJob, batch_size_for, draws, generate_images, sample_name
from style_factory.train import plan_training
from tests.helpers import load_sd1_pipeline, make_style, noise_image

TOLERANCE = 2  # max |pixel difference| in 8-bit levels between batch 1 and batch N (measured: at most 1)
PROMPTS = ["a large red circle on a white background", "a small blue square on a yellow background",
           "a large green triangle on a pink background"]
STEPS = 4


def sample_job(out_dir: Path, base_model: str, key: str = "k" * 64) -> SampleJob:
    return SampleJob(style="s", method="base", family="sd1", base_model=base_model, model_dir="", prompts=PROMPTS,
                     seeds=[0, 1], out_dir=str(out_dir), key=key, resolution=64, num_inference_steps=STEPS,
                     guidance_scale=5.0)


def pixels(folder: Path, names: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / name).convert("RGB"), np.int16) for name in names])


def set_pixels(job: SampleJob) -> np.ndarray:
    return pixels(Path(job.out_dir), [sample_name(i, seed) for i, seed in draws(job)])


def assert_same_images(one: np.ndarray, batched: np.ndarray) -> None:
    assert one.shape == batched.shape
    assert np.abs(one - batched).max() <= TOLERANCE
    # and not one image repeated: each image comes from its own generator
    assert all(np.abs(one[i] - one[j]).max() > 10 * TOLERANCE for i in range(len(one)) for j in range(i))


@pytest.mark.slow
def test_batch_1_and_batch_n_give_the_same_images(tmp_path, tiny_model):
    pipe = load_sd1_pipeline(tiny_model)
    one, batched = sample_job(tmp_path / "one", tiny_model), sample_job(tmp_path / "five", tiny_model)
    generate_images(one, pipe, 1)
    generate_images(batched, pipe, 5)  # 6 images in calls of 5 and 1: one call mixes all three prompts
    assert_same_images(set_pixels(one), set_pixels(batched))


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["inverted", "generated"])
def test_stylealigned_batched_equals_unbatched(tmp_path, tiny_model, reference):
    """Every call carries the reference at row 0; targets attend to it and themselves only, so the cut is free."""
    pipe = load_sd1_pipeline(tiny_model)
    opts = StyleAlignedOptions(inversion_steps=STEPS, reference=reference)
    image, caption = noise_image(7, (64, 64)), "a ref picture number 0"
    if reference == "inverted":
        sampler = StyleAlignedSampler(pipe, image, caption, opts,
                                      ddim_invert(pipe, image, caption, STEPS, opts.inversion_guidance_scale))
    else:
        sampler = StyleAlignedSampler(pipe, None, caption, opts, None)
    one, batched = sample_job(tmp_path / "one", tiny_model), sample_job(tmp_path / "four", tiny_model)
    generate_images(one, sampler, 1)
    generate_images(batched, sampler, 4)
    assert_same_images(set_pixels(one), set_pixels(batched))


@pytest.mark.slow
def test_class_images_do_not_depend_on_the_batch_size(tmp_path, tiny_model):
    request = ClassImages(prompt="an image, style", count=5, num_inference_steps=STEPS, guidance_scale=5.0)
    for batch_size in (1, 3):
        write_class_images("sd1", tiny_model, 64, request, tmp_path / f"b{batch_size}", "cpu", batch_size)
    names = [f"{i:05d}.png" for i in range(request.count)]
    assert_same_images(pixels(tmp_path / "b1", names), pixels(tmp_path / "b3", names))


def test_the_batch_size_is_in_no_key(tmp_path):
    """Sample sets (and the trainings whose methods sample, StyleDrop's feedback) are keyed by what decides their
    pixels. The batch size changes none beyond TOLERANCE (the tests above), so it is left out of every key: a run at
    another batch size (another device, its "auto") reuses the samples and models already made."""
    make_style(tmp_path / "styles", "alpha", "zwx")

    def run(batch_size) -> Run:
        config = RunConfig(styles_dir=str(tmp_path / "styles"), results_dir=str(tmp_path / "results"),
                           model={"base": "tiny"}, methods=["styledrop"], evaluate={"batch_size": batch_size})
        return Run(config=config, styles=load_styles(config, REGISTRY))

    small, large = run(1), run("auto")
    assert [j.key for j in plan_samples(small, {})] == [j.key for j in plan_samples(large, {})]
    trainings = plan_training(small), plan_training(large)
    assert [j.key for j in trainings[0]] == [j.key for j in trainings[1]]
    assert [j.sample_batch_size for j in trainings[0]] == [1, 1]  # styledrop and the stylealigned baseline
    assert batch_size_for("auto", "cpu") == 8 and batch_size_for("auto", "cuda:0") == 32
    assert batch_size_for(3, "cuda") == 3


@pytest.mark.ray
@pytest.mark.slow
def test_the_evaluation_pass_batches_across_prompts_and_reuses_across_batch_sizes(tmp_path, ray_session, tiny_model):
    """generate_all at batch 4 (rows of mixed prompts through the Ray Data actors) gives the images of batch 1; a
    second pass at another batch size finds the set done and leaves it as it is."""
    one = sample_job(tmp_path / "one", tiny_model)
    generate_images(one, load_sd1_pipeline(tiny_model), 1)
    batched = sample_job(tmp_path / "samples", tiny_model)
    assert generate_all([batched], batch_size=4) == {}
    assert batched.is_done()
    assert_same_images(set_pixels(one), set_pixels(batched))
    written = {p.name: p.stat().st_mtime_ns for p in Path(batched.out_dir).iterdir()}
    assert generate_all([batched], batch_size=1) == {}
    assert {p.name: p.stat().st_mtime_ns for p in Path(batched.out_dir).iterdir()} == written


@pytest.mark.parametrize("value", [0, -1, "big", True, 2.5])
def test_a_wrong_batch_size_fails_at_load_naming_the_field(tmp_path, value):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"batch_size": value}}))
    with pytest.raises(ConfigError, match=r"run.yaml: evaluate.batch_size"):
        load_run_config(path, REGISTRY)
    path.write_text(yaml.safe_dump({"evaluate": {"batch_size": 16}}))
    assert load_run_config(path, REGISTRY).evaluate.batch_size == 16
