"""Captions for curated images: a sidecar `.txt` beside the image, else a captioner model's (a Ray Data pass, cached
per image, captioner and prompt, with the style's words removed), else the template; each shortened, if need be, so
that the style words the methods add after it still reach the text encoder."""
from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from style_factory import progress
from style_factory.config import ConfigError, CurateConfig, Style, StyleConfig
from style_factory.families.base import clip_tokenizer
from style_factory.files import folder_manifest, read_json, sha256_of, write_json_atomic
from style_factory.methods import METHODS

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


# The captioner's decoding: greedy, so that a cached caption is what a rerun would write.
GREEDY = {"do_sample": False, "num_beams": 1}
# Left out of the descriptor's words before they are removed from captions: they carry no style.
FUNCTION_WORDS = frozenset("a an the and or of in on at by for from with without to into its their his her this that "
                           "these those very".split())
ARTICLES, PREPOSITIONS = r"(?:a|an|the)", r"(?:of|in|on|at|by|with|from|for|to)"
# After style words are removed: what they leave dangling, tidied until nothing changes (see strip_style_words).
TIDY = [
    (re.compile(rf"\b{ARTICLES}\s+of\s+", re.IGNORECASE), ""),  # "a [watercolor painting] of a boat"
    (re.compile(rf"\b(?:{ARTICLES}|{PREPOSITIONS})\s*(?=[,;:.]|$)", re.IGNORECASE), ""),  # "a boat in [watercolor]"
    (re.compile(r"\s+"), " "),
    (re.compile(r"\s+(?=[,;:.])"), ""),
    (re.compile(r"([,;:])(?:\s*[,;:])+"), r"\1"),  # "a boat, [pixel art], at night"
    (re.compile(r"^[\s,;:.-]+|[\s,;:-]+$"), ""),
]


class Captioner:
    """A transformers image-text-to-text model (BLIP, GIT, BLIP-2, Florence-2, Qwen2-VL, ...) loaded once from a
    local folder: `captioner(images)` captions a batch in one `generate` call.

    With a prompt, each image is asked it: through the processor's chat template where it has one (chat models:
    Qwen2-VL), else as the text input (Florence-2's task token, BLIP's caption start). A decoder-only model's answer
    follows the prompt's tokens, which are cut off; prompts are padded on the left, as batched generation needs
    where images of different sizes take different numbers of image tokens."""

    def __init__(self, folder: str, prompt: str | None, max_tokens: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32 if device == "cpu" else "auto").to(device).eval()
        self.prompt, self.max_tokens, self.device = prompt, max_tokens, device
        if (tokenizer := getattr(self.processor, "tokenizer", None)) is not None:
            tokenizer.padding_side = "left"
        if prompt is not None and getattr(self.processor, "chat_template", None):
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self.prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        prompts = {} if self.prompt is None else {"text": [self.prompt] * len(images)}
        inputs = self.processor(images=images, **prompts, return_tensors="pt", padding=True).to(
            self.device, dtype=self.model.dtype)  # floating inputs (pixels) in the model's dtype
        inputs.pop("token_type_ids", None)  # BERT tokenizers' (GIT's): generate takes none
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_tokens, **GREEDY)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and output.shape[1] > prompt_ids.shape[1] and torch.equal(
                output[:, :prompt_ids.shape[1]], prompt_ids.to(output.device)):
            output = output[:, prompt_ids.shape[1]:]
        return [" ".join(text.split()) for text in self.processor.batch_decode(output, skip_special_tokens=True)]


class CaptionBatch:
    """Ray Data map_batches class: curated PNGs -> captions; each actor loads the captioner once. `batch_size` is the
    number of images its generate call took, for the stage's statistics."""

    def __init__(self, folder: str, prompt: str | None, max_tokens: int):
        import torch

        self.captioner = Captioner(folder, prompt, max_tokens, "cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in batch["image"]]
        hashes = list(batch["content_hash"])
        captions = self.captioner(images)
        progress.report("caption", {h: (1, 1) for h in hashes})
        return {"content_hash": hashes, "caption": captions, "batch_size": [len(images)] * len(images)}


@dataclass
class CaptionStats:
    """What a captioning pass did: images captioned by the model (in batches of these sizes) and from the cache."""

    captioned: int = 0
    cached: int = 0
    batches: list[int] = field(default_factory=list)


def captioner_identity(folder: str, models_dir: str | None) -> tuple[str, str]:
    """The captioner's id and revision, from its resolved local folder (style_factory/hub.py): a Hugging Face cache
    snapshot gives "org/name" and its commit; a folder below `models_dir` its path there, any other folder its path,
    and both "files:" and a hash of its files (names, sizes, and contents of all but the large weight files)."""
    path = Path(folder).resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/"), path.name
    staged = Path(models_dir).resolve() if models_dir else None
    name = str(path.relative_to(staged)) if staged and path.is_relative_to(staged) else str(path)
    return name, "files:" + sha256_of(folder_manifest(path))[:16]


def caption_cache_file(cache_dir: Path, content_hash: str, identity: tuple[str, str], cfg: CurateConfig) -> Path:
    """Where the caption of one image by one captioner (id, revision), prompt and length is kept."""
    key = sha256_of(content_hash, *identity, cfg.caption_prompt, cfg.caption_max_tokens, GREEDY)
    return cache_dir / f"{key[:32]}.json"


def caption_images(images: dict[str, bytes], cfg: CurateConfig, identity: tuple[str, str], cache_dir: Path
                   ) -> tuple[dict[str, str], CaptionStats]:
    """Captions of curated images (content hash -> PNG) by `cfg.captioner` (a local folder): each from the cache
    when this captioner, prompt and length captioned the image before, else by a Ray Data pass over the rest on
    actors that each load the model once (`captioner_gpus` each; on CPU one actor), `caption_batch_size` images per
    generate call, each caption cached as it arrives. Returns content hash -> caption, and what was done."""
    import ray

    captions, stats = {}, CaptionStats()
    for content_hash in images:
        cached = read_json(caption_cache_file(cache_dir, content_hash, identity, cfg))
        if cached is not None and isinstance(cached.get("caption"), str):
            captions[content_hash] = cached["caption"]
    stats.cached = len(captions)
    todo = [{"content_hash": h, "image": png} for h, png in images.items() if h not in captions]
    if not todo:
        return captions, stats
    progress.report("caption", {row["content_hash"]: (0, 1) for row in todo})
    gpus, batches = cfg.captioner_gpus, -(-len(todo) // cfg.caption_batch_size)
    actors = max(1, min(batches, int(ray.cluster_resources().get("GPU", 0) // gpus))) if gpus else 1
    captioned = ray.data.from_items(todo).map_batches(
        CaptionBatch, fn_constructor_kwargs={"folder": cfg.captioner, "prompt": cfg.caption_prompt,
                                             "max_tokens": cfg.caption_max_tokens},
        batch_size=cfg.caption_batch_size, num_gpus=gpus or None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
    seen_batches: dict[int, int] = {}
    for row in captioned.iter_rows():
        content_hash, text = row["content_hash"], row["caption"]
        write_json_atomic(caption_cache_file(cache_dir, content_hash, identity, cfg),
                          {"caption": text, "captioner": identity[0], "revision": identity[1],
                           "prompt": cfg.caption_prompt, "max_tokens": cfg.caption_max_tokens,
                           "content_hash": content_hash})
        captions[content_hash] = text
        seen_batches[row["batch_size"]] = seen_batches.get(row["batch_size"], 0) + 1
    stats.captioned = len(todo)
    stats.batches = sorted((size for size, rows in seen_batches.items() for _ in range(rows // size)), reverse=True)
    return captions, stats


def style_words(style: StyleConfig, extra: list[str]) -> list[str]:
    """The words a captioner's caption should not say: the descriptor's words less FUNCTION_WORDS, and `extra`
    (each a word or a phrase)."""
    words = [w for w in re.findall(r"[\w'-]+", style.descriptor.lower()) if w not in FUNCTION_WORDS]
    return list(dict.fromkeys([*words, *(" ".join(phrase.lower().split()) for phrase in extra)]))


def strip_style_words(text: str, words: list[str]) -> tuple[str, list[str]]:
    """`text` without `words` (whole words, any case; a phrase also across hyphens or spaces), tidied: an article
    left before "of" goes with it, an article or preposition left before a comma or the end goes, and commas and
    spaces are collapsed. Returns the text and the words it removed, in order of first appearance."""
    if not words:
        return text, []
    phrases = sorted(words, key=len, reverse=True)  # "pixel art" before "pixel"
    pattern = re.compile(r"(?<![\w'-])(?:" + "|".join(r"[\s-]+".join(map(re.escape, p.split())) for p in phrases)
                         + r")(?![\w'-])", re.IGNORECASE)
    removed = list(dict.fromkeys(match.group(0).lower() for match in pattern.finditer(text)))
    if not removed:
        return text, []
    text = pattern.sub(" ", text)
    while True:
        tidied = text
        for rule, replacement in TIDY:
            tidied = rule.sub(replacement, tidied)
        if tidied == text:
            return text, removed
        text = tidied


def caption_for(image_path: Path, captioned: str | None, style: StyleConfig, class_word: str,
                words: list[str]) -> tuple[str, str, str]:
    """The caption, where it came from ('sidecar', 'captioner' or 'template') and a note for the curation report:
    a sidecar wins, then the captioner's caption (`captioned`) with `words` removed, then the style's template."""
    text = read_sidecar(image_path)
    if text:
        return text, "sidecar", ""
    note = ""
    if captioned:
        text, removed = strip_style_words(captioned, words)
        note = f"style words removed from the captioner's caption: {', '.join(removed)}" if removed else ""
        if text:
            return text, "captioner", note
        note = f"the captioner's caption {captioned!r} was all style words: the template is used"
    return style.caption_template.format(class_word=class_word), "template", note
