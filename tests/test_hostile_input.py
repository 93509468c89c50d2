"""Hostile and awkward input: YAML bombs and huge configs, captions longer than the text encoder, metric weights
planted in /tmp, and near duplicates of photographs. Real code on tiny data, no Ray."""
from __future__ import annotations

import io
import itertools
import stat
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from style_factory import backbones, caption
from style_factory.config import ConfigError, CurateConfig, TrainConfig, load_run_config, load_style
from style_factory.curate import CurationError, curate_style, differing_fraction, list_candidates
from style_factory.decode import DecodeBatch, decode_image, thumbnail
from style_factory.data import StyleData
from style_factory.families import get_family
from style_factory.families.base import clip_tokenizer
from style_factory.methods import get_method
from style_factory.models import ASSETS_DIR, TINY_PRETRAINED_DIR_NAME
from style_factory.run import REGISTRY
from tests.helpers import make_style, noise_image

RES = 64

# ---- YAML --------------------------------------------------------------------------------------------------------


def alias_bomb() -> str:
    """"Billion laughs": nine levels of nine aliases, 9**9 strings once expanded, in a few hundred bytes."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\ndisplay_name: *l8\ndescriptor: x\nconcepts: [{token: abc, class_word: style}]\n"


def refused(load) -> tuple[str, float, float]:
    """The ConfigError `load` raises, and the seconds and the peak MiB of memory (tracemalloc) it took to get it."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as err:
            load()
        return str(err.value), time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


LOADERS = {"style.yaml": lambda path: load_style(path.parent, REGISTRY),
           "run.yaml": lambda path: load_run_config(path, REGISTRY)}


@pytest.mark.parametrize("where", LOADERS)
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, where):
    path = (make_style(tmp_path, "bomb", "abc") if where == "style.yaml" else tmp_path) / where
    path.write_text(alias_bomb())
    message, seconds, peak_mb = refused(lambda: LOADERS[where](path))
    assert message.startswith(f"{path}: refused: more than 10000 values once its aliases are expanded")
    assert seconds < 1 and peak_mb < 100, (seconds, peak_mb)


@pytest.mark.parametrize("text, expected", [
    ("a: &a [1, *a]\n", "an alias inside the node it names"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
    ("a: [" + ", ".join(["1"] * 20_000) + "]\n", "more than 10000 values"),
], ids=["recursive", "deep", "wide"])
def test_other_unbounded_yaml_is_refused(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_run_config(path, REGISTRY)
    assert str(err.value).startswith(f"{path}: refused: ")


def test_config_file_over_the_size_cap_is_refused_before_parsing(tmp_path):
    path = make_style(tmp_path, "huge", "abc") / "style.yaml"
    path.write_text(path.read_text() + "# padding\n" * (2 * 2**20 // 10))  # 2 MiB of valid YAML
    message, seconds, _ = refused(lambda: load_style(path.parent, REGISTRY))
    assert message == (f"{path}: refused: larger than 1048576 bytes (MAX_YAML_BYTES, 1 MiB), far more than a config "
                       "needs")
    assert seconds < 1


def test_error_messages_quote_only_an_excerpt_of_a_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"name: {'x' * 100_000}\nmethods: [{'y' * 100_000}]\ntrain:\n  ? {'z' * 100_000}\n  : 1\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, REGISTRY)
    lines = str(err.value).splitlines()
    assert [line.split(": ")[1][:7] for line in lines] == ["name", "methods", "train.z"]
    assert all(len(line) < len(str(path)) + 400 for line in lines), lines
    assert "(got 'xxxxxxxx" in lines[0] and lines[0].endswith("...)")


# ---- captions longer than the text encoder -------------------------------------------------------------------------


def long_caption(seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["a", "small", "large", "red", "green", "blue", "circle", "square", "house", "below", "above", "beside",
             "meadow", "under", "sky", "with", "soft", "light"]
    return " ".join(rng.choice(words, 200))  # over 200 CLIP tokens


def curate_in_process(style_dir: Path, out_dir: Path) -> pd.DataFrame:
    """curate_style on what DecodeBatch (the Ray Data map function, called directly) makes of the style's files."""
    style, cfg = load_style(style_dir, REGISTRY), CurateConfig()
    candidates = list_candidates(style)
    batch = DecodeBatch(cfg.model_dump(), RES)({"path": np.array([str(c.path.resolve()) for c in candidates])})
    decoded = {row["path"]: row for row in (dict(zip(batch, values)) for values in zip(*batch.values()))}
    return curate_style(style, candidates, decoded, cfg, RES, out_dir)


def tokens(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, verbose=False).input_ids  # not truncated: what the encoder would be handed, in full


def test_long_captions_are_shortened_so_every_method_keeps_its_style_words(tmp_path, capsys):
    style_dir = make_style(tmp_path / "styles", "long", "qxp", n_ref=4, n_aux=2,
                           descriptor="a watercolor painting with pale washes and paper texture")
    originals = {}
    for i in range(4):
        originals[f"ref/ref_{i:02d}.png"] = long_caption(i)
        (style_dir / "ref" / f"ref_{i:02d}.txt").write_text(originals[f"ref/ref_{i:02d}.png"])
    report = curate_in_process(style_dir, tmp_path / "curated").set_index("file")

    printed = capsys.readouterr().out
    for name, original in originals.items():
        before = caption.count_tokens(original)
        assert before >= 200
        assert report.note[name].startswith(f"caption shortened from {before} to ")
        assert f"WARNING long: {name}: {report.note[name]}" in printed
    assert report.note["aux/aux_00.png"] == ""  # short captions are left alone

    style = load_style(style_dir, REGISTRY).config
    data = StyleData.load(tmp_path / "curated" / "long.parquet")
    for short in data.captions[:4]:
        assert any(original.startswith(short + " ") for original in originals.values())  # cut after a word
    clip = clip_tokenizer()
    cfg = TrainConfig(batch_size=4, prior_loss_weight=0, method_options={"textboost": {"augment_probability": 1.0}})
    rng = np.random.default_rng(0)
    prompts = {name: get_method(name, style).sample_batch(data, cfg, rng).prompts
               for name in ("styleboost", "dreambooth", "styledrop")}
    prompts["stylealigned"] = [get_method("stylealigned").eval_prompt(c, style) for c in data.captions[:4]]
    for name, batch in prompts.items():
        words = style.descriptor if name in ("styledrop", "stylealigned") else "qxp style"
        for prompt in batch:
            assert words in prompt and len(tokens(clip, prompt)) <= 77, (name, prompt)

    # TextBoost's prompt ends in its new tokens (one per descriptor token) and both augmentation tokens
    models = get_family("sd1").load_components(str(ASSETS_DIR / TINY_PRETRAINED_DIR_NAME))
    textboost = get_method("textboost", style)
    textboost.prepare(models, cfg)
    tokenizer = models.tokenizers["tokenizer"]
    placeholder_ids = set(tokenizer.convert_tokens_to_ids(textboost.placeholders["qxp"]))
    assert len(placeholder_ids) == caption.count_tokens(style.descriptor)
    for prompt in textboost.sample_batch(data, cfg, rng).prompts:
        ids = tokens(tokenizer, prompt)
        assert len(ids) <= 77 and placeholder_ids <= set(ids) and prompt.endswith("<hflip>, <grayscale>"), prompt


def test_content_prompts_too_long_for_a_styles_words_are_config_errors(tmp_path):
    style = load_style(make_style(tmp_path, "s", "qxp"), REGISTRY)
    caption.check_content_prompts(["a red circle on a blue background"], [style], "run.yaml")
    with pytest.raises(ConfigError, match=r"^run.yaml: evaluate.prompts.1: \d+ CLIP tokens; with style 's'"):
        caption.check_content_prompts(["a red circle", long_caption(0)], [style], "run.yaml")


def test_a_style_whose_words_alone_overflow_the_encoder_fails_curation(tmp_path):
    style_dir = make_style(tmp_path, "wordy", "qxp", descriptor=long_caption(1))
    with pytest.raises(CurationError, match=r"wordy/style.yaml: the style's words alone take \d+ CLIP tokens"):
        curate_in_process(style_dir, tmp_path / "curated")


# ---- metric weights are never read from /tmp ---------------------------------------------------------------------


class PlantedLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Planted(torch.nn.Module):
    """A TorchScript file with what clean-fid's InceptionV3W reads of one: anyone's code, run when loaded."""

    def __init__(self):
        super().__init__()
        self.layers = PlantedLayers()
        self.output = torch.nn.Linear(3, 1008)  # the output layer the Inception Score reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_weights_planted_in_the_temp_folder_are_never_loaded(tmp_path, monkeypatch):
    temp, models_dir, cache = tmp_path / "tmp", tmp_path / "models", tmp_path / "cache"
    for folder in (temp, models_dir, cache):
        folder.mkdir(mode=0o755)
    temp.chmod(0o1777)  # world-writable, as /tmp is
    torch.jit.save(torch.jit.script(Planted()), str(temp / backbones.INCEPTION_FILE_NAME))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # what tempfile.gettempdir() answers
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(backbones, "STYLE_FACTORY_CACHE_DIR", cache)
    probed = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda path: probed.append(path) or is_file(path))

    assert backbones.find_inception_file(None) is None
    assert probed and not any(p.parent.exists() and p.parent.stat().st_mode & stat.S_IWOTH for p in probed), probed
    with pytest.warns(UserWarning, match="NO REAL INCEPTION WEIGHTS"):
        assert not backbones.load_inception("auto").info.real
    (temp / backbones.INCEPTION_FILE_NAME).rename(models_dir / backbones.INCEPTION_FILE_NAME)
    assert backbones.load_inception("auto", models_dir=str(models_dir)).info.real  # the same file, where it belongs


# ---- near duplicates of photographs, noise and flat artwork ------------------------------------------------------


def photographic(seed: int) -> Image.Image:
    """Colour 1/f noise, the spectrum of natural photographs: structure and texture at every scale."""
    rng = np.random.default_rng(seed)
    height, width = 96, 128
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(width), np.fft.fftfreq(height)))
    frequency[0, 0] = np.inf  # no constant term: the mean is set below
    spectrum = rng.normal(size=(3, height, width)) + 1j * rng.normal(size=(3, height, width))
    field = np.real(np.fft.ifft2(spectrum / frequency))
    pixels = 128 + 45 * field / field.std(axis=(1, 2), keepdims=True)
    return Image.fromarray(np.clip(pixels.transpose(1, 2, 0), 0, 255).astype(np.uint8))


def noisy(seed: int) -> Image.Image:
    """Strong per-pixel noise over blocky structure."""
    structure = np.asarray(noise_image(seed, (96, 96)), dtype=np.float64) * 0.5 + 64
    noise = np.random.default_rng(seed).normal(0, 80, structure.shape)
    return Image.fromarray(np.clip(structure + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def cropped(image: Image.Image, left: float = 0, top: float = 0, right: float = 0) -> Image.Image:
    width, height = image.size
    return image.crop((round(left * width), round(top * height), width - round(right * width), height))


def resized(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)


COPIES = {
    "jpeg-70": lambda image: encoded(image, "JPEG", quality=70),
    "jpeg-95": lambda image: encoded(image, "JPEG", quality=95),
    "90%": lambda image: encoded(resized(image, 0.9)),
    "110%-jpeg-85": lambda image: encoded(resized(image, 1.1), "JPEG", quality=85),
    "5%-off-left": lambda image: encoded(cropped(image, left=0.05)),
    "3%-off-left-and-top-jpeg-80": lambda image: encoded(cropped(image, left=0.03, top=0.03), "JPEG", quality=80),
    "4%-off-right": lambda image: encoded(cropped(image, right=0.04)),
}
KINDS = {"photographic": photographic, "noisy": noisy, "flat": noise_image}


def thumb(data: bytes) -> np.ndarray:
    image, reason, _ = decode_image(data, CurateConfig(), RES)
    assert not reason
    return thumbnail(image)


@pytest.mark.parametrize("kind", KINDS)
def test_near_duplicates_of_every_kind_are_caught_and_distinct_images_kept_apart(kind):
    threshold = CurateConfig().near_duplicate_fraction
    originals = [KINDS[kind](seed) for seed in range(12)]
    thumbs = np.stack([thumb(encoded(image)) for image in originals])
    for (name, copy), (i, original) in itertools.product(COPIES.items(), enumerate(originals)):
        copy_thumb = thumb(copy(original))
        found = differing_fraction(copy_thumb, thumbs[i:i + 1])[0], differing_fraction(thumbs[i], copy_thumb[None])[0]
        assert max(found) <= threshold, (kind, name, i, found)  # whichever of the two came first
    for i, j in itertools.combinations(range(len(thumbs)), 2):
        assert differing_fraction(thumbs[i], thumbs[j][None])[0] > threshold, (kind, i, j)


def test_report_names_the_original_of_a_cropped_copy(tmp_path):
    style_dir = make_style(tmp_path, "copies", "qxp", n_ref=4, n_aux=1)
    source = Image.open(style_dir / "ref" / "ref_01.png")
    (style_dir / "ref" / "ref_01_copy.jpg").write_bytes(encoded(cropped(source, left=0.05), "JPEG", quality=85))
    report = curate_in_process(style_dir, tmp_path / "curated").set_index("file")
    assert report.reason["ref/ref_01_copy.jpg"].startswith("near duplicate of ref/ref_01.png (")
    assert (report.status == "kept").sum() == 5


def test_undecodable_files_are_reported_in_words_without_python_reprs(tmp_path):
    """Pillow's own message names the in-memory buffer ("<_io.BytesIO object at 0x7f...>"); the report says what
    is wrong with the file instead."""
    style_dir = make_style(tmp_path / "styles", "hostile", "qxp", n_ref=4, n_aux=1)
    (style_dir / "ref" / "notes.png").write_text("a caption, not an image\n")
    (style_dir / "ref" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (style_dir / "ref" / "cut.png").write_bytes((style_dir / "ref" / "ref_00.png").read_bytes()[:300])
    report = curate_in_process(style_dir, tmp_path / "out").set_index("file")
    assert not report.reason.str.contains("object at 0x").any(), report.reason.tolist()
    for name in ("ref/notes.png", "ref/noise.jpg"):
        assert report.reason[name].startswith("cannot decode image: not an image PIL can read (tried PNG, JPEG")
    assert report.reason["ref/cut.png"].startswith("cannot decode image: damaged or cut short (")
