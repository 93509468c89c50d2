"""Aspect-ratio buckets, caption dropout and the training data's memory: in-process, no Ray."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from style_factory.config import CurateConfig, TrainConfig, load_style
from style_factory.curate import curate_style, list_candidates
from style_factory.decode import DecodeBatch, bucket_sizes, decode_image
from style_factory.data import StyleData, curated_table
from style_factory.loop import build_optimizer, draw_batch, encode_latent_cache, optimisation_step, step_generator
from style_factory.methods import get_method
from style_factory.run import REGISTRY
from tests.helpers import REPO, load_sd1, make_style, noise_image
from tests.test_train import toy_data

BUCKETS = CurateConfig(buckets=True, bucket_step=16)  # at the presets' 64 px: 48x80, 64x64, 80x48
# what StyleData holds per image, measured with tracemalloc (docs/performance.md): 3 bytes a pixel and ~650 bytes
BYTES_PER_IMAGE = {512: 787_000, 1024: 3_146_000}


def test_buckets_hold_about_the_runs_pixels_between_1_2_and_2_1():
    assert bucket_sizes(64, 16) == [(48, 80), (64, 64), (80, 48)]
    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (1344, 768) in sizes and (768, 1344) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0 and 0.5 <= width / height <= 2
        assert 0.85 * 1024 ** 2 <= width * height <= 1024 ** 2


@pytest.fixture
def bucketed(tmp_path):
    """A style of 3:2, 1:1 and 9:16 StyleRef and Aux images (3, 2 and 1 of each), curated with buckets."""
    style_dir = make_style(tmp_path, "mixed", "qvz", n_ref=6, n_aux=6)
    shapes = [(96, 64)] * 3 + [(64, 64)] * 2 + [(54, 96)]  # width, height
    for role, seed in (("ref", 0), ("aux", 500)):
        for i, shape in enumerate(shapes):
            noise_image(seed + i, shape).save(style_dir / role / f"{role}_{i:02d}.png")
    style = load_style(style_dir, REGISTRY)
    candidates = list_candidates(style)
    batch = DecodeBatch(BUCKETS.model_dump(), 64)({"path": np.array([str(c.path.resolve()) for c in candidates])})
    rows = {path: dict(zip(batch, values)) for path, values in zip(batch["path"], zip(*batch.values()))}
    curate_style(style, candidates, rows, BUCKETS, 64, tmp_path / "curated")
    return style_dir, tmp_path / "curated" / "mixed.parquet"


def test_each_image_goes_to_its_bucket_with_its_crop_recorded(bucketed):
    style_dir, curated = bucketed
    table = pd_table(curated)
    assert len(table) == 12  # no image lost
    expected = {(96, 64): (80, 48), (64, 64): (64, 64), (54, 96): (48, 80)}
    for _, row in table.iterrows():
        source = Image.open(style_dir / row.source_path)
        width, height = expected[source.size]
        image = Image.open(io.BytesIO(row.image))
        assert (row.width, row.height) == image.size == (width, height)
        assert (row.original_width, row.original_height) == source.size
        # the recorded crop: the source resized to cover the bucket, cut at (left, top), is the curated image
        scale = max(width / source.width, height / source.height)
        covered = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.LANCZOS)
        errors = {(left, top): np.abs(np.asarray(covered.crop((left, top, left + width, top + height)), float)
                                      - np.asarray(image, float)).mean()
                  for left in range(covered.width - width + 1) for top in range(covered.height - height + 1)}
        best = min(errors, key=errors.get)  # on whole pixels: the centre of a 53-row cover of 48 rows is 2.5
        assert abs(best[0] - row.crop_left) <= 1 and abs(best[1] - row.crop_top) <= 1
    assert {(r.crop_left, r.crop_top) for _, r in table.iterrows()} == {(0, 3), (0, 0)}  # centred: 2.67 -> 3
    assert StyleData.load(curated).resolution == 64


def pd_table(path):
    import pandas as pd

    return pd.read_parquet(path)


@pytest.mark.slow
def test_batches_come_from_one_bucket_and_a_small_bucket_still_trains(bucketed, tiny_model):
    data = StyleData.load(bucketed[1])
    method, cfg = get_method("styleboost"), TrainConfig(batch_size=2, max_steps=2, train_text_encoder=False)
    drawn = set()
    for step in range(60):
        batch = draw_batch(method, data, cfg, step, 0, step_generator(cfg.seed, step, 0)[0])
        sizes = {tuple(size) for size in data.sizes[batch.rows]}
        assert len(sizes) == 1 and len(batch.rows) == 4  # 2 StyleRef + 2 Aux, all of one bucket
        drawn |= set(batch.rows.tolist())
    assert drawn == set(range(12))  # the 9:16 bucket (one image per role, fewer than the batch) trains too
    models = load_sd1(tiny_model)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    assert {tuple(latent.shape[-2:]) for latent in cache} == {(12, 20), (16, 16), (20, 12)}
    optimizer = build_optimizer(method.prepare(models, cfg), cfg, torch.device("cpu"))
    losses = [optimisation_step(models, method, data, cache, optimizer, cfg, step, 0, torch.device("cpu"))
              for step in range(2)]
    assert np.isfinite(losses).all()


def test_square_images_are_unchanged_by_buckets():
    """The example styles' square (96x96) images; their 4:3 ones go to the 80x48 bucket (docs/methods.md)."""
    data = next(p for p in sorted((REPO / "styles" / "anime" / "ref").rglob("*.png"))
                if Image.open(p).size == (96, 96)).read_bytes()
    plain, bucketed = decode_image(data, CurateConfig(), 64), decode_image(data, BUCKETS, 64)
    assert plain[0].tobytes() == bucketed[0].tobytes() and plain[2] == bucketed[2]
    assert plain[2]["width"] == plain[2]["height"] == 64


def test_caption_dropout_rate_and_reproducibility():
    data, method = toy_data(concepts=1), get_method("styleboost")
    cfg = TrainConfig(batch_size=4, caption_dropout=0.25)
    plain = TrainConfig(batch_size=4)

    def batches(config):
        return [draw_batch(method, data, config, step, 0, step_generator(config.seed, step, 0)[0])
                for step in range(500)]

    dropped, kept = batches(cfg), batches(plain)
    prompts = [p for b in dropped for p in b.prompts]
    rate = np.mean([not p.startswith("caption") for p in prompts])
    assert abs(rate - 0.25) < 0.03  # 4000 prompts: the standard error is 0.007
    assert {p for p in prompts if not p.startswith("caption")} == {"zwx style", "style"}  # the style words stay
    assert [b.prompts for b in dropped] == [b.prompts for b in batches(cfg)]  # seeded: a rerun draws the same
    for a, b in zip(dropped, kept):  # the rows and views are those drawn without dropout
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.views, b.views)
    assert all(p.startswith("caption") for b in kept for p in b.prompts)


@pytest.mark.parametrize("resolution", [512, 1024])
def test_training_data_memory_per_image_is_the_stated_figure(tmp_path, resolution):
    count = 4
    pixels = np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    row = {"style": "big", "role": "ref", "concept": 0, "token": "zwx", "class_word": "style", "caption": "a",
           "caption_source": "sidecar", "image": buffer.getvalue(), "width": resolution, "height": resolution,
           "original_width": resolution, "original_height": resolution, "crop_left": 0, "crop_top": 0,
           "content_hash": "", "source_path": "ref/a.png"}
    curated = tmp_path / "big.parquet"
    import pyarrow.parquet as pq

    pq.write_table(curated_table([row] * count, resolution), curated)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = StyleData.load(curated)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(data.images) == count and data.images[0].dtype == np.uint8
    assert abs(held / count - BYTES_PER_IMAGE[resolution]) <= 0.1 * BYTES_PER_IMAGE[resolution]
