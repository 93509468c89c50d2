"""Curate: style folders -> `curated/<style>.parquet` + `curated/<style>.report.csv`.

Every input file gets one verdict, kept or rejected with a reason. Files are listed on the driver
(so nothing outside the style folder is ever read), decoded and normalised in parallel with Ray Data, then, with a
captioner, captioned where no sidecar says what an image shows (one Ray Data pass over every style's images, through a
cache) and deduplicated per style; a caption too long for the methods' style words to follow it into the text
encoder is shortened, and the file's report note says so. A style fails only when a concept keeps fewer
StyleRef images than `curate.min_ref_images`, or when its words alone overflow the text encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from style_factory import caption, progress
from style_factory.config import CurateConfig, Style
from style_factory.data import curated_table
from style_factory.decode import GEOMETRY_COLUMNS, THUMB, THUMB_LEVELS, DecodeBatch
from style_factory.files import code_version, sha256_of, write_json_atomic, write_parquet_atomic, write_text_atomic
from style_factory.run import Run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
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


# Pairs whose 4x4-pixel cell means differ by more than this (levels, on average) are not aligned: copies measured at
# most 16 and distinct photographs and noise at least 23, so this only skips work, never a copy.
ALIGN_CELL_LEVELS = 25
ALIGN_MAX_SCALE = 0.15  # a copy's content may be magnified or shrunk by this much (a crop of ~13% of a side) ...
ALIGN_MAX_SHIFT = 0.12  # ... and moved by this fraction of the side
ALIGN_MIN_OVERLAP = 0.7  # an alignment that overlaps less of the thumbnail than this proves nothing
ALIGN_EDGE = 1  # once aligned, pixels this close to either thumbnail's border are not compared (see _aligned_fraction)


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
    actors = max(1, min(int(ray.cluster_resources().get("CPU", 1)), -(-len(paths) // 8)))  # all started at once
    decoded = dataset.map_batches(DecodeBatch, fn_constructor_kwargs={"cfg": cfg.model_dump(),
                                  "resolution": resolution}, batch_size=8,
                                  compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors,
                                                                     initial_size=actors))
    return {row["path"]: row for row in decoded.iter_rows()}


def curate_style(style: Style, candidates: list[Candidate], decoded: dict[str, dict], cfg: CurateConfig,
                 resolution: int, out_dir: Path, captions: dict[str, str] | None = None,
                 captioner: tuple[str, str] = ("", "")) -> pd.DataFrame:
    """Deduplicate, caption and write one style's curated Parquet and its report; returns the report. `captions`
    are the captioner's by content hash (`caption_all`), `captioner` its (id, revision), recorded beside them."""
    kept, report = [], []
    seen_exact: dict[str, str] = {}
    kept_thumbs: list[np.ndarray] = []
    kept_names: list[str] = []
    words = caption.style_words(style.config, cfg.style_words) if cfg.strip_style_words else []
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
            text, source, stripped = caption.caption_for(cand.path, (captions or {}).get(row["content_hash"]),
                                                         style.config, concept.class_word, words)
            try:
                text, note = caption.fit_caption(text, style.config)
            except ValueError as err:
                raise CurationError(f"{style.dir / 'style.yaml'}: {err}") from None
            if note:
                print(f"[curate] WARNING {style.name}: {rel}: {note}", flush=True)
            note = "; ".join(filter(None, [stripped, note]))
            captioned_by = dict(zip(("captioner", "captioner_revision"),
                                    captioner if source == "captioner" else ("", "")))
        report.append({"style": style.name, "file": rel, "role": cand.role, "concept": cand.concept,
                       "status": "rejected" if reason else "kept", "reason": reason, "note": note})
        if reason:
            continue
        kept.append({"style": style.name, "role": cand.role, "concept": cand.concept, "token": concept.token,
                     "class_word": concept.class_word, "caption": text, "caption_source": source, **captioned_by,
                     "image": row["image"], **{name: row[name] for name in GEOMETRY_COLUMNS},
                     "content_hash": row["content_hash"], "source_path": rel})
    report_df = pd.DataFrame(report, columns=["style", "file", "role", "concept", "status", "reason", "note"])
    write_text_atomic(out_dir / f"{style.name}.report.csv", report_df.to_csv(index=False))
    _check_enough(style, report_df, cfg)
    write_parquet_atomic(curated_table(kept, resolution), out_dir / f"{style.name}.parquet")
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


def caption_all(run: Run, candidates: list[Candidate], decoded: dict[str, dict], identity: tuple[str, str]
                ) -> dict[str, str]:
    """The captioner's captions (content hash -> caption) of the decoded candidates that have no sidecar, in one
    Ray Data pass over every style's, through the cache `<results_dir>/captions/`; {} without a captioner. Near
    duplicates, rejected after this, are captioned too (their captions are cached like any other)."""
    cfg = run.config.curate
    if cfg.captioner is None:
        return {}
    rows = [decoded.get(str(c.path.resolve())) for c in candidates
            if not c.rejected and not caption.read_sidecar(c.path)]
    images = {row["content_hash"]: row["image"] for row in rows if row is not None and not row["rejected"]}
    if not images:
        return {}
    captions, stats = caption.caption_images(images, cfg, identity, Path(run.config.results_dir).resolve() / "captions")
    print(f"[curate] captions of {len(images)} image(s) by {identity[0]} ({identity[1]}): {stats.captioned} by the "
          f"model in {len(stats.batches)} batch(es), {stats.cached} from the cache", flush=True)
    return captions


def curate_styles(run: Run) -> None:
    """Curate every live style whose inputs changed since the last run; record each style's outcome."""
    cfg, resolution = run.config.curate, run.resolution
    out_dir = run.dir / "curated"
    identity = caption.captioner_identity(cfg.captioner, run.config.model.models_dir) if cfg.captioner else ("", "")
    todo = []
    for style in run.live_styles():
        key = sha256_of(style_fingerprint(style), style.config.model_dump(), cfg.model_dump(), resolution,
                        code_version("style_factory.curate"), *([identity] if cfg.captioner else []))
        marker = out_dir / f"{style.name}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key and run.curated(style.name).is_file():
            run.record(style.name, "curate", "reused")
        else:
            todo.append((style, key))
    candidates = {style.name: list_candidates(style) for style, _ in todo}
    paths = [c.path.resolve() for found in candidates.values() for c in found if not c.rejected]
    decoded = decode_all(paths, cfg, resolution)
    captions = caption_all(run, [c for style, _ in todo for c in candidates[style.name]], decoded, identity)
    for style, key in todo:
        try:
            report = curate_style(style, candidates[style.name], decoded, cfg, resolution, out_dir, captions,
                                  identity)
        except CurationError as err:
            run.record(style.name, "curate", str(err))
            print(f"[curate] {style.name} FAILED: {err}", flush=True)
            continue
        counts = report.status.value_counts().to_dict()
        buckets = bucket_counts(run.curated(style.name))
        write_json_atomic(out_dir / f"{style.name}.json", {"key": key, **counts, "buckets": buckets})
        run.record(style.name, "curate", "ok")
        print(f"[curate] {style.name}: kept {counts.get('kept', 0)}, rejected {counts.get('rejected', 0)}; "
              f"images per size: {', '.join(f'{size} {n}' for size, n in buckets.items())}", flush=True)


def bucket_counts(curated: Path) -> dict[str, int]:
    """The kept images per size ("<width>x<height>", the bucket; one size when buckets are off), largest first."""
    sizes = pd.read_parquet(curated, columns=["width", "height"])
    counts = (sizes.width.astype(str) + "x" + sizes.height.astype(str)).value_counts()
    return {size: int(n) for size, n in counts.items()}
