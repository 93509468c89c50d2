"""Captioning: a real (tiny, random) transformers captioner loaded and run in batches, the Ray Data stage with its
cache, and the removal of style words from the captions it writes."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from style_factory import caption
from style_factory.config import CurateConfig, RunConfig, StyleConfig, load_styles
from style_factory.curate import curate_styles
from style_factory.run import REGISTRY, Run
from tests.helpers import make_style, noise_image

WORDS = "a an the of on in red blue green circle square star picture painting boat tree house sky".split()


def tiny_blip(folder: Path) -> Path:
    """A BLIP captioner at toy size (hidden 32, one layer, 32 px images, a 24-word vocabulary), random weights, saved
    with its processor and tokenizer as a hub download would be. Its weights are drawn wide enough that captions
    differ between images, and it never writes a special token (its end token either), so that every caption is
    `curate.caption_max_tokens` words."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, GenerationConfig)

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS])}
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
             "initializer_range": 0.5}
    config = BlipConfig(vision_config={**tower, "image_size": 32, "patch_size": 8},
                        text_config={**tower, "vocab_size": len(vocab), "max_position_embeddings": 64,
                                     "bos_token_id": vocab["[DEC]"], "pad_token_id": 0, "sep_token_id": 3,
                                     "eos_token_id": 3},
                        projection_dim=32, image_text_hidden_size=32, initializer_range=0.5)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[:6] = -1e4
    model.generation_config = GenerationConfig(bos_token_id=vocab["[DEC]"], eos_token_id=3, pad_token_id=0)
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                  BertTokenizer(vocab=vocab, bos_token="[DEC]")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return tiny_blip(tmp_path_factory.mktemp("captioner") / "tiny-blip")


def style(descriptor: str) -> StyleConfig:
    return StyleConfig(display_name="S", descriptor=descriptor, concepts=[{"token": "qxp", "class_word": "style"}])


# ---- style words ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, cleaned, removed", [
    ("a watercolor painting of a boat", "a boat", ["watercolor painting"]),
    ("A Watercolor boat, WATERCOLOR style, at dusk", "A boat, at dusk", ["watercolor", "style"]),
    ("a boat in watercolor", "a boat", ["watercolor"]),
    ("pixel art, a tree, pixel-art", "a tree", ["pixel art", "pixel-art"]),
    ("an artist paints a tree", "an artist paints a tree", []),  # whole words only: "art" is not in "artist"
    ("a boat on the sea", "a boat on the sea", []),
    ("watercolor painting", "", ["watercolor painting"]),
])
def test_style_words_are_removed_as_whole_words_in_any_case_and_the_caption_tidied(text, cleaned, removed):
    words = ["watercolor", "painting", "pixel art", "style", "watercolor painting"]
    assert caption.strip_style_words(text, words) == (cleaned, removed)


def test_style_words_are_the_descriptors_less_function_words_and_the_configured_ones():
    words = caption.style_words(style("pixel art with chunky square pixels and a limited palette"),
                                ["8-bit", "Retro  Game"])
    assert words == ["pixel", "art", "chunky", "square", "pixels", "limited", "palette", "8-bit", "retro game"]
    assert caption.strip_style_words("a retro game sprite, 8-bit", words) == ("a sprite", ["retro game", "8-bit"])


def test_style_words_can_be_kept():
    assert CurateConfig().strip_style_words and not CurateConfig(strip_style_words=False).strip_style_words


# ---- the captioner -------------------------------------------------------------------------------------------


def test_a_real_captioner_loads_from_its_folder_and_captions_a_batch_as_each_image_alone(blip: Path):
    images = [noise_image(seed, (48, 40)) for seed in range(4)]
    captioner = caption.Captioner(str(blip), None, 6)
    batched = captioner(images)
    assert len(batched) == 4 and all(batched) and len(set(batched)) > 1
    assert set(" ".join(batched).split()) <= set(WORDS)  # decoded words, no special tokens
    assert [captioner([image])[0] for image in images] == batched
    prompted = caption.Captioner(str(blip), "a painting of", 6)(images[:2])  # BLIP continues the prompt
    assert all(text.startswith("a painting of ") for text in prompted)


def test_captioner_identity_names_the_model_and_its_revision(tmp_path: Path, blip: Path):
    snapshot = tmp_path / "hub" / "models--Salesforce--blip-image-captioning-base" / "snapshots" / "82a37760"
    shutil.copytree(blip, snapshot)
    assert caption.captioner_identity(str(snapshot), None) == ("Salesforce/blip-image-captioning-base", "82a37760")
    staged = tmp_path / "models" / "org" / "tiny-blip"
    shutil.copytree(blip, staged)
    name, revision = caption.captioner_identity(str(staged), str(tmp_path / "models"))
    assert name == "org/tiny-blip" and revision.startswith("files:")
    assert caption.captioner_identity(str(blip), None) == (str(blip.resolve()), revision)  # same files
    (staged / "generation_config.json").write_text('{"max_new_tokens": 5}')
    assert caption.captioner_identity(str(staged), str(tmp_path / "models"))[1] != revision


# ---- the Ray Data stage --------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_the_captioning_stage_batches_caches_and_never_captions_an_image_twice(tmp_path: Path, blip: Path,
                                                                              ray_session, monkeypatch):
    styles_dir = tmp_path / "styles"
    first = make_style(styles_dir, "first", "qxp", n_ref=5, n_aux=1, seed=3, descriptor="blue painting")
    for sidecar in sorted((first / "ref").glob("*.txt"))[:4]:
        sidecar.unlink()  # four StyleRef images need a caption; the fifth and the Aux image keep their sidecar
    config = RunConfig(styles_dir=str(styles_dir), results_dir=str(tmp_path / "results"), name="t",
                       curate={"captioner": str(blip), "caption_batch_size": 3, "caption_max_tokens": 6,
                               "style_words": ["the"]})  # one of the few words the tiny model writes
    stats = []
    real_caption_images = caption.caption_images

    def counted(*args, **kwargs):
        captions, done = real_caption_images(*args, **kwargs)
        stats.append(done)
        return captions, done

    monkeypatch.setattr(caption, "caption_images", counted)
    run = Run(config=config, styles=load_styles(config, REGISTRY))
    curate_styles(run)
    shutil.copytree(first, styles_dir / "second")  # the same images in a second style
    second = Run(config=config, styles=load_styles(config, REGISTRY, ["second"]))
    curate_styles(second)

    assert run.outcomes["first"] == {"curate": "ok"} and second.outcomes["second"] == {"curate": "ok"}
    assert (stats[0].captioned, stats[0].cached, stats[0].batches) == (4, 0, [3, 1])  # one generate per batch
    assert (stats[1].captioned, stats[1].cached, stats[1].batches) == (0, 4, [])  # the model was never called
    assert len(list((tmp_path / "results" / "captions").glob("*.json"))) == 4
    tables = [pq.read_table(r.curated(name)).to_pandas().set_index("source_path")
              for r, name in ((run, "first"), (second, "second"))]
    for table in tables:
        by_model = table[table.caption_source == "captioner"]
        assert len(by_model) == 4 and (table.caption_source == "sidecar").sum() == 2
        assert set(by_model.captioner) == {str(blip.resolve())}
        assert by_model.captioner_revision.str.startswith("files:").all()
        assert (table.captioner[table.caption_source == "sidecar"] == "").all()
    assert tables[0].caption.equals(tables[1].caption)
    # each caption is the model's on the curated image, without the descriptor's words and style_words
    by_model = tables[0][tables[0].caption_source == "captioner"]
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in by_model.image]
    raw = caption.Captioner(str(blip), None, 6)(images)
    stripped = [caption.strip_style_words(text, ["blue", "painting", "the"]) for text in raw]
    assert list(by_model.caption) == [text for text, _ in stripped]
    assert not by_model.caption.str.contains(r"\b(?:blue|painting|the)\b").any()
    notes = pd.read_csv(run.dir / "curated" / "first.report.csv", keep_default_na=False).set_index("file").note
    for name, (_, removed) in zip(by_model.index, stripped):  # the report says which words went
        assert notes[name] == (f"style words removed from the captioner's caption: {', '.join(removed)}"
                               if removed else "")
    assert any(removed for _, removed in stripped)
