"""The toy world, its style renderers and the committed example styles (styles/)."""
from __future__ import annotations

import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from style_factory.renderers import PIXEL_ART_BLOCKS, PIXEL_ART_PALETTE, RENDERERS
from style_factory.toyworld import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    RELATIONS,
    SIZES,
    caption,
    render_plain,
    sample_scene,
    scene_from_seed,
    scene_geometry,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLES_DIR = REPO_ROOT / "styles"
EXAMPLE_STYLES = ("realism", "anime", "romanticism", "cubism", "pixel-art", "watercolor")
SIZES_TO_TRY = (96, (128, 96), (96, 128))


def _alternatives(words) -> str:
    return "|".join(re.escape(word) for word in words)


OBJECT = rf"a ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) ({_alternatives(KINDS)})"
PHRASE_TO_BACKGROUND = {background.phrase: name for name, background in BACKGROUNDS.items()}
CAPTION = re.compile(
    rf"^{OBJECT}(?: ({_alternatives(RELATIONS)}) {OBJECT})? ({_alternatives(PHRASE_TO_BACKGROUND)})$"
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.int16)


def centroid(coverage: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]]
    return (xs * coverage).sum() / coverage.sum(), (ys * coverage).sum() / coverage.sum()


def test_same_seed_gives_same_scene_caption_and_pixels():
    for seed in range(10):
        assert scene_from_seed(seed) == scene_from_seed(seed)
        assert caption(scene_from_seed(seed)) == caption(scene_from_seed(seed))
        assert render_plain(scene_from_seed(seed), 96).tobytes() == render_plain(scene_from_seed(seed), 96).tobytes()
        for name, render in RENDERERS.items():
            first = render(scene_from_seed(seed), 64, np.random.default_rng(seed))
            second = render(scene_from_seed(seed), 64, np.random.default_rng(seed))
            assert first.tobytes() == second.tobytes(), name


def test_different_seeds_give_different_scenes():
    captions = {caption(scene_from_seed(seed)) for seed in range(100)}
    assert len(captions) > 90
    assert render_plain(scene_from_seed(0), 96).tobytes() != render_plain(scene_from_seed(1), 96).tobytes()


def test_caption_names_exactly_the_scene_content():
    for seed in range(300):
        scene = scene_from_seed(seed)
        match = CAPTION.match(caption(scene))
        assert match, caption(scene)
        size, color, kind, relation, *second, phrase = match.groups()
        assert (size, color, kind) == (scene.objects[0].size, scene.objects[0].color, scene.objects[0].kind)
        assert relation == scene.relation
        if relation is None:
            assert len(scene.objects) == 1
        else:
            other = scene.objects[1]
            assert tuple(second) == (other.size, other.color, other.kind)
        assert PHRASE_TO_BACKGROUND[phrase] == scene.background


def test_captions_carry_no_style_words():
    style_words = {"style", "painting", "realism", "photo", "anime", "romantic", "cubist", "pixel", "watercolor"}
    for seed in range(100):
        assert not style_words & set(caption(scene_from_seed(seed)).split())


def test_relation_matches_where_objects_are_drawn_apart():
    seeds = [seed for seed in range(200) if scene_from_seed(seed).relation is not None]
    assert len(seeds) > 50
    for seed in seeds:
        scene = scene_from_seed(seed)
        geometry = scene_geometry(scene, 96)
        (x0, y0), (x1, y1) = [centroid(coverage) for coverage in geometry.coverage]
        assert {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}[scene.relation]
        assert not ((geometry.coverage[0] > 0) & (geometry.coverage[1] > 0)).any()  # the objects never touch


@pytest.mark.parametrize("size", [(128, 96), (96, 128)])
def test_objects_survive_a_centre_crop(size):
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    for seed in range(50):
        coverage = scene_geometry(scene_from_seed(seed), size).coverage.sum(axis=0)
        assert coverage.sum() > 20  # something is drawn
        assert coverage[top:top + side, left:left + side].sum() == pytest.approx(coverage.sum())


def test_scene_constraints_are_honoured():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = sample_scene(rng, n_objects=1, sizes=("large",), backgrounds=("meadow",))
        assert len(scene.objects) == 1 and scene.objects[0].size == "large" and scene.background == "meadow"


@pytest.mark.parametrize("size", SIZES_TO_TRY)
def test_every_renderer_gives_rgb_of_the_requested_size_unlike_plain(size):
    scene = scene_from_seed(3)
    plain = pixels(render_plain(scene, size))
    for name, render in RENDERERS.items():
        image = render(scene, size, np.random.default_rng(0))
        assert image.mode == "RGB", name
        assert image.size == (size, size) if isinstance(size, int) else image.size == size, name
        if name != "plain":
            assert np.abs(pixels(image) - plain).mean() > 5, name


def test_styles_differ_from_each_other():
    for seed in range(3):
        scene = scene_from_seed(seed)
        images = {name: pixels(render(scene, 96, np.random.default_rng(seed))) for name, render in RENDERERS.items()}
        for a, b in combinations(images, 2):
            assert np.abs(images[a] - images[b]).mean() > 5, (a, b)


@pytest.mark.parametrize("size", SIZES_TO_TRY)
def test_pixel_art_has_a_small_palette_and_solid_blocks(size):
    palette = {tuple(color) for color in np.round(PIXEL_ART_PALETTE * 255).astype(int).tolist()}
    assert len(palette) <= 16
    for seed in range(5):
        image = RENDERERS["pixel-art"](scene_from_seed(seed), size, np.random.default_rng(seed))
        array = np.asarray(image)
        assert {tuple(color) for color in array.reshape(-1, 3).tolist()} <= palette
        block = min(image.size) // PIXEL_ART_BLOCKS
        assert block > 1
        for top in range(0, image.height, block):
            for left in range(0, image.width, block):
                cell = array[top:top + block, left:left + block].reshape(-1, 3)
                assert (cell == cell[0]).all()


@pytest.mark.slow
def test_example_styles_script_reproduces_the_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_example_styles.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    for name in EXAMPLE_STYLES:
        generated = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
        committed = {p.relative_to(STYLES_DIR): p.read_bytes() for p in (STYLES_DIR / name).rglob("*") if p.is_file()}
        assert sorted(generated) == sorted(committed), name
        changed = [str(path) for path in generated if generated[path] != committed[path]]
        assert not changed, f"rerun scripts/make_example_styles.py; these differ: {changed}"


def test_style_yamls_have_the_expected_keys_and_unique_tokens():
    tokens = []
    styles_with_train = []
    for name in EXAMPLE_STYLES:
        config = yaml.safe_load((STYLES_DIR / name / "style.yaml").read_text(encoding="utf-8"))
        assert {"display_name", "descriptor", "method", "concepts"} <= set(config) <= {
            "display_name", "descriptor", "method", "concepts", "train"
        }, name
        assert config["method"] == "styleboost"
        assert config["display_name"].strip() and config["descriptor"].strip()
        if "train" in config:
            styles_with_train.append(name)
        assert len(config["concepts"]) == (2 if name == "anime" else 1), name
        for concept in config["concepts"]:
            assert set(concept) == {"token", "class_word", "ref", "aux", "heldout"}, name
            for role in ("ref", "aux", "heldout"):
                assert (STYLES_DIR / name / concept[role]).is_dir(), (name, role)
            tokens.append(concept["token"])
    assert len(tokens) == len(set(tokens)) == 7
    assert len(styles_with_train) <= 1


def test_example_styles_pass_the_pipeline_schema():
    from style_factory.config import RunConfig, load_styles
    from style_factory.run import REGISTRY

    styles = load_styles(RunConfig(styles_dir=str(STYLES_DIR)), REGISTRY, list(EXAMPLE_STYLES))
    assert [style.name for style in styles] == list(EXAMPLE_STYLES)


def test_every_example_image_has_a_one_line_content_caption():
    for name in EXAMPLE_STYLES:
        config = yaml.safe_load((STYLES_DIR / name / "style.yaml").read_text(encoding="utf-8"))
        for concept in config["concepts"]:
            for role in ("ref", "aux", "heldout"):
                images = sorted((STYLES_DIR / name / concept[role]).glob("*.png"))
                assert (4 if role == "heldout" else 9) <= len(images) <= 18, (name, role)
                for image in images:
                    text = image.with_suffix(".txt").read_text(encoding="utf-8")
                    assert text.endswith("\n") and text.count("\n") == 1, image
                    assert CAPTION.match(text.strip()), image
