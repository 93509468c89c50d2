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
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    # the source file's size and where the crop took the image from, in the source resized so its short side is
    # the resolution (SDXL conditions on both)
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("crop_left", pa.int32()), ("crop_top", pa.int32()),
    ("content_hash", pa.string()), ("source_path", pa.string()),
])


@dataclass
class ImageGeometry:
    """Where each training image came from, for families that condition on it (SDXL's micro-conditioning)."""

    original_sizes: np.ndarray  # (B, 2): height, width of the source file
    crops_top_left: np.ndarray  # (B, 2): top, left of the crop, in the source resized so its short side fits
    target_size: tuple[int, int]  # height, width trained at


@dataclass
class StyleData:
    """A style's curated images as training tensors, with their role, concept, caption and source geometry."""

    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    roles: np.ndarray  # "ref" | "aux" | "prior" (generated class images)
    concepts: np.ndarray
    captions: list[str]
    tokens: list[str]
    class_words: list[str]
    original_sizes: np.ndarray | None = None  # (N, 2) height, width of each source; None: as trained (uncropped)
    crops_top_left: np.ndarray | None = None  # (N, 2) top, left of each crop

    @classmethod
    def load(cls, path: Path, prior_dirs: Sequence[str] = ()) -> StyleData:
        """The curated table; each generated class-image folder i (style_factory/priors.py) adds concept i's "prior" rows."""
        table = pq.read_table(path).filter(pc.field("role") != "heldout").to_pydict()  # scored, never trained on
        images = [Image.open(io.BytesIO(b)) for b in table["image"]]
        for concept, folder in enumerate(map(Path, prior_dirs)):
            manifest = json.loads((folder / "manifest.json").read_text())
            generated = [Image.open(folder / name) for name in manifest["files"]]
            images += generated
            for column, value in (("role", "prior"), ("concept", concept), ("caption", manifest["prompt"]),
                                  ("token", ""), ("class_word", ""), ("crop_left", 0), ("crop_top", 0)):
                table[column] += [value] * len(generated)
            table["original_width"] += [image.width for image in generated]
            table["original_height"] += [image.height for image in generated]
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return cls(pixels=pixels, roles=np.asarray(table["role"]), concepts=np.asarray(table["concept"]),
                   captions=table["caption"], tokens=table["token"], class_words=table["class_word"],
                   original_sizes=np.stack([table["original_height"], table["original_width"]], axis=1),
                   crops_top_left=np.stack([table["crop_top"], table["crop_left"]], axis=1))

    def indices(self, role: str, concept: int) -> np.ndarray:
        return np.flatnonzero((self.roles == role) & (self.concepts == concept))

    @property
    def num_concepts(self) -> int:
        return int(self.concepts.max()) + 1 if len(self.concepts) else 0

    def geometry(self, rows: np.ndarray) -> ImageGeometry:
        """Where the images of `rows` came from (an image without a record: its own size, uncropped)."""
        size = tuple(self.pixels.shape[-2:])
        original = self.original_sizes[rows] if self.original_sizes is not None else np.tile(size, (len(rows), 1))
        crops = self.crops_top_left[rows] if self.crops_top_left is not None else np.zeros((len(rows), 2), int)
        return ImageGeometry(original_sizes=original, crops_top_left=crops, target_size=size)
