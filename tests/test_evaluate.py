"""Scoring without Ray: score_entries on small PNGs with the toy backbone."""
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from style_factory import backbones, metrics
from style_factory.control import canny_map, edge_alignment
from style_factory.evaluate import EDGE_COLUMNS, FEATURES_SCHEMA, NOISE_FLOOR, image_scores, kid_change_scores, score_entries

PROMPTS = ["a red circle", "a blue square", "a green star"]
SEEDS = [0, 1]
N_REFERENCE = 7  # odd: the two noise-floor halves differ in size (4 and 3)
N_HELDOUT = 3


def write_pngs(folder: Path, count: int, seed: int, brightness: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 100, size=(32, 32, 3)) + brightness
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def toy_backbones():
    with pytest.warns(UserWarning, match="NOT comparable"):
        inception = backbones.load_inception("toy")
    with pytest.warns(UserWarning, match="NOT comparable"):
        clip = backbones.load_clip("toy")
    return inception, clip, backbones.load_dino("toy")


@pytest.fixture(scope="module")
def scored(toy_backbones, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    reference = write_pngs(run_dir / "samples" / "ink" / "ref", N_REFERENCE, seed=0, brightness=0)
    heldout = write_pngs(run_dir / "samples" / "ink" / "heldout", N_HELDOUT, seed=9, brightness=0)
    pairs = [(i, seed) for i in range(len(PROMPTS)) for seed in SEEDS]
    entries = [{"style": "ink", "method": method, "images": write_pngs(run_dir / "samples" / "ink" / method, len(pairs),
                                                                         seed=1 + m, brightness=60 * m),
                "prompt_indices": [i for i, _ in pairs], "seeds": [seed for _, seed in pairs],
                "texts": [PROMPTS[i] for i, _ in pairs], "reference": reference, "heldout": heldout}
               for m, method in enumerate(["base", "styleboost"])]
    rows, features = score_entries(entries, *toy_backbones, seed=0, run_id="test", run_dir=run_dir)
    table = pa.Table.from_pylist(features, schema=FEATURES_SCHEMA).to_pandas()
    return {row["method"]: row for row in rows}, table


def test_features_have_one_row_per_image_and_backbone_and_recompute_the_scores(scored, toy_backbones):
    rows, features = scored
    inception, clip, dino = toy_backbones
    assert dino.info.name == inception.info.name  # the toy DINO slot reuses the toy image embedding: stored once
    per_method = features.groupby(["method", "backbone"]).size().to_dict()
    n_images = len(PROMPTS) * len(SEEDS)
    assert per_method == {("base", inception.info.name): n_images, ("base", clip.info.name): n_images,
                          ("styleboost", inception.info.name): n_images, ("styleboost", clip.info.name): n_images,
                          ("ref", inception.info.name): N_REFERENCE, ("ref", clip.info.name): N_REFERENCE,
                          ("heldout", inception.info.name): N_HELDOUT, ("heldout", clip.info.name): N_HELDOUT}
    ref = features[features.method == "ref"]
    assert ref.image.str.startswith("samples/ink/ref/").all() and ref.prompt_index.isna().all()
    base = features[(features.method == "base") & (features.backbone == inception.info.name)]
    assert list(base.prompt_index) == [0, 0, 1, 1, 2, 2] and list(base.seed) == SEEDS * 3

    def stacked(method: str, backbone: str) -> np.ndarray:
        return np.stack(features[(features.method == method) & (features.backbone == backbone)].feature.to_list())

    for method in ("base", "styleboost"):
        gen, ref_feats = stacked(method, inception.info.name), stacked("ref", inception.info.name)
        assert metrics.kid(gen, ref_feats, seed=0) == rows[method]["kid"]
        assert metrics.fid(gen, ref_feats) == rows[method]["fid"]
        style_sim = float(metrics.style_cosines(stacked(method, clip.info.name), stacked("ref", clip.info.name)).mean())
        assert style_sim == rows[method]["style_sim"]
        consistency = metrics.set_consistency(gen, np.array(SEEDS * len(PROMPTS)))
        assert np.mean(consistency) == pytest.approx(rows[method]["style_consistency"], abs=1e-12)
        held = stacked("heldout", inception.info.name)
        assert metrics.kid(gen, held, seed=0) == rows[method]["kid_heldout"] and rows[method]["n_heldout"] == N_HELDOUT


def test_kid_spread_and_intervals_hold_their_point_estimates(scored):
    rows, _ = scored
    for method in ("base", "styleboost", NOISE_FLOOR):
        row = rows[method]
        assert math.isfinite(row["kid_std"]) and row["kid_std"] > 0
        for name in ("kid", "style_sim", "style_consistency") + (() if method == NOISE_FLOOR else ("clip_t",)):
            assert row[f"{name}_ci_low"] <= row[name] <= row[f"{name}_ci_high"], (method, name)
            assert row[f"{name}_ci_low"] < row[f"{name}_ci_high"], (method, name)
    assert rows["styleboost"]["kid"] > rows["base"]["kid"]  # brighter images lie further from the references


def test_kid_change_against_the_base_is_paired_on_prompt_and_seed(scored):
    rows, _ = scored
    tuned, base = rows["styleboost"], rows["base"]
    assert tuned["kid_vs_base"] == pytest.approx(tuned["kid"] - base["kid"], rel=1e-12)
    assert 0 < tuned["kid_vs_base_ci_low"] <= tuned["kid_vs_base"] <= tuned["kid_vs_base_ci_high"]
    assert math.isnan(base["kid_vs_base"]) and "kid_vs_base" not in rows[NOISE_FLOOR]


def test_paired_interval_finds_a_shift_that_separate_intervals_miss():
    """Both models draw the same varied content per (prompt, seed); the tuned one is shifted towards the
    references. Each KID interval holds the content's spread and they overlap; the paired one excludes 0."""
    rng = np.random.default_rng(0)
    ref_feats = rng.normal(size=(20, 16)) + 1.0
    content = 2.0 * rng.normal(size=(40, 16))
    base, tuned = content, content + 0.3

    def interval(feats):
        return metrics.percentile_interval(metrics.kid_bootstrap(feats, ref_feats, metrics.bootstrap_indices(40, 0)))

    assert interval(tuned)[1] > interval(base)[0]
    change = kid_change_scores(tuned, base, ref_feats, seed=0)
    assert change["kid_vs_base_ci_low"] <= change["kid_vs_base"] <= change["kid_vs_base_ci_high"] < 0
    with pytest.raises(ValueError, match="needs the base's 40 images, got 39"):
        kid_change_scores(tuned[:39], base, ref_feats, seed=0)


def test_intervals_are_reproducible_under_the_seed():
    rng = np.random.default_rng(0)
    feats, ref_feats = rng.normal(size=(12, 8)), rng.normal(size=(10, 8))
    gen_clip, ref_clip, text_emb = rng.normal(size=(12, 4)), rng.normal(size=(10, 4)), rng.normal(size=(12, 4))
    gen_dino, sets = rng.normal(size=(12, 6)), [0, 1] * 6

    def scores(seed: int) -> dict:
        return image_scores(feats, gen_clip, gen_dino, sets, text_emb, ref_feats, ref_clip, seed=seed)

    first = scores(3)
    assert scores(3) == first
    assert scores(4)["kid_ci_low"] != first["kid_ci_low"]


def test_noise_floor_scores_the_two_halves_of_the_references(scored):
    rows, _ = scored
    floor = rows[NOISE_FLOOR]
    assert (floor["n_images"], floor["n_reference"]) == (4, 3)  # even and odd indices of 7
    assert math.isnan(floor["clip_t"]) and math.isnan(floor["clip_t_ci_low"]) and math.isnan(floor["clip_t_ci_high"])
    assert floor["kid"] < rows["styleboost"]["kid"]



def test_set_consistency_is_the_mean_cosine_within_each_set():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # set 0: images 0 and 2 (cosine 0); set 1: images 1 and 3 (cosine 1/sqrt(2))
    values = metrics.set_consistency(emb, np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(values, [0, 1 / np.sqrt(2), 0, 1 / np.sqrt(2)], atol=1e-12)
    assert np.isnan(metrics.set_consistency(emb[:3], np.array([0, 0, 1]))[2])  # alone in its set


def test_without_csd_weights_its_columns_are_nan_and_labelled_not_available(scored):
    rows, _ = scored
    for row in rows.values():
        assert row["csd_backbone"] == backbones.CSD_NOT_AVAILABLE and math.isnan(row["style_sim_csd"])
        assert "CSD" not in row["backbone_sha256"]  # the protocol's digests name only backbones that scored
    assert math.isnan(rows["base"]["inception_score"])  # the toy backbone has no ImageNet classes


def test_csd_style_similarity_and_the_inception_score_recompute_from_the_features(toy_backbones, tmp_path):
    inception, clip, dino = toy_backbones
    # an output layer of 10 classes, as the real network's 1008
    classes = np.random.default_rng(1).normal(size=(10, inception.model.toy.clip.config.projection_dim))
    with_classes = backbones.FeatureExtractor(inception.model, backbones.TOY_CLIP_VISION["image_size"],
                                              inception.info, "cpu", class_weight=classes)
    torch.manual_seed(0)
    weight_file = tmp_path / backbones.CSD_FILE_NAME
    save_file(backbones.Csd(width=64, layers=2, embed_dim=32).state_dict(), str(weight_file))  # CSD's names
    csd = backbones.load_csd(str(weight_file))
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    reference = write_pngs(tmp_path / "ref", 4, seed=0, brightness=0)
    heldout = write_pngs(tmp_path / "heldout", 2, seed=9, brightness=0)
    entries = [{"style": "ink", "method": method, "images": write_pngs(tmp_path / method, 4, 1 + m, 60 * m),
                "prompt_indices": [i for i, _ in pairs], "seeds": [s for _, s in pairs],
                "texts": [PROMPTS[i] for i, _ in pairs], "reference": reference, "heldout": heldout}
               for m, method in enumerate(["base", "styleboost"])]
    rows, feature_rows = score_entries(entries, with_classes, clip, dino, seed=0, run_id="t", run_dir=tmp_path,
                                       csd=csd)
    rows = {row["method"]: row for row in rows}
    features = pa.Table.from_pylist(feature_rows, schema=FEATURES_SCHEMA).to_pandas()
    name = csd.info.name

    def stacked(method: str, backbone: str) -> np.ndarray:
        return np.stack(features[(features.method == method) & (features.backbone == backbone)].feature.to_list())

    for method in ("base", "styleboost"):
        row = rows[method]
        assert row["csd_backbone"] == name and json.loads(row["backbone_sha256"])[name] == csd.info.sha256
        for part, ref in (("", "ref"), ("_heldout", "heldout")):
            value = float(metrics.style_cosines(stacked(method, name), stacked(ref, name)).mean())
            assert row[f"style_sim_csd{part}"] == value
            assert row[f"style_sim_csd{part}_ci_low"] <= value <= row[f"style_sim_csd{part}_ci_high"]
        score = metrics.inception_score(stacked(method, inception.info.name).astype(np.float64) @ classes.T)
        assert row["inception_score"] == score
        assert row["inception_score_ci_low"] <= score <= row["inception_score_ci_high"]
    ref_csd = stacked("ref", name)
    floor = rows[NOISE_FLOOR]
    assert floor["style_sim_csd"] == float(metrics.style_cosines(ref_csd[::2], ref_csd[1::2]).mean())
    assert math.isnan(floor["style_sim_csd_heldout"]) and "inception_score" not in floor


def test_a_controlled_set_is_scored_on_its_edges_and_the_others_are_nan(toy_backbones, tmp_path):
    """Two sets against one square's edges: the squares' own images follow them, the squares moved away do not."""
    def squares(folder: Path, offsets: list[int]) -> list[str]:
        folder.mkdir(parents=True)
        paths = []
        for i, offset in enumerate(offsets):
            pixels = np.zeros((32, 32, 3), np.uint8)
            pixels[8 + offset:24 + offset, 8:24] = 255
            paths.append(str(folder / f"img_{i:03d}.png"))
            Image.fromarray(pixels).save(paths[-1])
        return paths

    edges = tmp_path / "control_edges.png"
    canny_map(Image.open(squares(tmp_path / "content", [0])[0]), 100, 200).save(edges)
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    common = {"style": "ink", "prompt_indices": [i for i, _ in pairs], "seeds": [s for _, s in pairs],
              "texts": [PROMPTS[i] for i, _ in pairs], "reference": write_pngs(tmp_path / "ref", 4, 0, 0),
              "heldout": write_pngs(tmp_path / "heldout", 2, 9, 0)}
    entries = [{**common, "method": "base", "images": write_pngs(tmp_path / "base", 4, 1, 0)},
               {**common, "method": "followed", "images": squares(tmp_path / "followed", [0, 0, 1, 0]),
                "control_edges": str(edges)},
               {**common, "method": "ignored", "images": squares(tmp_path / "ignored", [6, 7, 8, 6]),
                "control_edges": str(edges)}]
    rows = {row["method"]: row for row in score_entries(entries, *toy_backbones, seed=0, run_id="t",
                                                        run_dir=tmp_path)[0]}
    assert all(math.isnan(rows["base"][column]) for column in EDGE_COLUMNS)
    for method in ("followed", "ignored"):
        per_image = [edge_alignment(Image.open(path).convert("RGB"), Image.open(edges))
                     for path in next(e for e in entries if e["method"] == method)["images"]]
        row = rows[method]
        assert row["edge_alignment"] == pytest.approx(np.mean(per_image))
        assert row["edge_alignment_ci_low"] <= row["edge_alignment"] <= row["edge_alignment_ci_high"]
    assert rows["followed"]["edge_alignment"] > 0.9 > 0.5 > rows["ignored"]["edge_alignment"]
