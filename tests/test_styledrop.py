"""StyleDrop on the tiny preset: both rounds in-process, the CLIP feedback between them, and the exported LoRA."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from style_factory.backbones import load_clip
from style_factory.config import Concept, StyleConfig, TrainConfig
from style_factory.data import CURATED_SCHEMA
from style_factory.export import load_method
from style_factory.families import get_family
from style_factory.lora import KOHYA_FILE, add_lora
from style_factory.methods import get_method
from style_factory.sampling import sample_name
from tests.helpers import load_sd1, load_sd1_pipeline
from tests.test_textboost import component, make_job, snapshot, train_in_process

STYLE = StyleConfig(display_name="Watercolor", descriptor="watercolor painting",
                    concepts=[Concept(token="zwx", class_word="style")])
CAPTIONS = ["a house by a lake", "a cat on a chair", "a ship at sea"]
K = 3
TRAIN = {"batch_size": 2, "learning_rate": 1e-2, "max_steps": 2,
         "method_options": {"styledrop": {"feedback_candidates": K, "feedback_inference_steps": 2, "clip": "toy"}}}


def lora_fraction(unet: torch.nn.Module) -> tuple[int, int]:
    adapter = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return adapter, sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)


def generate(pipe) -> np.ndarray:
    return pipe("a house by a lake in watercolor painting style", num_inference_steps=2, height=64, width=64,
                output_type="np", generator=torch.Generator().manual_seed(0)).images[0]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model):
    """Round 1 trained and exported, the feedback round's selection, round 2 trained and exported."""
    job = make_job(tmp_path_factory.mktemp("styledrop"), tiny_model, "styledrop", STYLE, TRAIN, CAPTIONS)
    rounds = load_method(job).rounds(job)
    first = next(rounds)
    train_in_process(first, steps=2, export=True)
    second = next(rounds)  # samples K candidates per prompt with round 1, keeps CLIP's top-1 of each
    models, _ = train_in_process(second, steps=2, export=True)
    assert next(rounds, None) is None
    return job, first, second, models


def test_the_adapter_is_a_small_fraction_of_the_unet(tiny_model):
    """Rank 4 after every transformer block's attention and MLP: 0.20% of SD1.5's UNet (the port's adapters: 2.06 M)."""
    models = load_sd1(tiny_model)
    method = get_method("styledrop", STYLE)
    method.prepare(models, TrainConfig())
    adapter, unet = lora_fraction(models.unet)
    assert adapter == 77_312 and adapter / unet < 0.03
    opts = method.options(TrainConfig())
    with torch.device("meta"):  # SD1.5's UNet shape, no weights
        sd15 = UNet2DConditionModel(cross_attention_dim=768)
    add_lora(sd15, opts.rank, opts.alpha, opts.target_modules)
    adapter, unet = lora_fraction(sd15)
    assert (adapter, unet) == (1_695_744, 859_520_964)


def test_only_the_adapter_weights_change(tmp_path, tiny_model):
    job = make_job(tmp_path, tiny_model, "styledrop", STYLE, TRAIN, CAPTIONS)
    base = load_sd1(tiny_model)
    before = {name: snapshot(component(base, name)) for name in ("text_encoder", "unet", "vae")}
    models, losses = train_in_process(job, steps=2)
    assert all(np.isfinite(losses))
    for name in ("text_encoder", "vae"):
        assert all(torch.equal(component(models, name).state_dict()[k], v) for k, v in before[name].items())
    unet = models.unet.state_dict()
    for key, value in before["unet"].items():
        lora_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(unet[key] if key in unet else unet[lora_key], value), key
    assert all(p.abs().sum() > 0 for n, p in models.unet.named_parameters() if "lora_B" in n)
    assert {n for n, p in models.unet.named_parameters() if p.requires_grad} == \
        {n for n in unet if "lora_" in n}


@pytest.mark.slow
def test_round_two_trains_on_the_clip_top1_of_each_prompt(two_rounds):
    job, first, second, _ = two_rounds
    assert first.model_dir == f"{job.model_dir}-round1" and first.key != job.key
    assert (second.key, second.model_dir) == (job.key, job.model_dir)  # round 2 is the evaluated model
    feedback = Path(first.model_dir) / "feedback"
    table = pq.read_table(second.curated_path)
    assert Path(second.curated_path) == feedback / "curated.parquet" and table.schema.equals(CURATED_SCHEMA)
    rows = table.to_pylist()
    assert [r["caption"] for r in rows] == CAPTIONS and {r["role"] for r in rows} == {"ref"}  # one per prompt
    clip = load_clip("toy")
    texts = clip.embed_texts([get_method("styledrop", STYLE).eval_prompt(c, STYLE) for c in CAPTIONS])  # whole prompts
    scores = json.loads((feedback / "scores.json").read_text())["prompts"]
    for index, row in enumerate(rows):
        paths = [feedback / "candidates" / sample_name(index, seed) for seed in range(K)]
        similarity = clip.embed_images([Image.open(p).convert("RGB") for p in paths]) @ texts[index]
        assert row["image"] == paths[int(np.argmax(similarity))].read_bytes()
        np.testing.assert_allclose(scores[index]["clip_scores"], similarity, rtol=1e-6)
    assert len({r["image"] for r in rows}) == len(rows)
    # round 2's training data is exactly those images
    data = second.load_data()
    selected = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    np.testing.assert_array_equal(np.stack(data.images), selected)
    # both rounds are recorded
    for done in (first, second):
        assert done.is_done() and Path(done.log_path).is_file()


@pytest.mark.slow
def test_exported_lora_loads_in_diffusers_and_changes_the_output(two_rounds):
    job, first, _, _ = two_rounds
    method = load_method(job)
    base = generate(load_sd1_pipeline(job.base_model))
    for model_dir in (first.model_dir, job.model_dir):
        tuned = generate(method.load_for_sampling(get_family("sd1"), job.base_model, model_dir,
                                                  "cpu"))  # pipe.load_lora_weights
        assert np.abs(tuned - base).max() > 1e-3
        kohya = load_file(Path(model_dir) / KOHYA_FILE)
        # 7 transformer blocks x ((attn1, attn2) x (q, k, v, out) + MLP in, out + proj_in, proj_out) x (down, up, alpha)
        assert len(kohya) == 7 * (2 * 4 + 2 + 2) * 3 and all(k.startswith("lora_unet_") for k in kohya)
        assert kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape \
            == (4, 64)
        pipe = load_sd1_pipeline(job.base_model)
        pipe.load_lora_weights(model_dir, weight_name=KOHYA_FILE)  # diffusers reads kohya names for the UNet
        np.testing.assert_allclose(generate(pipe), tuned, atol=1e-5)
