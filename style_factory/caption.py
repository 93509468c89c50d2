"""Captions for curated images: a sidecar `.txt` beside the image, else a captioner model, else the template; each
shortened, if need be, so that the style words the methods add after it still reach the text encoder."""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Callable

from PIL import Image

from style_factory.config import ConfigError, Style, StyleConfig
from style_factory.families.base import clip_tokenizer
from style_factory.methods import METHODS

Captioner = Callable[[Image.Image], str]

# The text encoders' context, start and end tokens included: every family's CLIP tokenizer cuts prompts there, and
# the style words come last.
MAX_PROMPT_TOKENS = 77


@functools.cache
def _tokenizer():
    return clip_tokenizer()  # the real CLIP BPE, which every family's tokenizers use; built once (about a second)


def count_tokens(text: str) -> int:
    """CLIP tokens of `text`, without the start and end tokens."""
    return len(_tokenizer()(text, add_special_tokens=False, verbose=False).input_ids)


def method_prompts(caption: str, style: StyleConfig) -> list[str]:
    """Every prompt a method builds around `caption` for `style`, as long as the text encoder will see it (each
    method says which: `Method.prompts_around`)."""
    return [prompt for method in METHODS.values() for prompt in method(style).prompts_around(caption, style,
                                                                                           count_tokens)]


def longest_prompt(caption: str, style: StyleConfig) -> int:
    """CLIP tokens of the longest of `method_prompts`, start and end tokens included."""
    return max(count_tokens(p) for p in method_prompts(caption, style)) + 2


def _fits(caption: str, style: StyleConfig) -> bool:
    return longest_prompt(caption, style) <= MAX_PROMPT_TOKENS


def fit_caption(text: str, style: StyleConfig) -> tuple[str, str]:
    """`text` and '' when every method's prompt around it fits the text encoder; else its longest start, cut after
    a word (within one, if even the first is too long), that fits, and a note saying how much was cut. ValueError
    when the style's words leave no room at all.

    A longer prompt is cut at the end by the tokenizer, and the end is where the methods put the style's token."""
    if _fits(text, style):
        return text, ""
    if not _fits("", style):
        raise ValueError(f"the style's words alone take {longest_prompt('', style)} CLIP tokens in the longest "
                         f"method prompt, past the text encoder's {MAX_PROMPT_TOKENS}: shorten the descriptor")
    words = text.split(" ")
    # the longest start that fits, by bisection on the cut (a longer start never takes fewer tokens)
    cuts = [len(" ".join(words[:n])) for n in range(1, len(words) + 1)]
    if not _fits(text[:cuts[0]], style):
        cuts = list(range(1, cuts[0] + 1))
    low, high = 0, len(cuts)  # cuts[:low] fit, cuts[high:] do not
    while low < high:
        middle = (low + high) // 2
        if _fits(text[:cuts[middle]], style):
            low = middle + 1
        else:
            high = middle
    short = text[:cuts[low - 1]].rstrip(" ,;:") if low else ""
    return short, (f"caption shortened from {count_tokens(text)} to {count_tokens(short)} CLIP tokens, so that the "
                   f"style words after it fit in the text encoder's {MAX_PROMPT_TOKENS}")


def check_content_prompts(prompts: list[str], styles: list[Style], source: str) -> None:
    """Raise ConfigError for the first of the run's `evaluate.prompts` too long for a style's words to follow it into
    the text encoder: a cut prompt would score the base model, not the style."""
    for index, prompt in enumerate(prompts):
        for style in styles:
            if (longest := longest_prompt(prompt, style.config)) > MAX_PROMPT_TOKENS:
                raise ConfigError(
                    f"{source}: evaluate.prompts.{index}: {count_tokens(prompt)} CLIP tokens; with style "
                    f"{style.name!r}'s words its prompts take {longest}, past the text encoder's {MAX_PROMPT_TOKENS}, "
                    "which would cut the style words off: shorten it")


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
    return lambda image: " ".join(image_to_text(image)[0]["generated_text"].split())


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
