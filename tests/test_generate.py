"""Generation as one Ray Data pass on an actor pool: resumable per image, one broken model costs only itself."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from style_factory.generate import generate_all, partial_dir
from style_factory.sampling import SampleJob, sample_name

PROMPTS = ["a large red circle on a white background", "a small blue square on a yellow background"]


def job(tmp_path, base_model: str, method: str = "base", model_dir: str = "", key: str = "k" * 64) -> SampleJob:
    return SampleJob(style="s", method=method, family="sd1", base_model=base_model, model_dir=model_dir,
                     prompts=PROMPTS, seeds=[0, 1], out_dir=str(tmp_path / "samples" / "s" / method), key=key,
                     resolution=64, num_inference_steps=2, guidance_scale=2.0)


def test_images_made_before_an_interruption_are_kept_and_the_rest_made(tmp_path, ray_session, tiny_model):
    base = job(tmp_path, tiny_model)
    folder = partial_dir(base)
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / sample_name(0, 0))  # left by an interrupted run
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / sample_name(0, 1))

    assert generate_all([base]) == {}

    out = tmp_path / "samples" / "s" / "base"
    assert base.is_done() and not folder.exists()
    assert np.asarray(Image.open(out / sample_name(0, 0))).max() == 3  # prompt 0 was not sampled again
    assert np.asarray(Image.open(out / sample_name(1, 1))).max() > 3  # prompt 1 was
    assert json.loads((out / "samples.json").read_text())["prompts"] == PROMPTS


def test_a_broken_model_reports_its_error_and_the_others_finish(tmp_path, ray_session, tiny_model):
    good = job(tmp_path, tiny_model, key="g" * 64)
    broken = job(tmp_path, tiny_model, method="styleboost", model_dir=str(tmp_path / "no-such-model"))
    failures = generate_all([good, broken])
    assert set(failures) == {("s", "styleboost")} and "no-such-model" in failures[("s", "styleboost")]
    assert good.is_done() and not broken.is_done()
