"""Write the six example styles under styles/, and the example subject under subjects/, from the procedural toy world.

    python scripts/make_example_styles.py [--out styles] [--subjects subjects]

Each style folder gets a style.yaml, StyleRef and held-out StyleRef images drawn by the style's renderer, Aux images of
the same world drawn plain (the class prior), every image with a caption sidecar `<stem>.txt`.
The example subject (`toy-house`, evaluate.compose's content) is one object, a red house, drawn plain at different
sizes, places and backgrounds. Everything comes from fixed seeds: rerunning rewrites identical bytes.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the script runs from a plain checkout, without installing anything

from style_factory.renderers import RENDERERS  # noqa: E402
from style_factory.toyworld import BACKGROUNDS, SIZES, Scene, SceneObject, caption, render_plain, sample_scene  # noqa: E402

WIDE, TALL = (128, 96), (96, 128)  # a few non-square images exercise the pipeline's centre crop


@dataclass(frozen=True)
class ExampleConcept:
    token: str
    class_word: str
    subfolder: str = ""  # under ref/ and aux/; empty when the style has a single concept
    n_images: int = 16  # StyleRef images, and as many Aux images
    n_heldout: int = 6  # held-out StyleRef images: evaluation only
    n_objects: int | None = None  # scene constraints, passed to toyworld.sample_scene
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class ExampleStyle:
    name: str  # the folder name, also the renderer's name in RENDERERS
    display_name: str
    descriptor: str
    concepts: tuple[ExampleConcept, ...]
    train: dict[str, Any] = field(default_factory=dict)  # per-style training overrides


EXAMPLE_STYLES = (
    ExampleStyle(
        "realism", "Realism",
        "a photorealistic rendering with soft shading, drop shadows and natural light",
        (ExampleConcept("vmr", "style"),),
    ),
    ExampleStyle(
        "anime", "Anime",
        "an anime illustration with flat cel shading, bold ink outlines and saturated colors",
        (  # Multi-StyleBoost: one token for close-ups of objects, one for background-dominant scenes
            ExampleConcept("ukj", "illustration", "objects", n_images=9, n_heldout=4, n_objects=1,
                           sizes=("large",)),
            ExampleConcept("zwx", "background", "backgrounds", n_images=9, n_heldout=4, sizes=("small",),
                           backgrounds=("meadow", "beach")),
        ),
    ),
    ExampleStyle(
        "romanticism", "Romanticism",
        "a romantic oil painting with soft brushstrokes, golden light and a dark vignette",
        (ExampleConcept("brq", "style"),),
    ),
    ExampleStyle(
        "cubism", "Cubism",
        "a cubist painting of angular facets in muted ochre, brown and grey-blue tones",
        (ExampleConcept("kzt", "style"),),
    ),
    ExampleStyle(
        "pixel-art", "Pixel art",
        "pixel art with chunky square pixels and a limited palette",
        (ExampleConcept("qxp", "style"),),
        train={"max_steps": 120},
    ),
    ExampleStyle(
        "watercolor", "Watercolor",
        "a watercolor painting with pale washes, bleeding colors and paper texture",
        (ExampleConcept("jfw", "style"),),
    ),
)


def image_size(index: int) -> int | tuple[int, int]:
    """Mostly 96x96; every eighth image is wide and every eighth tall."""
    return {6: WIDE, 7: TALL}.get(index % 8, 96)


def write_images(folder: Path, role: str, concept: ExampleConcept, renderer_name: str, first_seed: int,
                 count: int) -> None:
    """`count` captioned images `<role>_NNN.png` + `<role>_NNN.txt`, image i from seed first_seed + i."""
    folder.mkdir(parents=True, exist_ok=True)
    render = RENDERERS[renderer_name]
    for i in range(count):
        rng = np.random.default_rng(first_seed + i)
        scene = sample_scene(
            rng, n_objects=concept.n_objects, sizes=concept.sizes, backgrounds=concept.backgrounds
        )
        image = render(scene, image_size(i), rng)
        image.save(folder / f"{role}_{i:03d}.png", optimize=True)
        (folder / f"{role}_{i:03d}.txt").write_text(caption(scene) + "\n", encoding="utf-8")


def style_yaml(style: ExampleStyle) -> str:
    config: dict[str, Any] = {
        "display_name": style.display_name,
        "descriptor": style.descriptor,
        "method": "styleboost",
        "concepts": [
            {
                "token": concept.token,
                "class_word": concept.class_word,
                "ref": Path("ref", concept.subfolder).as_posix(),
                "aux": Path("aux", concept.subfolder).as_posix(),
                "heldout": Path("heldout", concept.subfolder).as_posix(),
            }
            for concept in style.concepts
        ],
    }
    if style.train:
        config["train"] = style.train
    header = "# Generated by scripts/make_example_styles.py; edit that script, not this file.\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)


def write_style(out_dir: Path, style: ExampleStyle, style_index: int) -> None:
    style_dir = out_dir / style.name
    shutil.rmtree(style_dir, ignore_errors=True)  # the folder is fully generated: no stale files survive
    style_dir.mkdir(parents=True)
    (style_dir / "style.yaml").write_text(style_yaml(style), encoding="utf-8")
    for concept_index, concept in enumerate(style.concepts):
        seed = 10_000 * style_index + 1_000 * concept_index
        write_images(style_dir / "ref" / concept.subfolder, "ref", concept, style.name, seed, concept.n_images)
        write_images(style_dir / "aux" / concept.subfolder, "aux", concept, "plain", seed + 500, concept.n_images)
        write_images(style_dir / "heldout" / concept.subfolder, "heldout", concept, style.name, seed + 800,
                     concept.n_heldout)


SUBJECT = "toy-house"
SUBJECT_CONCEPT = {"token": "sks", "class_word": "house"}  # DreamBooth's convention: a rare token and the class
SUBJECT_BACKGROUNDS = ("white", "light blue", "meadow", "beach", "grey", "yellow")  # each far from red


def write_subject(out_dir: Path, n_images: int = 6, first_seed: int = 90_000) -> None:
    """`<out_dir>/toy-house/`: a style folder's format, its ref/ holding one red house, its aux/ the class prior
    (houses of other colors, as DreamBooth's class images)."""
    folder = out_dir / SUBJECT
    shutil.rmtree(folder, ignore_errors=True)
    for role, colors, seed in (("ref", ("red",), first_seed), ("aux", ("blue", "yellow", "purple"), first_seed + 500)):
        (folder / role).mkdir(parents=True)
        for i in range(n_images):
            rng = np.random.default_rng(seed + i)
            center = (0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12))
            house = SceneObject("house", colors[i % len(colors)], ("large", "small")[i % 3 == 2],
                                (float(center[0]), float(center[1])))
            backgrounds = [b for b in SUBJECT_BACKGROUNDS if b != house.color]
            scene = Scene((house,), backgrounds[i % len(backgrounds)])
            render_plain(scene, 96).save(folder / role / f"{role}_{i:03d}.png", optimize=True)
            (folder / role / f"{role}_{i:03d}.txt").write_text(caption(scene) + "\n", encoding="utf-8")
    config = {"display_name": "Toy house", "descriptor": "a red toy house", "concepts": [SUBJECT_CONCEPT]}
    header = "# Generated by scripts/make_example_styles.py; edit that script, not this file.\n"
    (folder / "style.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "styles", help="where the style folders go")
    parser.add_argument("--subjects", type=Path, default=REPO_ROOT / "subjects", help="where the example subject goes")
    args = parser.parse_args(argv)
    for style_index, style in enumerate(EXAMPLE_STYLES):
        write_style(args.out, style, style_index)
        print(f"wrote {args.out / style.name}")
    write_subject(args.subjects)
    print(f"wrote {args.subjects / SUBJECT}")


if __name__ == "__main__":
    main()
