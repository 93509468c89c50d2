"""Shared fixtures: one local Ray instance per test session, the tiny model written once, style builders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.families import get_family
from pipeline.models import resolve_base_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session():
    from pipeline.run import start_ray

    start_ray()
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return resolve_base_model("tiny", tmp_path_factory.mktemp("base-models"))


def load_sd1(path: str):
    """The training Components of an SD 1.x folder (the tiny presets are SD 1.x)."""
    return get_family("sd1").load_components(path)


def load_sd1_pipeline(path: str, device: str = "cpu"):
    """The DDIM sampling pipeline of an SD 1.x folder."""
    return get_family("sd1").load_pipeline(path, device)


def noise_image(seed: int, size: tuple[int, int] = (80, 80), mode: str = "RGB") -> Image.Image:
    """A random, structured image: distinct seeds give images far apart for any perceptual hash."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.NEAREST).convert(mode)


def make_style(root: Path, name: str, token: str, n_ref: int = 6, n_aux: int = 6, seed: int = 0, **extra) -> Path:
    """A minimal valid style folder with distinct images and caption sidecars."""
    style = root / name
    for role, count in (("ref", n_ref), ("aux", n_aux)):
        (style / role).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise_image(seed * 1000 + (0 if role == "ref" else 500) + i).save(style / role / f"{role}_{i:02d}.png")
            (style / role / f"{role}_{i:02d}.txt").write_text(f"a {role} picture number {i}")
    config = {"display_name": name.title(), "descriptor": f"{name} style", "method": "styleboost",
              "concepts": [{"token": token, "class_word": "style"}], **extra}
    (style / "style.yaml").write_text(yaml.safe_dump(config))
    return style


def copy_example_styles(dest: Path, names: list[str]) -> Path:
    for name in names:
        shutil.copytree(REPO / "styles" / name, dest / name)
    return dest
