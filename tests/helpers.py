"""What the tests share: style-folder builders, the example styles, the SD 1.x loaders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from style_factory.config import SUBJECT_METHOD
from style_factory.families import get_family
from style_factory.methods import METHODS

REPO = Path(__file__).resolve().parent.parent


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


def opened(config: Path):
    """The run of `config`, validated and holding its folder's lock, as a job's command line would open it."""
    from style_factory.run import load_run, parse_args

    run = load_run(parse_args("a test's run", ["--config", str(config)]))
    run.open()
    return run


ADAPTER_PROMPT = "a red circle on a blue background, <zwx>"  # TextBoost's token; StyleDrop reads it as plain text


def adapter_outputs(models, family) -> tuple[torch.Tensor, torch.Tensor]:
    """ADAPTER_PROMPT's conditioning and the denoiser's prediction on fixed noise: what a trained adapter changes."""
    latents = torch.randn(1, models.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conditioning = family.encode_prompts(models, [ADAPTER_PROMPT], torch.device("cpu"))
        return conditioning.hidden_states, family.denoise(models, latents, torch.tensor([500]), conditioning)


def style_methods() -> list[str]:
    """Every method a style may train (a subject trains `content`), sorted."""
    return sorted(name for name in METHODS if name != SUBJECT_METHOD)
