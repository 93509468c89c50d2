"""The curated data: the Parquet schema curation writes (and StyleDrop's feedback round), and the training tensors
a style's curated table becomes."""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

CURATED_SCHEMA = pa.schema([
    ("style", pa.string()), ("role", pa.string()), ("concept", pa.int32()), ("token", pa.string()),
    ("class_word", pa.string()), ("caption", pa.string()), ("caption_source", pa.string()),
    # the captioner's id and revision (style_factory.caption.captioner_identity) when caption_source is "captioner"
    ("captioner", pa.string()), ("captioner_revision", pa.string()),
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    # the source file's size and where the crop took the image from, in the source resized so its short side is
    # the resolution (SDXL conditions on both)
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("crop_left", pa.int32()), ("crop_top", pa.int32()),
    ("content_hash", pa.string()), ("source_path", pa.string()),
])


def curated_table(rows: list[dict], resolution: int) -> pa.Table:
    """A curated table: its rows, and in the schema metadata the run resolution they were curated at (the side of
    the square bucket; with buckets on, images of other aspect ratios have about its pixel count)."""
    return pa.Table.from_pylist(rows, schema=CURATED_SCHEMA.with_metadata({"resolution": str(resolution)}))


def pixel_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size as what the VAE encodes: (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class ImageGeometry:
    """Where each training image came from, for families that condition on it (SDXL's micro-conditioning)."""

    original_sizes: np.ndarray  # (B, 2): height, width of the source file
    crops_top_left: np.ndarray  # (B, 2): top, left of the crop, in the source resized to cover the trained size
    target_sizes: np.ndarray  # (B, 2): height, width trained at (the image's bucket)

    def take(self, index: np.ndarray) -> ImageGeometry:
        return ImageGeometry(self.original_sizes[index], self.crops_top_left[index], self.target_sizes[index])


@dataclass
class StyleData:
    """A style's curated images as training data, with their role, concept, caption and source geometry.

    Images are held as decoded, 3 bytes a pixel (docs/performance.md has the bytes per image); the loop turns them
    into latents once (style_factory/loop.py) and never reads them again. With aspect-ratio buckets they come in
    several sizes: `bucket` restricts `indices` to one size, so that a batch is drawn from one bucket."""

    images: list[np.ndarray]  # uint8 (H, W, 3)
    roles: np.ndarray  # "ref" | "aux" | "prior" (generated class images)
    concepts: np.ndarray
    captions: list[str]
    tokens: list[str]
    class_words: list[str]
    original_sizes: np.ndarray | None = None  # (N, 2) height, width of each source; None: as trained (uncropped)
    crops_top_left: np.ndarray | None = None  # (N, 2) top, left of each crop
    resolution: int | None = None  # the run's (the square bucket's side); None: the images' own (square) side
    bucket: tuple[int, int] | None = None  # (height, width): indices() keeps to this size where it can

    def __post_init__(self):
        if self.resolution is None and self.images:
            self.resolution = int(self.images[0].shape[0])

    @classmethod
    def load(cls, path: Path, prior_dirs: Sequence[str] = ()) -> StyleData:
        """The curated table; each generated class-image folder i (style_factory/priors.py) adds concept i's "prior" rows.
        Each image is decoded straight to uint8, one at a time: no float copy of the set is ever made."""
        table = pq.read_table(path).filter(pc.field("role") != "heldout")  # scored, never trained on
        resolution = (table.schema.metadata or {}).get(b"resolution")
        table = table.to_pydict()
        images = [_rgb(Image.open(io.BytesIO(b))) for b in table.pop("image")]
        for concept, folder in enumerate(map(Path, prior_dirs)):
            manifest = json.loads((folder / "manifest.json").read_text())
            generated = [_rgb(Image.open(folder / name)) for name in manifest["files"]]
            images += generated
            for column, value in (("role", "prior"), ("concept", concept), ("caption", manifest["prompt"]),
                                  ("token", ""), ("class_word", ""), ("crop_left", 0), ("crop_top", 0)):
                table[column] += [value] * len(generated)
            table["original_width"] += [image.shape[1] for image in generated]
            table["original_height"] += [image.shape[0] for image in generated]
        return cls(images=images, roles=np.asarray(table["role"]), concepts=np.asarray(table["concept"]),
                   captions=table["caption"], tokens=table["token"], class_words=table["class_word"],
                   original_sizes=np.stack([table["original_height"], table["original_width"]], axis=1),
                   crops_top_left=np.stack([table["crop_top"], table["crop_left"]], axis=1),
                   resolution=int(resolution) if resolution else None)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2): height, width of each image (its bucket)."""
        return np.array([image.shape[:2] for image in self.images]).reshape(-1, 2)

    def indices(self, role: str, concept: int | None = None) -> np.ndarray:
        """The rows of `role` (and `concept`), in `bucket` when it holds any of them, else in every bucket."""
        chosen = (self.roles == role) & (True if concept is None else self.concepts == concept)
        if self.bucket is not None:
            in_bucket = chosen & (self.sizes == self.bucket).all(axis=1)
            chosen = in_bucket if in_bucket.any() else chosen
        return np.flatnonzero(chosen)

    @property
    def num_concepts(self) -> int:
        return int(self.concepts.max()) + 1 if len(self.concepts) else 0

    def geometry(self, rows: np.ndarray) -> ImageGeometry:
        """Where the images of `rows` came from (an image without a record: its own size, uncropped)."""
        sizes = self.sizes[rows]
        original = self.original_sizes[rows] if self.original_sizes is not None else sizes
        crops = self.crops_top_left[rows] if self.crops_top_left is not None else np.zeros((len(rows), 2), int)
        return ImageGeometry(original_sizes=original, crops_top_left=crops, target_sizes=sizes)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))
