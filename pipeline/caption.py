"""Captions for curated images: a sidecar `.txt` beside the image, else a captioner model, else the template."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from PIL import Image

Captioner = Callable[[Image.Image], str]


def read_sidecar(image_path: Path) -> str:
    """The caption in `<stem>.txt`, decoded whatever its encoding; '' when absent or empty.

    A sidecar must be a regular file: a symbolic link could lead outside the style folder.
    """
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_symlink() or not sidecar.is_file():
        return ""
    try:
        data = sidecar.read_bytes()
    except OSError:  # unreadable (permissions): the image still serves, with the next caption source
        return ""
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # legacy single-byte files; never fails: every byte is a character
    return " ".join(text.replace("\x00", "").split())


def load_captioner(model: str | None) -> Captioner | None:
    """A transformers image-to-text pipeline from a hub id or local folder, or None."""
    if model is None:
        return None
    from transformers import pipeline

    image_to_text = pipeline("image-to-text", model=model)
    return lambda image: image_to_text(image)[0]["generated_text"].strip()


def caption_for(image_path: Path, png: bytes, captioner: Captioner | None, template: str,
                class_word: str) -> tuple[str, str]:
    """The caption and where it came from: 'sidecar', 'captioner' or 'template'."""
    text = read_sidecar(image_path)
    if text:
        return text, "sidecar"
    if captioner is not None:
        text = captioner(Image.open(io.BytesIO(png)).convert("RGB"))
        if text:
            return text, "captioner"
    return template.format(class_word=class_word), "template"
