import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import timm
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from style_factory import backbones, metrics, toyworld

REPO_ROOT = Path(__file__).resolve().parents[1]


def gaussian_features(seed: int, n: int = 200, dim: int = 16, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=shift, size=(n, dim))


def sample_images(count: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (48, 80), (100, 70)]  # non-square too: both backbones must resize
    return [
        Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 3], 3), dtype=np.uint8)) for i in range(count)
    ]


# ----------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    feats = gaussian_features(seed=0)
    assert abs(metrics.fid(feats, feats)) < 1e-6


def test_fid_of_a_shifted_set_is_the_squared_shift():
    # same covariance, means differ by `shift`: FID = |shift|^2 exactly
    feats = gaussian_features(seed=0)
    shift = np.linspace(0.1, 1.0, feats.shape[1])
    assert metrics.fid(feats, feats + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)
    assert metrics.fid(feats, feats + 2 * shift) > metrics.fid(feats, feats + shift)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="dims differ"):
        metrics.fid(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.fid(np.zeros(5), np.zeros(5))


# ----------------------------------------------------------------------------- KID


def test_kid_is_reproducible_for_a_seed():
    feats_a, feats_b = gaussian_features(seed=1, n=300), gaussian_features(seed=2, n=300)
    # subsets of 100 out of 300: the draws depend on the seed
    first = metrics.kid(feats_a, feats_b, seed=7, max_subset_size=100)
    again = metrics.kid(feats_a, feats_b, seed=7, max_subset_size=100)
    other_seed = metrics.kid(feats_a, feats_b, seed=8, max_subset_size=100)
    assert first == again
    assert first != other_seed


def test_kid_with_whole_set_subsets_equals_the_unbiased_reference():
    feats_a, feats_b = gaussian_features(seed=1, n=120), gaussian_features(seed=2, n=120, shift=0.3)
    subset_kid = metrics.kid(feats_a, feats_b, num_subsets=10, max_subset_size=1000)
    assert subset_kid == pytest.approx(metrics.kid_unbiased(feats_a, feats_b), abs=1e-9)


def test_kid_leaves_the_global_numpy_rng_untouched():
    np.random.seed(123)
    state_before = np.random.get_state()
    metrics.kid(gaussian_features(seed=1), gaussian_features(seed=2), seed=5)
    state_after = np.random.get_state()
    assert state_before[0] == state_after[0]
    assert np.array_equal(state_before[1], state_after[1])
    assert state_before[2:] == state_after[2:]


@pytest.mark.slow
def test_kid_is_near_zero_for_one_distribution_and_large_for_shifted_ones():
    reference = gaussian_features(seed=1, n=300)
    same = metrics.kid(reference, gaussian_features(seed=2, n=300))
    shifted = metrics.kid(reference, gaussian_features(seed=3, n=300, shift=0.5))
    assert abs(same) < 0.02  # -0.007 here: sampling noise of 300 vs 300 in 16-d
    assert shifted > 0.5  # 1.05 here
    assert shifted > 50 * abs(same)


def test_kid_bootstrap_leaves_copies_of_one_image_out_of_the_within_set_mean():
    rng = np.random.default_rng(0)
    feats, ref_feats = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    identity = np.arange(6)[None, :]
    assert metrics.kid_bootstrap(feats, ref_feats, identity)[0] == pytest.approx(metrics.kid_unbiased(feats, ref_feats))
    doubled = np.array([[0, 0, 1, 1, 2, 2]])  # each image twice: the same pairs as the three distinct images
    assert metrics.kid_bootstrap(feats, ref_feats, doubled)[0] == pytest.approx(
        metrics.kid_unbiased(feats[:3], ref_feats))
    assert np.isnan(metrics.kid_bootstrap(feats, ref_feats, np.zeros((1, 6), dtype=int))[0])


def test_percentile_interval_leaves_out_nan_resamples():
    values = np.array([np.nan, *range(101)], dtype=float)
    assert metrics.percentile_interval(values) == pytest.approx((2.5, 97.5))


# ----------------------------------------------------------------------------- CLIP scores


def test_image_text_cosines_on_hand_made_vectors():
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    text_emb = np.array([[1.0, 0.0], [1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    # cosines of the pairs: 1, 0, sqrt(0.5)
    assert metrics.image_text_cosines(image_emb, text_emb) == pytest.approx([1, 0, np.sqrt(0.5)], abs=1e-12)
    with pytest.raises(ValueError, match="one text per image"):
        metrics.image_text_cosines(image_emb, text_emb[:2])


def test_style_cosines_on_hand_made_vectors():
    gen_emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    ref_emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # gen 0 to refs: 1, 0, -1 -> mean 0; gen 1 to refs: 0, 1, 0 -> mean 1/3
    assert metrics.style_cosines(gen_emb, ref_emb) == pytest.approx([0, 1 / 3], abs=1e-12)
    assert metrics.style_cosines(ref_emb[:1], ref_emb[:1]) == pytest.approx([1.0], abs=1e-12)


# ----------------------------------------------------------------------------- the toy backbone


def toy_features() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with pytest.warns(UserWarning, match="NOT comparable"):
        inception = backbones.load_inception("toy")
    with pytest.warns(UserWarning, match="NOT comparable"):
        clip = backbones.load_clip("toy")
    images = sample_images()
    return inception.embed(images, batch_size=4), clip.embed_images(images, batch_size=4), clip.embed_texts(["a", "b"])


def test_toy_backbone_shapes_norms_and_labels():
    inception_feats, image_emb, text_emb = toy_features()
    assert inception_feats.shape == (6, 64) and inception_feats.dtype == np.float64
    assert image_emb.shape == (6, 64) and text_emb.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-12)
    for info in (backbones.toy_inception("cpu").info, backbones.toy_clip("cpu").info):
        assert not info.real and len(info.sha256) == 64
        assert "toy" in info.name and "NOT REAL" in info.name


@pytest.mark.slow
def test_toy_backbone_is_bitwise_deterministic_across_loads_and_processes():
    in_process = toy_features()
    assert all(np.array_equal(a, b) for a, b in zip(in_process, toy_features()))

    script = (
        "import hashlib, warnings; warnings.simplefilter('ignore')\n"
        "from tests.test_metrics import toy_features\n"
        "print(*[hashlib.sha256(f.tobytes()).hexdigest() for f in toy_features()])\n"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert other_process.stdout.split() == [hashlib.sha256(f.tobytes()).hexdigest() for f in in_process]


def test_toy_clip_matches_captions_to_their_scenes():
    """The trained backbone knows its world: each rendered scene is nearest to its own caption."""
    scenes = [toyworld.sample_scene(np.random.default_rng(seed), n_objects=1) for seed in range(12)]
    with pytest.warns(UserWarning):
        clip = backbones.load_clip("toy")
    image_emb = clip.embed_images([toyworld.render_plain(scene, 64) for scene in scenes])
    text_emb = clip.embed_texts([toyworld.caption(scene) for scene in scenes])
    top1 = (image_emb @ text_emb.T).argmax(axis=1)
    assert (top1 == np.arange(len(scenes))).mean() >= 0.5  # chance is 1/12


# ----------------------------------------------------------------------------- Inception Score


def direct_inception_score(logits: np.ndarray) -> float:
    """IS written out image by image: exp(mean_x sum_y p(y|x) log(p(y|x) / p(y)))."""
    probs = [np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in logits]
    marginal = np.mean(probs, axis=0)
    kls = [sum(p[y] * np.log(p[y] / marginal[y]) for y in range(len(p))) for p in probs]
    return float(np.exp(np.mean(kls)))


def test_inception_score_equals_a_direct_computation_on_known_logits():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(12, 7))
    assert metrics.inception_score(logits) == pytest.approx(direct_inception_score(logits), rel=1e-12)
    # images sure of 4 distinct classes, equally often: IS = 4; all alike: IS = 1
    confident = np.repeat(100.0 * np.eye(4, 10), 3, axis=0)
    assert metrics.inception_score(confident) == pytest.approx(4.0, rel=1e-9)
    assert metrics.inception_score(np.tile(logits[:1], (5, 1))) == pytest.approx(1.0, rel=1e-12)
    assert metrics.inception_score(1e4 * confident) == pytest.approx(4.0, rel=1e-9)  # no probability underflows to NaN
    # a bootstrap resample scores the images it draws, with their own p(y)
    indices = metrics.bootstrap_indices(len(logits), seed=0, resamples=3)
    np.testing.assert_allclose(metrics.inception_score_bootstrap(logits, indices),
                               [direct_inception_score(logits[idx]) for idx in indices], rtol=1e-12)


# ----------------------------------------------------------------------------- loading


def test_explicit_missing_paths_raise_naming_the_path():
    with pytest.raises(FileNotFoundError, match="/nonexistent/x.pt"):
        backbones.load_inception("/nonexistent/x.pt")
    with pytest.raises(FileNotFoundError, match="/nonexistent/clip.safetensors"):
        backbones.load_clip("ViT-B-32:/nonexistent/clip.safetensors")


def test_auto_without_weights_warns_and_falls_back_to_the_toy_backbone(tmp_path, monkeypatch):
    # make sure no real weights can be found, whatever this machine has in its caches
    monkeypatch.setattr(backbones, "STYLE_FACTORY_CACHE_DIR", tmp_path / "style-factory")
    monkeypatch.setattr(backbones, "try_to_load_from_cache", lambda repo_id, filename: None)
    with pytest.warns(UserWarning, match="NO REAL INCEPTION WEIGHTS"):
        inception = backbones.load_inception("auto", models_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="NO REAL CLIP WEIGHTS"):
        clip = backbones.load_clip("auto", models_dir=str(tmp_path))
    assert not inception.info.real and not clip.info.real
    assert "toy" in inception.info.name and "toy" in clip.info.name


class FakeInceptionLayers(nn.Module):
    """Stands in for the torchscript Inception's `layers`: returns the per-channel input means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


class FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()
        self.output = nn.Linear(2048, 1008)  # the 1008 classes the real network's output layer has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_real_inception_path_feeds_clean_fid_scaled_299px_images(tmp_path, monkeypatch):
    weight_file = tmp_path / backbones.INCEPTION_FILE_NAME
    torch.jit.save(torch.jit.script(FakeInception()), str(weight_file))

    inception = backbones.load_inception("auto", models_dir=str(tmp_path))
    assert inception.info.real
    assert inception.info.sha256 == hashlib.sha256(weight_file.read_bytes()).hexdigest()

    flat_colour = Image.new("RGB", (40, 64), (200, 100, 0))  # resizing keeps a flat colour flat
    features = inception.embed([flat_colour, flat_colour])
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(features[0, :3], [(200 - 128) / 128, (100 - 128) / 128, -1.0], atol=1e-5)
    # the Inception Score's logits: the output layer's weight, without its bias
    scripted = torch.jit.load(str(weight_file))
    np.testing.assert_array_equal(inception.class_weight, scripted.output.weight.detach().numpy())


SMALL_OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, patch_size=16, width=64, head_width=32, layers=2),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


def test_clip_checkpoint_path_with_arch_prefix_loads_the_weights(tmp_path):
    # register a small open_clip architecture under a name, save random weights, load them back by path
    config_file = tmp_path / "small-test-clip.json"
    config_file.write_text(json.dumps(SMALL_OPEN_CLIP))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.CLIP(**SMALL_OPEN_CLIP).eval()
    weight_file = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(weight_file))

    loaded = backbones.load_clip(f"small-test-clip:{weight_file}")
    assert loaded.info.real and loaded.info.sha256 == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    images = sample_images()
    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess(image.convert("RGB")) for image in images])
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(loaded.embed_images(images), expected, atol=1e-5)


def test_dino_weights_in_models_dir_are_found_and_used(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "try_to_load_from_cache", lambda repo_id, filename: None)
    monkeypatch.setattr(backbones, "STYLE_FACTORY_CACHE_DIR", tmp_path / "style-factory")
    with pytest.warns(UserWarning, match="NO REAL DINO WEIGHTS"):
        assert not backbones.load_dino("auto", models_dir=str(tmp_path)).info.real

    torch.manual_seed(0)
    model = timm.create_model(backbones.DINO_ARCH, pretrained=False, num_classes=0).eval()
    weight_file = tmp_path / backbones.DINO_FILE_NAME
    save_file(model.state_dict(), str(weight_file))
    dino = backbones.load_dino("auto", models_dir=str(tmp_path))
    assert dino.info.real and dino.info.sha256 == hashlib.sha256(weight_file.read_bytes()).hexdigest()

    image = Image.new("RGB", (50, 70), (200, 100, 0))  # flat: the resize keeps every pixel at this color
    mean, std = np.array(backbones.IMAGENET_MEAN), np.array(backbones.IMAGENET_STD)
    pixels = torch.tensor((np.array([200, 100, 0]) / 255 - mean) / std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixels.expand(1, 3, 224, 224)).numpy()
    np.testing.assert_allclose(dino.embed([image]), expected, atol=1e-4)
