"""Decoding one image file into what curation keeps of it: the part of curation that runs on Ray Data's actors
(`DecodeBatch`), so it imports Pillow and numpy, not the model libraries the rest of curation needs."""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from style_factory import progress
from style_factory.config import CurateConfig

# The Pillow decoders for those suffixes, and only those: a renamed EPS or PDF never reaches Ghostscript.
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]

def decode_image(data: bytes, cfg: CurateConfig, resolution: int) -> tuple[Image.Image | None, str, dict]:
    """Decode, orient, convert to RGB and resize/centre-crop to its size (`bucket_size`); or None and the reason it
    cannot serve. The third item is that size, the source's size and the crop's offset (`source_geometry`), {} when
    rejected."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        width, height = image.size
        if width * height > cfg.max_pixels:  # checked before any pixel is decoded
            return None, (f"decompression bomb guard: declared size {width}x{height} "
                          f"exceeds max_pixels={cfg.max_pixels}"), {}
        image.seek(0)  # animated images: the first frame
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:  # Pillow's own hard limit trips in open(), before our check
        return None, f"decompression bomb guard: {err} (max_pixels={cfg.max_pixels})", {}
    except UnidentifiedImageError:  # its message names the in-memory buffer: "<_io.BytesIO object at 0x7f...>"
        return None, f"cannot decode image: not an image PIL can read (tried {', '.join(IMAGE_FORMATS)})", {}
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt/truncated data
        return None, f"cannot decode image: damaged or cut short ({without_reprs(err)})", {}
    width, height = image.size
    if min(width, height) < cfg.min_side:
        return None, f"too small: {width}x{height} (min_side={cfg.min_side})", {}
    if max(width, height) / min(width, height) > cfg.max_aspect:
        return None, f"extreme aspect ratio {width}x{height} (max_aspect={cfg.max_aspect})", {}
    size = bucket_size(width, height, resolution, cfg.bucket_step) if cfg.buckets else (resolution, resolution)
    return ImageOps.fit(image, size, Image.Resampling.LANCZOS), "", source_geometry(width, height, size)


def without_reprs(err: Exception) -> str:
    """An exception's message for a person: Python object reprs (`<_io.BytesIO object at 0x...>`) left out, and
    its type's name when nothing else is left."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__


def source_geometry(width: int, height: int, size: tuple[int, int]) -> dict:
    """The trained size (width, height), the source size, and the offset of ImageOps.fit's centred crop in the source
    resized to just cover `size`: the coordinates SDXL's crop conditioning uses (as diffusers' and kohya's trainers)."""
    scale = max(size[0] / width, size[1] / height)
    return {"width": size[0], "height": size[1], "original_width": width, "original_height": height,
            "crop_left": round((width * scale - size[0]) / 2), "crop_top": round((height * scale - size[1]) / 2)}


BUCKET_MAX_ASPECT = 2.0  # buckets span aspect ratios 1:2 to 2:1


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height): the square `resolution`, and every size whose sides are multiples of
    `step` with at most its pixel count (each side as long as that allows, as kohya's buckets), both orientations."""
    area, sizes = resolution * resolution, {(resolution, resolution)}
    for width in range(step, int(resolution * BUCKET_MAX_ASPECT ** 0.5) + 1, step):
        height = area // width // step * step
        if height and 1 / BUCKET_MAX_ASPECT <= width / height <= BUCKET_MAX_ASPECT:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (on a log scale: 2:1 is as far from 1:1 as 1:2)."""
    return min(bucket_sizes(resolution, step), key=lambda size: abs(np.log(size[0] / size[1] * height / width)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; 16-bit and float modes scaled to 8 bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (older Pillow opens it as "I"): full scale maps to full scale, as a viewer shows it
        array = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257
        image = Image.fromarray(array.astype(np.uint8))
    elif image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    if image.has_transparency_data:  # an alpha channel, or a transparent palette index or colour
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


THUMB = 32  # side of the thumbnail near duplicates are compared on
THUMB_LEVELS = 20  # a thumbnail pixel "differs" when a channel moves by more than this (re-encoding noise is less)
def thumbnail(image: Image.Image) -> np.ndarray:
    """THUMB x THUMB, blurred by a thumbnail pixel: re-encoding (JPEG chroma subsampling) and resampling
    move hard colour edges by about that much, which would otherwise count as differing pixels."""
    small = image.resize((THUMB, THUMB), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1))
    return np.asarray(small, dtype=np.uint8)


GEOMETRY_COLUMNS = ("width", "height", "original_width", "original_height", "crop_left", "crop_top")


class DecodeBatch:
    """Ray Data map_batches function: raw bytes -> normalised PNG bytes, hashes, or a rejection reason."""

    def __init__(self, cfg: dict, resolution: int):
        self.cfg = CurateConfig.model_validate(cfg)
        self.resolution = resolution

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "image": [], "content_hash": [], "thumbnail": [], "rejected": [],
                                **{name: [] for name in GEOMETRY_COLUMNS}}
        for path in batch["path"]:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                image, reason, geometry = None, f"cannot read file: {err.strerror or err}", {}
            else:
                image, reason, geometry = decode_image(data, self.cfg, self.resolution)
            png, content_hash, thumb = b"", "", b""
            if image is not None:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                png = buffer.getvalue()
                content_hash = hashlib.sha256(image.tobytes()).hexdigest()
                thumb = thumbnail(image).tobytes()
            out["path"].append(str(path))
            out["image"].append(png)
            out["content_hash"].append(content_hash)
            out["thumbnail"].append(thumb)
            out["rejected"].append(reason)
            for name in GEOMETRY_COLUMNS:
                out[name].append(geometry.get(name, 0))
        progress.report("curate", {str(path): (1, 1) for path in batch["path"]})
        return out
