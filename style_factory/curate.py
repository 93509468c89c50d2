"""Curate: style folders -> `curated/<style>.parquet` + `curated/<style>.report.csv`.

Every input file gets one verdict, kept or rejected with a reason. Files are listed on the driver
(so nothing outside the style folder is ever read), decoded and normalised in parallel with Ray Data,
then deduplicated and captioned per style; a caption too long for the methods' style words to follow it into the
text encoder is shortened, and the file's report note says so. A style fails only when a concept keeps fewer
StyleRef images than `curate.min_ref_images`, or when its words alone overflow the text encoder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from style_factory import caption, progress
from style_factory.config import CurateConfig, Style
from style_factory.data import CURATED_SCHEMA
from style_factory.files import code_version, sha256_of, write_json_atomic, write_parquet_atomic, write_text_atomic
from style_factory.run import Run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The Pillow decoders for those suffixes, and only those: a renamed EPS or PDF never reaches Ghostscript.
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]
SIDECAR_SUFFIXES = {".txt"}


class CurationError(RuntimeError):
    """A style has too few usable images; the message names the style folder and the counts."""


@dataclass
class Candidate:
    """One input file found in a concept folder, with what the driver knows before decoding it."""

    style: str
    role: str
    concept: int
    path: Path
    rejected: str = ""  # a reason, when the file is rejected without decoding


def list_candidates(style: Style) -> list[Candidate]:
    """Every entry of every concept folder; unusable ones arrive already rejected with their reason."""
    root = style.dir.resolve()
    found = []
    for index, concept in enumerate(style.config.concepts):
        for role in concept.roles():
            folder = style.concept_dir(concept, role)
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in SIDECAR_SUFFIXES:
                    continue
                found.append(Candidate(style.name, role, index, path, _rejection_before_decoding(path, root)))
    return found


def _rejection_before_decoding(path: Path, root: Path) -> str:
    """Why an entry cannot be an input, from its name and metadata alone; '' when it may be one."""
    if path.name.startswith("."):
        return "hidden file"
    if _printable(path.name) != path.name:
        return "file name is not valid UTF-8 (rename the file)"
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target, or a loop (RuntimeError before Python 3.13)
            return "broken symbolic link"
        if not target.is_relative_to(root):
            return "symbolic link pointing outside the style folder"
    if path.is_dir():
        return "directory (sub-folders are not read)"
    if not path.is_file():
        return "not a regular file (FIFO, socket or device)"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file type ({path.suffix or 'no extension'})"
    if path.stat().st_size == 0:
        return "empty file"
    return ""


def decode_image(data: bytes, cfg: CurateConfig, resolution: int) -> tuple[Image.Image | None, str, dict]:
    """Decode, orient, convert to RGB and centre-crop/resize; or None and the reason it cannot serve.
    The third item is the source's size and the crop's offset (`source_geometry`), {} when rejected."""
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
    return (ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS), "",
            source_geometry(width, height, resolution))


def without_reprs(err: Exception) -> str:
    """An exception's message for a person: Python object reprs (`<_io.BytesIO object at 0x...>`) left out, and
    its type's name when nothing else is left."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__


def source_geometry(width: int, height: int, resolution: int) -> dict:
    """The source size and the offset of ImageOps.fit's centred square crop, in the source resized so its short
    side is `resolution`: the coordinates SDXL's crop conditioning uses (as diffusers' and kohya's trainers)."""
    side = min(width, height)
    scale = resolution / side
    return {"original_width": width, "original_height": height,
            "crop_left": round((width - side) / 2 * scale), "crop_top": round((height - side) / 2 * scale)}


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
# Pairs whose 4x4-pixel cell means differ by more than this (levels, on average) are not aligned: copies measured at
# most 16 and distinct photographs and noise at least 23, so this only skips work, never a copy.
ALIGN_CELL_LEVELS = 25
ALIGN_MAX_SCALE = 0.15  # a copy's content may be magnified or shrunk by this much (a crop of ~13% of a side) ...
ALIGN_MAX_SHIFT = 0.12  # ... and moved by this fraction of the side
ALIGN_MIN_OVERLAP = 0.7  # an alignment that overlaps less of the thumbnail than this proves nothing
ALIGN_EDGE = 1  # once aligned, pixels this close to either thumbnail's border are not compared (see _aligned_fraction)


def thumbnail(image: Image.Image) -> np.ndarray:
    """THUMB x THUMB, blurred by a thumbnail pixel: re-encoding (JPEG chroma subsampling) and resampling
    move hard colour edges by about that much, which would otherwise count as differing pixels."""
    small = image.resize((THUMB, THUMB), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1))
    return np.asarray(small, dtype=np.uint8)


def differing_fraction(thumb: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Fraction of thumbnail pixels that differ, against each of `others` (K, T, T, 3): as they lie, or once the
    other is scaled and shifted onto `thumb` (`_align`), whichever is less.

    The alignment catches copies cropped by a few percent or resized before the square crop, whose content moves by
    up to two thumbnail pixels so that edges and texture no longer line up. It moves the whole image, so it cannot
    explain away an object that differs or lies elsewhere, which is all that sets distinct flat images apart.
    Perceptual hashes (dHash, pHash) fail on flat artwork, where gradient signs are noise.

    Measured at resolution 64 and 512, on 12 images each of smooth photograph-like fields, 1/f noise, strong pixel
    noise over blocks, flat blocks (tests/conftest.py's noise_image, square and not) and the realism example style:
    copies re-saved as JPEG (quality 70-95), resized by 90-110%, or cropped by 2-5% off one or two edges (also resized
    and re-saved) differ by at most 0.6%; distinct images by at least 83% (16% within realism), and within each of
    the six example styles by at least 4.0% (flat scenes that differ by one small object). The default
    near_duplicate_fraction, 3%, sits between.
    """
    thumb, others = thumb.astype(np.float32), others.astype(np.float32)
    fractions = (np.abs(others - thumb).max(axis=-1) > THUMB_LEVELS).mean(axis=(1, 2))
    close = np.abs(_cells(others) - _cells(thumb)).mean(axis=(-3, -2, -1)) <= ALIGN_CELL_LEVELS
    if close.any():
        fractions[close] = np.minimum(fractions[close], _aligned_fraction(thumb, others[close]))
    return fractions


def _cells(thumbs: np.ndarray, cell: int = 4) -> np.ndarray:
    """Means of cell x cell pixel blocks: (..., T, T, C) -> (..., T / cell, T / cell, C)."""
    side = thumbs.shape[-2] // cell
    return thumbs.reshape(*thumbs.shape[:-3], side, cell, side, cell, thumbs.shape[-1]).mean(axis=(-4, -2))


def _aligned_fraction(thumb: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Fraction of the overlap where each of `others`, scaled and shifted by `_align`, differs from `thumb`; 1 where
    they overlap too little. A thumbnail's outer pixels are left out: their blur saw the image's edge, where the other
    image's saw more content."""
    scale, dx, dy = np.split(_align(thumb, others), 3, axis=1)
    ys, xs = _grid(THUMB)
    warped, inside = _sample(others, scale * xs + dx, scale * ys + dy, edge=ALIGN_EDGE)
    interior = np.maximum(np.abs(xs), np.abs(ys)) <= (THUMB - 1) / 2 - ALIGN_EDGE
    inside &= interior
    differs = (np.abs(warped - thumb.reshape(1, -1, 3)).max(axis=-1) > THUMB_LEVELS) & inside
    compared = inside.sum(axis=1)
    return np.where(compared >= ALIGN_MIN_OVERLAP * interior.sum(), differs.sum(axis=1) / np.maximum(compared, 1), 1.0)


def _align(thumb: np.ndarray, others: np.ndarray, passes: tuple[tuple[int, int], ...] = ((2, 8), (1, 4))
           ) -> np.ndarray:
    """Per other, (scale, dx, dy) such that other(scale * p + d) ~ thumb(p), p in thumbnail pixels from the centre.

    Gauss-Newton on the squared difference, for all of `others` at once; each (factor, iterations) pass works on
    factor x factor pixel means, the first on 2x2 for a basin as wide as the two pixels a copy's content may move.
    """
    params = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (len(others), 1))
    for factor, iterations in passes:
        target, images = _cells(thumb, factor).reshape(1, -1, 3), _cells(others, factor)
        grad_y, grad_x = np.gradient(images, axis=(1, 2))
        stacked = np.concatenate([images, grad_x, grad_y], axis=-1)  # sampled together
        ys, xs = _grid(images.shape[1])
        for _ in range(iterations):
            scale, dx, dy = params[:, :1], params[:, 1:2] / factor, params[:, 2:3] / factor
            sampled, inside = _sample(stacked, scale * xs + dx, scale * ys + dy)
            value, gx, gy = np.split(sampled * inside[..., None], 3, axis=-1)  # samples outside have no say
            residual = ((value - target) * inside[..., None]).reshape(len(others), -1)
            jacobian = np.stack([gx * xs[..., None] + gy * ys[..., None], gx, gy], axis=-1).reshape(len(others), -1, 3)
            hessian = np.einsum("kni,knj->kij", jacobian, jacobian) + 1e-3 * np.eye(3, dtype=np.float32)
            step = np.linalg.solve(hessian, -np.einsum("kni,kn->ki", jacobian, residual)[..., None])[..., 0]
            params += step * np.array([1, factor, factor], np.float32)
            params[:, 0] = np.clip(params[:, 0], 1 - ALIGN_MAX_SCALE, 1 + ALIGN_MAX_SCALE)
            params[:, 1:] = np.clip(params[:, 1:], -ALIGN_MAX_SHIFT * THUMB, ALIGN_MAX_SHIFT * THUMB)
    return params


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates from the image centre, flattened: (1, side * side) each for y and x."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2
    return ys.reshape(1, -1), xs.reshape(1, -1)


def _sample(images: np.ndarray, xs: np.ndarray, ys: np.ndarray, edge: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of `images` (K, S, S, C) at centred coordinates xs, ys (K, N): (K, N, C), and which lie
    inside, at least `edge` pixels from the border (the others repeat the border)."""
    side = images.shape[1]
    xs, ys = xs + (side - 1) / 2, ys + (side - 1) / 2
    inside = (xs >= edge) & (xs <= side - 1 - edge) & (ys >= edge) & (ys <= side - 1 - edge)
    xs, ys = np.clip(xs, 0, side - 1), np.clip(ys, 0, side - 1)
    x0, y0 = np.minimum(xs.astype(int), side - 2), np.minimum(ys.astype(int), side - 2)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    k = np.arange(len(images))[:, None]
    top = images[k, y0, x0] * (1 - fx) + images[k, y0, x0 + 1] * fx
    bottom = images[k, y0 + 1, x0] * (1 - fx) + images[k, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy, inside


GEOMETRY_COLUMNS = ("original_width", "original_height", "crop_left", "crop_top")


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


def decode_all(paths: list[Path], cfg: CurateConfig, resolution: int) -> dict[str, dict]:
    """Decode every path in parallel with Ray Data; returns {absolute path: decoded row}.

    Files are read inside the map function rather than with `read_binary_files`, so one unreadable
    file becomes one rejected row instead of failing the whole dataset.
    """
    import ray

    if not paths:
        return {}
    progress.report("curate", {str(p): (0, 1) for p in paths})
    dataset = ray.data.from_items([{"path": str(p)} for p in paths])
    decoded = dataset.map_batches(DecodeBatch, fn_constructor_kwargs={"cfg": cfg.model_dump(),
                                  "resolution": resolution}, batch_size=8,
                                  compute=ray.data.ActorPoolStrategy(
                                      min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))))
    return {row["path"]: row for row in decoded.iter_rows()}


def curate_style(style: Style, candidates: list[Candidate], decoded: dict[str, dict], cfg: CurateConfig,
                 resolution: int, out_dir: Path) -> pd.DataFrame:
    """Deduplicate, caption and write one style's curated Parquet and its report; returns the report."""
    kept, report = [], []
    seen_exact: dict[str, str] = {}
    kept_thumbs: list[np.ndarray] = []
    kept_names: list[str] = []
    captioner = caption.load_captioner(cfg.captioner)
    for cand in candidates:
        rel = _printable(str(cand.path.relative_to(style.dir)))
        reason, row = cand.rejected, None
        if not reason:  # rejected candidates were never decoded (a broken link cannot even be resolved)
            row = decoded.get(str(cand.path.resolve()))
            reason = row["rejected"] if row is not None else "unreadable (vanished or permission denied)"
        if not reason:
            if row["content_hash"] in seen_exact:
                reason = f"exact duplicate of {seen_exact[row['content_hash']]}"
            else:
                thumb = np.frombuffer(row["thumbnail"], np.uint8).reshape(THUMB, THUMB, 3)
                fractions = differing_fraction(thumb, np.stack(kept_thumbs)) if kept_thumbs else np.ones(0)
                if len(fractions) and fractions.min() <= cfg.near_duplicate_fraction:
                    twin = kept_names[int(fractions.argmin())]
                    reason = f"near duplicate of {twin} ({fractions.min():.1%} of pixels differ)"
                else:
                    seen_exact[row["content_hash"]] = rel
                    kept_thumbs.append(thumb)
                    kept_names.append(rel)
        note = ""
        if not reason:
            concept = style.config.concepts[cand.concept]
            text, source = caption.caption_for(cand.path, row["image"], captioner,
                                               style.config.caption_template, concept.class_word)
            try:
                text, note = caption.fit_caption(text, style.config)
            except ValueError as err:
                raise CurationError(f"{style.dir / 'style.yaml'}: {err}") from None
            if note:
                print(f"[curate] WARNING {style.name}: {rel}: {note}", flush=True)
        report.append({"style": style.name, "file": rel, "role": cand.role, "concept": cand.concept,
                       "status": "rejected" if reason else "kept", "reason": reason, "note": note})
        if reason:
            continue
        kept.append({"style": style.name, "role": cand.role, "concept": cand.concept, "token": concept.token,
                     "class_word": concept.class_word, "caption": text, "caption_source": source,
                     "image": row["image"], "width": resolution, "height": resolution,
                     **{name: row[name] for name in GEOMETRY_COLUMNS},
                     "content_hash": row["content_hash"], "source_path": rel})
    report_df = pd.DataFrame(report, columns=["style", "file", "role", "concept", "status", "reason", "note"])
    write_text_atomic(out_dir / f"{style.name}.report.csv", report_df.to_csv(index=False))
    _check_enough(style, report_df, cfg)
    write_parquet_atomic(pa.Table.from_pylist(kept, schema=CURATED_SCHEMA), out_dir / f"{style.name}.parquet")
    return report_df


def _printable(name: str) -> str:
    """A file name as UTF-8 text: bytes that are not UTF-8 shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_enough(style: Style, report: pd.DataFrame, cfg: CurateConfig) -> None:
    for index, concept in enumerate(style.config.concepts):
        ref = report[(report.concept == index) & (report.role == "ref")]
        kept = int((ref.status == "kept").sum())
        if kept < cfg.min_ref_images:
            folder = style.concept_dir(concept, "ref")
            raise CurationError(
                f"{folder}: only {kept} usable StyleRef image(s) of {len(ref)} file(s) for token {concept.token!r}; "
                f"curate.min_ref_images is {cfg.min_ref_images}. See {style.name}.report.csv for the reasons.")


def style_fingerprint(style: Style) -> str:
    """Hash of every entry under the style folder: name, type, size and modification time (a link: its target).

    Metadata only: reading contents would block on a FIFO and cost a full read of every image per run.
    Any edit, addition, removal or touch re-curates the style.
    """
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(style.dir):
        dirs.sort()  # walk in a stable order
        for name in dirs + sorted(files):
            path = Path(folder) / name
            info = path.lstat()
            digest.update(os.fsencode(path.relative_to(style.dir)) + b"\0")
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif not stat.S_ISDIR(info.st_mode):  # a folder's own mtime moves with every temporary file
                digest.update(f"{info.st_mode} {info.st_size} {info.st_mtime_ns}".encode())
    return digest.hexdigest()


def curate_styles(run: Run) -> None:
    """Curate every live style whose inputs changed since the last run; record each style's outcome."""
    cfg, resolution = run.config.curate, run.resolution
    out_dir = run.dir / "curated"
    todo = []
    for style in run.live_styles():
        key = sha256_of(style_fingerprint(style), style.config.model_dump(), cfg.model_dump(), resolution,
                        code_version("style_factory.curate"))
        marker = out_dir / f"{style.name}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key and run.curated(style.name).is_file():
            run.record(style.name, "curate", "reused")
        else:
            todo.append((style, key))
    candidates = {style.name: list_candidates(style) for style, _ in todo}
    paths = [c.path.resolve() for found in candidates.values() for c in found if not c.rejected]
    decoded = decode_all(paths, cfg, resolution)
    for style, key in todo:
        try:
            report = curate_style(style, candidates[style.name], decoded, cfg, resolution, out_dir)
        except CurationError as err:
            run.record(style.name, "curate", str(err))
            print(f"[curate] {style.name} FAILED: {err}", flush=True)
            continue
        counts = report.status.value_counts().to_dict()
        write_json_atomic(out_dir / f"{style.name}.json", {"key": key, **counts})
        run.record(style.name, "curate", "ok")
        print(f"[curate] {style.name}: kept {counts.get('kept', 0)}, rejected {counts.get('rejected', 0)}",
              flush=True)
