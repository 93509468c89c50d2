"""Curate: style folders -> `curated/<style>.parquet` + `curated/<style>.report.csv`.

Every input file gets one verdict, kept or rejected with a reason. Files are listed on the driver
(so nothing outside the style folder is ever read), decoded and normalised in parallel with Ray Data,
then deduplicated and captioned per style. A style fails only when a concept keeps fewer StyleRef
images than `curate.min_ref_images`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageFilter, ImageOps

from pipeline import caption
from pipeline.config import CurateConfig, Style
from pipeline.files import code_version, sha256_of, write_json_atomic, write_parquet_atomic, write_text_atomic
from pipeline.run import Run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The Pillow decoders for those suffixes, and only those: a renamed EPS or PDF never reaches Ghostscript.
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]
SIDECAR_SUFFIXES = {".txt"}
CURATED_SCHEMA = pa.schema([
    ("style", pa.string()), ("role", pa.string()), ("concept", pa.int32()), ("token", pa.string()),
    ("class_word", pa.string()), ("caption", pa.string()), ("caption_source", pa.string()),
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("content_hash", pa.string()), ("source_path", pa.string()),
])


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


def decode_image(data: bytes, cfg: CurateConfig, resolution: int) -> tuple[Image.Image | None, str]:
    """Decode, orient, convert to RGB and centre-crop/resize; or None and the reason it cannot serve."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        width, height = image.size
        if width * height > cfg.max_pixels:  # checked before any pixel is decoded
            return None, (f"decompression bomb guard: declared size {width}x{height} "
                          f"exceeds max_pixels={cfg.max_pixels}")
        image.seek(0)  # animated images: the first frame
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:  # Pillow's own hard limit trips in open(), before our check
        return None, f"decompression bomb guard: {err} (max_pixels={cfg.max_pixels})"
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt/truncated data
        return None, f"cannot decode image: {type(err).__name__}: {err}"
    width, height = image.size
    if min(width, height) < cfg.min_side:
        return None, f"too small: {width}x{height} (min_side={cfg.min_side})"
    if max(width, height) / min(width, height) > cfg.max_aspect:
        return None, f"extreme aspect ratio {width}x{height} (max_aspect={cfg.max_aspect})"
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS), ""


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


def differing_fraction(thumb: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Fraction of thumbnail pixels that differ, against each of `others` (K, T, T, 3).

    Perceptual hashes (dHash, pHash) fail on flat artwork, where gradient signs are noise. On the
    example styles, copies re-saved as JPEG (quality 60-90) and/or resized by 75-110% differ by at most
    1% (hard-edged blocky images included), distinct images by at least 4.7%.
    """
    diff = np.abs(others.astype(np.int16) - thumb.astype(np.int16)).max(axis=-1)
    return (diff > THUMB_LEVELS).mean(axis=(1, 2))


class DecodeBatch:
    """Ray Data map_batches function: raw bytes -> normalised PNG bytes, hashes, or a rejection reason."""

    def __init__(self, cfg: dict, resolution: int):
        self.cfg = CurateConfig.model_validate(cfg)
        self.resolution = resolution

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "image": [], "content_hash": [], "thumbnail": [], "rejected": []}
        for path in batch["path"]:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                image, reason = None, f"cannot read file: {err.strerror or err}"
            else:
                image, reason = decode_image(data, self.cfg, self.resolution)
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
        return out


def decode_all(paths: list[Path], cfg: CurateConfig, resolution: int) -> dict[str, dict]:
    """Decode every path in parallel with Ray Data; returns {absolute path: decoded row}.

    Files are read inside the map function rather than with `read_binary_files`, so one unreadable
    file becomes one rejected row instead of failing the whole dataset.
    """
    import ray

    if not paths:
        return {}
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
        report.append({"style": style.name, "file": rel, "role": cand.role, "concept": cand.concept,
                       "status": "rejected" if reason else "kept", "reason": reason})
        if reason:
            continue
        concept = style.config.concepts[cand.concept]
        text, source = caption.caption_for(cand.path, row["image"], captioner,
                                           style.config.caption_template, concept.class_word)
        kept.append({"style": style.name, "role": cand.role, "concept": cand.concept, "token": concept.token,
                     "class_word": concept.class_word, "caption": text, "caption_source": source,
                     "image": row["image"], "width": resolution, "height": resolution,
                     "content_hash": row["content_hash"], "source_path": rel})
    report_df = pd.DataFrame(report, columns=["style", "file", "role", "concept", "status", "reason"])
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
    cfg, resolution = run.config.curate, run.config.model.resolution
    out_dir = run.dir / "curated"
    todo = []
    for style in run.live_styles():
        key = sha256_of(style_fingerprint(style), style.config.model_dump(), cfg.model_dump(), resolution,
                        code_version("curate.py", "caption.py"))
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
