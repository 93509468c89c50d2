"""Style renderers: the toy world's scenes drawn in distinct, recognisable looks.

Every renderer has the signature `(scene, size, rng) -> RGB PIL image`; `size` is one side or
(width, height). Geometry comes from `toyworld.scene_geometry`, so all looks share the same shapes and
a scene's caption stays true in every style; `rng` drives the style's texture (noise, strokes, facets).
Images are built as (H, W, 3) float arrays in [0, 1] and converted once at the end.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from style_factory.toyworld import (
    BACKGROUNDS,
    COLORS,
    Geometry,
    Scene,
    array_to_image,
    as_width_height,
    background_array,
    plain_array,
    render_plain,
    scene_geometry,
)

Renderer = Callable[[Scene, int | tuple[int, int], np.random.Generator], Image.Image]

PIXEL_ART_BLOCKS = 24  # pixel-art blocks along the image's shorter side
PIXEL_ART_PALETTE = np.array([  # 16 colors: the world's colors, their shadow tones and its backgrounds
    (16, 16, 32), (244, 244, 236), (150, 150, 160), (150, 96, 40),
    (200, 32, 48), (128, 20, 40), (248, 144, 24), (248, 216, 48),
    (40, 168, 64), (24, 96, 48), (40, 80, 216), (24, 40, 120),
    (136, 56, 184), (128, 200, 248), (248, 168, 192), (232, 208, 144),
], np.float32) / 255
CUBISM_EARTH_RAMP = np.array([  # dark brown, ochre, grey-blue: the colors of dark, middle and light facets
    (0.3, 0.22, 0.16), (0.72, 0.56, 0.3), (0.62, 0.68, 0.74),
], np.float32)


def render_realism(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Photo-like: graded sky and ground, sphere-like shading with a highlight, drop shadows, blur, sensor noise."""
    geometry, ys, xs, _ = _canvas(scene, size)
    height, width = geometry.labels.shape
    background = BACKGROUNDS[scene.background]
    sky = _rgb(background.sky)
    if background.ground is None:
        # a studio backdrop: brightest where a spotlight hits it, falling off towards the edges
        falloff = np.hypot(xs / width - 0.5, ys / height - 0.4)
        image = sky * (1.1 - 0.6 * falloff)[..., None]
    else:
        # the sky deepens upwards and pales into haze at the horizon; the ground darkens towards the viewer
        downward = (ys / height)[..., None]
        sky_layer = sky * (0.8 + 0.2 * downward) + 0.25 * downward
        ground_layer = _rgb(background.ground) * (1.05 - 0.35 * ys / height)[..., None]
        image = sky_layer + (ground_layer - sky_layer) * geometry.ground[..., None]

    shift = max(1, round(0.04 * min(width, height)))
    shadow = _blur(_shifted(geometry.coverage.sum(axis=0), shift, shift), 0.03 * min(width, height))
    image = image * (1 - 0.55 * shadow)[..., None]

    for i, obj in enumerate(scene.objects):
        light = _light(geometry, i, xs, ys)
        highlight = np.exp(-((1.25 - light) / 0.12) ** 2)  # a specular spot where the light peaks
        shaded = _rgb(COLORS[obj.color]) * light[..., None] + 0.45 * highlight[..., None]
        image = image + (shaded - image) * geometry.coverage[i][..., None]

    image = _blur(image, 0.6)
    image = image + rng.normal(0, 0.02, image.shape)  # sensor noise
    return array_to_image(image)


def render_anime(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Cel animation: saturated colors, three flat tone bands, a clean sky gradient, dark ink outlines.

    Deterministic: `rng` is unused.
    """
    geometry, ys, xs, _ = _canvas(scene, size)
    height, width = geometry.labels.shape
    background = BACKGROUNDS[scene.background]
    downward = (ys / height)[..., None]
    sky = _saturate(_rgb(background.sky), 1.5)
    image = sky * (0.8 + 0.2 * downward) + 0.35 * downward  # deep at the top, pale at the bottom
    if background.ground is not None:
        ground = _saturate(_rgb(background.ground), 1.5)
        image = image + (ground - image) * (geometry.ground >= 0.5)[..., None]

    for i, obj in enumerate(scene.objects):
        light = _light(geometry, i, xs, ys)
        tone = np.select([light < 0.85, light < 1.15], [0.7, 1.0], 1.2)
        cel = _saturate(_rgb(COLORS[obj.color]), 1.5) * tone[..., None]
        image = image + (cel - image) * geometry.coverage[i][..., None]

    ink_width = max(3, round(min(width, height) / 48)) | 1  # MaxFilter wants an odd size
    ink = _dilate(_region_edges(_regions(geometry)), ink_width)
    image[ink] = _rgb((25, 20, 40))
    return array_to_image(image)


def render_romanticism(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A romantic oil painting: golden, dim palette, short oriented brush strokes, a dark vignette."""
    geometry, ys, xs, scale = _canvas(scene, size)
    height, width = geometry.labels.shape

    base = _blur(plain_array(scene, geometry), 1.5 * scale)
    luminance = _luminance(base)
    golden = base * np.array([1.05, 0.9, 0.62]) * 0.95
    sepia = luminance[..., None] * np.array([0.95, 0.72, 0.45])
    toned = 0.7 * golden + 0.3 * sepia
    glow = np.exp(-(((xs - 0.5 * width) / width) ** 2 + ((ys - 0.35 * height) / height) ** 2) / 0.08)
    toned = toned + 0.18 * glow[..., None] * np.array([1.0, 0.8, 0.45])  # warm light from above the subject

    # strokes run along edges (across the luminance gradient) and sweep diagonally where the paint is flat
    gradient_y, gradient_x = np.gradient(_luminance(toned))
    along_edges = np.arctan2(gradient_y, gradient_x) + np.pi / 2
    sweep = 0.6 + 0.5 * np.sin(xs / (14 * scale)) * np.cos(ys / (19 * scale))
    angles = np.where(np.hypot(gradient_x, gradient_y) > 0.01, along_edges, sweep)

    canvas = array_to_image(toned)
    draw = ImageDraw.Draw(canvas, "RGBA")
    n_strokes = width * height // 5
    stroke_x = rng.uniform(0, width, n_strokes)
    stroke_y = rng.uniform(0, height, n_strokes)
    rows, cols = stroke_y.astype(int), stroke_x.astype(int)
    stroke_angles = angles[rows, cols] + rng.normal(0, 0.25, n_strokes)
    half_lengths = rng.uniform(1.5, 3.5, n_strokes) * scale
    colors = np.clip(toned[rows, cols] * rng.uniform(0.9, 1.1, (n_strokes, 1)), 0, 1)
    alphas = rng.integers(90, 170, n_strokes)
    stroke_width = max(2, round(2 * scale))
    for x, y, angle, half, color, alpha in zip(stroke_x, stroke_y, stroke_angles, half_lengths, colors, alphas):
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        fill = (*(int(c) for c in np.round(color * 255)), int(alpha))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=fill, width=stroke_width)

    painted = np.asarray(canvas, np.float32) / 255
    distance = np.hypot((xs - width / 2) / (width / 2), (ys - height / 2) / (height / 2)) / np.sqrt(2)
    vignette = 1 - 0.75 * distance**1.6
    return array_to_image(painted * vignette[..., None])


def render_cubism(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Cubism: Voronoi facets split at shape edges, each a tilted plane of its mean color, muted palette, dark seams."""
    geometry, ys, xs, _ = _canvas(scene, size)
    height, width = geometry.labels.shape
    base = plain_array(scene, geometry)

    n_cells = max(8, round(50 * width * height / 96**2))
    seeds = rng.uniform(0, 1, (n_cells, 2)) * np.array([width, height])
    distances = np.hypot(xs[..., None] - seeds[:, 0], ys[..., None] - seeds[:, 1])
    cells = distances.argmin(axis=-1)
    # a facet is a Voronoi cell cut by the scene's regions, so objects keep their silhouettes
    _, facets = np.unique(cells * (len(scene.objects) + 2) + _regions(geometry), return_inverse=True)
    facets = facets.reshape(height, width)
    n_facets = facets.max() + 1

    counts = np.bincount(facets.ravel(), minlength=n_facets)
    mean_colors = np.stack(
        [np.bincount(facets.ravel(), base[..., c].ravel(), minlength=n_facets) for c in range(3)], axis=1
    ) / counts[:, None]
    tilt = rng.uniform(0, 2 * np.pi, n_facets)  # each facet is a plane lit from its own direction
    brightness = rng.uniform(0.8, 1.12, n_facets)
    facet_x = np.bincount(facets.ravel(), xs.ravel(), minlength=n_facets) / counts
    facet_y = np.bincount(facets.ravel(), ys.ravel(), minlength=n_facets) / counts
    cell_size = np.sqrt(width * height / n_cells)
    along_tilt = (xs - facet_x[facets]) * np.cos(tilt[facets]) + (ys - facet_y[facets]) * np.sin(tilt[facets])
    image = mean_colors[facets] * (brightness[facets] + 0.35 * along_tilt / cell_size)[..., None]

    # muted palette: desaturate, then pull towards an ochre / brown / grey-blue ramp by luminance
    luminance = _luminance(image)
    muted = _saturate(image, 0.55)
    earth = np.stack([np.interp(luminance, [0, 0.5, 1], CUBISM_EARTH_RAMP[:, c]) for c in range(3)], axis=-1)
    image = 0.55 * muted + 0.45 * earth

    seams = _region_edges(facets)
    image[seams] = image[seams] * 0.25 + 0.75 * np.array([0.17, 0.13, 0.1])
    return array_to_image(image)


def render_pixel_art(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Pixel art: outlined sprites on a coarse grid, hard edges, two-tone shading, snapped to a 16-color palette.

    Blocks are `min(width, height) // PIXEL_ART_BLOCKS` pixels wide, aligned to the top-left corner.
    Deterministic: `rng` is unused.
    """
    width, height = as_width_height(size)
    block = max(1, min(width, height) // PIXEL_ART_BLOCKS)
    grid_width, grid_height = -(-width // block), -(-height // block)
    geometry = scene_geometry(scene, (grid_width, grid_height))
    ys, xs = _pixel_centres(grid_height, grid_width)

    background = BACKGROUNDS[scene.background]
    grid = np.broadcast_to(_rgb(background.sky), (grid_height, grid_width, 3)).copy()
    if background.ground is not None:
        grid[geometry.ground >= 0.5] = _rgb(background.ground)
    for i, obj in enumerate(scene.objects):
        tone = np.where(_light(geometry, i, xs, ys) < 0.75, 0.7, 1.0)  # a shadow along the far rim
        shaded = _rgb(COLORS[obj.color]) * tone[..., None]
        inside = geometry.labels == i + 1
        grid[inside] = shaded[inside]
    # a one-block dark outline around each sprite, drawn on the background so small sprites keep their shape
    objects = geometry.labels > 0
    grid[_dilate(objects, 3) & ~objects] = PIXEL_ART_PALETTE[0]

    # nearest palette color, with channel weights roughly matching how the eye weighs differences
    weights = np.array([2.0, 4.0, 3.0])
    distances = (((_saturate(grid, 1.3)[..., None, :] - PIXEL_ART_PALETTE) ** 2) * weights).sum(axis=-1)
    snapped = PIXEL_ART_PALETTE[distances.argmin(axis=-1)]
    blocks = snapped.repeat(block, axis=0).repeat(block, axis=1)[:height, :width]
    return array_to_image(blocks)


def render_watercolor(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Watercolor: pale, patchy washes glazed on textured paper, bled edges with pooled pigment, white paper showing."""
    geometry, ys, xs, scale = _canvas(scene, size)
    height, width = geometry.labels.shape

    grain = _blur(rng.normal(0, 1, (height, width)), 0.7) * 0.03
    mottling = 0.02 * _smooth_noise(rng, height, width, 12 * scale)
    paper = np.array([0.97, 0.945, 0.89]) * (1 + grain + mottling)[..., None]

    # the background wash stops short of the paper's edge and of the objects, and is patchy
    objects = _blur(geometry.coverage.sum(axis=0), 2.5 * scale)
    border = np.minimum.reduce([xs, ys, width - xs, height - ys]) / (5 * scale)
    edge_fade = np.clip(border + 0.6 * _smooth_noise(rng, height, width, 8 * scale), 0, 1)
    patches = np.clip(1.2 + 0.9 * _smooth_noise(rng, height, width, 16 * scale), 0, 1)
    background_density = 0.55 * edge_fade * patches * np.clip(1 - 1.6 * objects, 0, 1)
    background_color = _blur(background_array(scene, geometry), 2 * scale)
    image = _glaze(paper, background_color, background_density)

    for i, obj in enumerate(scene.objects):
        # a wobbly, bled shape: the blurred mask thresholded against low-frequency noise
        soft = _blur(geometry.coverage[i], 1.5 * scale)
        wobble = 0.6 * soft * (1 - soft) * _smooth_noise(rng, height, width, 6 * scale)  # only near the edge
        shape = np.clip((soft - 0.5 + wobble) * 3 + 0.5, 0, 1)
        pooled = np.clip(shape - _blur(shape, 2.5 * scale), 0, 1)  # pigment gathers where the wash dried
        unevenness = 1 + 0.25 * _smooth_noise(rng, height, width, 5 * scale)
        density = np.clip(0.6 * shape * unevenness + 1.3 * pooled, 0, 0.9)
        color = np.minimum(_rgb(COLORS[obj.color]), 0.82)  # even white paint leaves a faint trace at its edges
        image = _glaze(image, color, density)

    return array_to_image(_blur(image, 0.5 * scale))


RENDERERS: dict[str, Renderer] = {
    "plain": render_plain,
    "realism": render_realism,
    "anime": render_anime,
    "romanticism": render_romanticism,
    "cubism": render_cubism,
    "pixel-art": render_pixel_art,
    "watercolor": render_watercolor,
}


def _rgb(color: tuple[int, int, int]) -> np.ndarray:
    return np.array(color, np.float32) / 255


def _canvas(scene: Scene, size: int | tuple[int, int]) -> tuple[Geometry, np.ndarray, np.ndarray, float]:
    """The scene's geometry at `size`, each pixel's centre (ys, xs), and the texture scale (1 at 96 px)."""
    geometry = scene_geometry(scene, size)
    height, width = geometry.labels.shape
    ys, xs = _pixel_centres(height, width)
    return geometry, ys, xs, min(width, height) / 96


def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return ys, xs


def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], np.float32)


def _saturate(image: np.ndarray, amount: float) -> np.ndarray:
    """Push colors away from (amount > 1) or towards (amount < 1) their grey of equal luminance."""
    grey = _luminance(image)[..., None]
    return np.clip(grey + (image - grey) * amount, 0, 1)


def _light(geometry: Geometry, index: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Brightness of object `index` as a ball lit from the upper left: 1.25 at the highlight, 0.55 at the far rim."""
    (center_x, center_y), radius = geometry.centers[index], geometry.radii[index]
    distance = np.hypot(xs - (center_x - 0.4 * radius), ys - (center_y - 0.4 * radius)) / (1.4 * radius)
    return 1.25 - 0.7 * np.clip(distance, 0, 1)


def _regions(geometry: Geometry) -> np.ndarray:
    """(H, W) ids: 0 sky or flat background, i + 1 object i, n_objects + 1 ground."""
    on_ground = (geometry.labels == 0) & (geometry.ground >= 0.5)
    return np.where(on_ground, len(geometry.coverage) + 1, geometry.labels)


def _region_edges(ids: np.ndarray) -> np.ndarray:
    """True on pixels whose id differs from the pixel to the right or below."""
    edges = np.zeros(ids.shape, bool)
    edges[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edges[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edges


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MaxFilter(size))) > 0


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the first two axes (edges repeated), for (H, W) or (H, W, C) float arrays."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * array.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(array, pad, mode="edge")
        length = array.shape[axis]
        array = sum(tap * padded.take(range(i, i + length), axis=axis) for i, tap in enumerate(taps))
    return array.astype(np.float32)


def _shifted(array: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`array` moved right by dx and down by dy pixels, zeros filling in."""
    moved = np.zeros_like(array)
    moved[dy:, dx:] = array[: array.shape[0] - dy, : array.shape[1] - dx]
    return moved


def _smooth_noise(rng: np.random.Generator, height: int, width: int, feature: float) -> np.ndarray:
    """Low-frequency noise, roughly unit variance, whose blobs are about `feature` pixels across."""
    coarse = rng.normal(0, 1, (max(2, round(height / feature) + 1), max(2, round(width / feature) + 1)))
    image = Image.fromarray(coarse.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32)


def _glaze(image: np.ndarray, color: np.ndarray, density: np.ndarray) -> np.ndarray:
    """A transparent layer of pigment: it absorbs (1 - color) in proportion to its density, as watercolor does."""
    return image * (1 - density[..., None] * (1 - color))
