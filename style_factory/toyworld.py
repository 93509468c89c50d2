"""A procedural, captioned toy world: one or two simple shapes on a simple background.

Everything is deterministic: `scene_from_seed(seed)` always gives the same `Scene`, `caption(scene)`
the same text and `render_plain(scene, size)` the same pixels. Captions describe content only
(kinds, colors, sizes, relation, background), never a look, so that any style renderer
(style_factory/renderers.py) can draw the same scene under the same caption.

Layout lives in a centred square of side min(width, height): a centre crop of a non-square image
keeps every object, so its caption stays true. `scene_geometry` turns a scene into pixel-space masks
that every renderer shares, so no renderer re-implements the shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (214, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 205, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 210),
    "purple": (130, 60, 170),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
}
KINDS = ("circle", "square", "triangle", "star", "heart", "house")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.4}  # object diameter, as a fraction of the layout square
RELATIONS = ("left of", "right of", "above", "below")  # how the first object sits relative to the second

MIN_CONTRAST = 100.0  # RGB distance an object's color keeps from every background color, so it stays visible
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Background:
    phrase: str  # how the caption says it
    sky: RGB  # the upper color; the whole background when there is no ground
    ground: RGB | None = None  # the lower color of a background split at a horizon
    horizon: float = 0.65  # where the ground begins, as a fraction of the layout square's height


BACKGROUNDS: dict[str, Background] = {
    "white": Background("on a white background", (240, 240, 236)),
    "grey": Background("on a grey background", (150, 150, 150)),
    "yellow": Background("on a yellow background", (240, 215, 110)),
    "pink": Background("on a pink background", (240, 170, 190)),
    "light blue": Background("on a light blue background", (150, 200, 240)),
    "meadow": Background("in a green meadow under a blue sky", (135, 195, 240), (80, 160, 70)),
    "beach": Background("on a sandy beach under a blue sky", (135, 195, 240), (225, 200, 145)),
}


@dataclass(frozen=True)
class SceneObject:
    kind: str  # one of KINDS
    color: str  # one of COLORS
    size: str  # one of SIZES
    center: tuple[float, float]  # (x, y) in the layout square, 0..1, y pointing down


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # one or two, drawn in this order
    background: str  # one of BACKGROUNDS
    relation: str | None = None  # for two objects: where objects[0] is relative to objects[1]


@dataclass(frozen=True)
class Geometry:
    """A scene laid out on a pixel grid of shape (height, width)."""

    coverage: np.ndarray  # (n_objects, H, W) float32 in [0, 1]: visible, anti-aliased area of each object
    labels: np.ndarray  # (H, W) int: 0 for background, i + 1 where object i covers at least half the pixel
    ground: np.ndarray  # (H, W) float32 in [0, 1]: the ground part of a split background; zeros when flat
    centers: np.ndarray  # (n_objects, 2) float: object centres in pixels, (x, y)
    radii: np.ndarray  # (n_objects,) float: object radii in pixels


def as_width_height(size: int | tuple[int, int]) -> tuple[int, int]:
    """An image size given as one side (square) or as (width, height)."""
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(width), int(height)


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    sizes: tuple[str, ...] = tuple(SIZES),
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
) -> Scene:
    """A random scene; `n_objects`, `sizes` and `backgrounds` narrow what may be drawn."""
    if n_objects is None:
        n_objects = int(rng.integers(1, 3))
    if n_objects not in (1, 2):
        raise ValueError(f"a scene has 1 or 2 objects, not {n_objects}")
    background = str(rng.choice(backgrounds))
    visible_colors = [name for name in COLORS if _contrasts(COLORS[name], BACKGROUNDS[background])]
    colors = rng.choice(visible_colors, size=n_objects, replace=False)  # two objects never share a color
    kinds = rng.choice(KINDS, size=n_objects)
    object_sizes = rng.choice(sizes, size=n_objects)
    if n_objects == 1:
        relation = None
        centers = [(0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12))]
    else:
        relation = str(rng.choice(RELATIONS))
        centers = _pair_centers(relation, rng)
    objects = tuple(
        SceneObject(kind=str(kind), color=str(color), size=str(size), center=(float(x), float(y)))
        for kind, color, size, (x, y) in zip(kinds, colors, object_sizes, centers)
    )
    return Scene(objects=objects, background=background, relation=relation)


def scene_from_seed(seed: int) -> Scene:
    return sample_scene(np.random.default_rng(seed))


def caption(scene: Scene) -> str:
    """The exact content caption, e.g. "a small red circle above a large blue square on a yellow background"."""
    text = _describe(scene.objects[0])
    if scene.relation is not None:
        text += f" {scene.relation} {_describe(scene.objects[1])}"
    return f"{text} {BACKGROUNDS[scene.background].phrase}"


def scene_geometry(scene: Scene, size: int | tuple[int, int]) -> Geometry:
    width, height = as_width_height(size)
    side = min(width, height)
    offset = np.array([(width - side) / 2, (height - side) / 2])
    centers = np.array([offset + np.array(obj.center) * side for obj in scene.objects])
    radii = np.array([SIZES[obj.size] * side / 2 for obj in scene.objects])

    coverage = np.stack([
        _shape_coverage(obj.kind, center, radius, width, height)
        for obj, center, radius in zip(scene.objects, centers, radii)
    ])
    for i in range(len(coverage) - 1):  # later objects hide earlier ones
        coverage[i] *= np.prod(1 - coverage[i + 1:], axis=0)
    labels = np.where(coverage.max(axis=0) >= 0.5, coverage.argmax(axis=0) + 1, 0)

    ground = np.zeros((height, width), np.float32)
    background = BACKGROUNDS[scene.background]
    if background.ground is not None:
        horizon_row = offset[1] + background.horizon * side
        ground[:] = np.clip(np.arange(height) + 1 - horizon_row, 0, 1)[:, None]
    return Geometry(coverage=coverage, labels=labels, ground=ground, centers=centers, radii=radii)


def background_array(scene: Scene, geometry: Geometry) -> np.ndarray:
    """The flat-colored background alone as an (H, W, 3) float32 array in [0, 1]."""
    background = BACKGROUNDS[scene.background]
    sky = np.array(background.sky, np.float32) / 255
    ground = np.array(background.ground or background.sky, np.float32) / 255
    return sky + (ground - sky) * geometry.ground[..., None]


def plain_array(scene: Scene, geometry: Geometry) -> np.ndarray:
    """The flat-colored scene as an (H, W, 3) float32 array in [0, 1]."""
    image = background_array(scene, geometry)
    for obj, coverage in zip(scene.objects, geometry.coverage):
        color = np.array(COLORS[obj.color], np.float32) / 255
        image = image + (color - image) * coverage[..., None]
    return image


def array_to_image(array: np.ndarray) -> Image.Image:
    """An (H, W, 3) float array in [0, 1] as an RGB image."""
    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))


def render_plain(
    scene: Scene, size: int | tuple[int, int], rng: np.random.Generator | None = None
) -> Image.Image:
    """The neutral look: flat colors, anti-aliased edges. `rng` is unused; it keeps the renderer signature."""
    return array_to_image(plain_array(scene, scene_geometry(scene, size)))


def _describe(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.color} {obj.kind}"


def _contrasts(color: RGB, background: Background) -> bool:
    background_colors = [background.sky] if background.ground is None else [background.sky, background.ground]
    return all(np.linalg.norm(np.subtract(color, other)) >= MIN_CONTRAST for other in background_colors)


def _pair_centers(relation: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres of two objects side by side (or stacked) as `relation` says, with a little jitter.

    The centres stay at least 0.43 apart: two large objects (0.4 across) never touch.
    """
    near = 0.27 + rng.uniform(-0.015, 0.015)
    far = 0.73 + rng.uniform(-0.015, 0.015)
    across_first, across_second = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    first, second = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):
        return [(first, across_first), (second, across_second)]
    return [(across_first, first), (across_second, second)]


def _outline(kind: str) -> np.ndarray:
    """The shape's outline as (N, 2) points, (x, y), roughly filling the unit disc, y pointing down."""
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if kind == "square":
        return np.array([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)])
    if kind == "triangle":
        angles = np.radians([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles) + 0.2], axis=1)
    if kind == "star":
        angles = np.radians(-90 + 36 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radius * np.cos(angles), radius * np.sin(angles) + 0.09], axis=1)
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y - 2.5], axis=1) / 16.5
    if kind == "house":
        return np.array([(-0.75, 0.85), (0.75, 0.85), (0.75, -0.1), (0.0, -0.9), (-0.75, -0.1)])
    raise ValueError(f"unknown object kind {kind!r}; expected one of {KINDS}")


def _shape_coverage(kind: str, center: np.ndarray, radius: float, width: int, height: int) -> np.ndarray:
    """How much of each pixel the shape covers, (H, W) float32 in [0, 1]."""
    points = (_outline(kind) * radius + center) * SUPERSAMPLE
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), np.float32) / 255
