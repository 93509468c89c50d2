"""Every method on every family's tiny preset: what the SD 1.x tests check, per family, plus what only a family has
(SDXL's time ids from the recorded size and crop, detection from model_index.json), and a family registered inside
a test running the loop, export and sampling with no edit outside its own class."""
from __future__ import annotations

import copy
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file

from style_factory.config import Concept, CurateConfig, StyleConfig, TrainConfig, load_style
from style_factory.curate import curate_style, list_candidates
from style_factory.decode import DecodeBatch, decode_image
from style_factory.data import CURATED_SCHEMA, StyleData
from style_factory.export import export_model
from style_factory.families import FAMILIES, get_family
from style_factory.families.sd1 import SD1
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE, save_lora
from style_factory.loop import build_optimizer, encode_latent_cache, optimisation_step, save_checkpoint
from style_factory.methods import get_method
from style_factory.methods.textboost import cosine_distance
from style_factory.models import PRESETS, detect_family, resolve_base_model
from style_factory.run import REGISTRY
from style_factory.train_job import TrainJob
from tests.helpers import make_style, noise_image

FAMILY_PRESETS = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
STYLE = StyleConfig(display_name="Ink", descriptor="ink wash painting",
                    concepts=[Concept(token="qvz", class_word="style")])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("base-models")
    return {family: resolve_base_model(preset, cache) for family, preset in FAMILY_PRESETS.items()}


def style_data(n: int = 4) -> StyleData:
    """Two StyleRef and two Aux rows, from 96x64 sources centre-cropped (as curation records them)."""
    images = [noise_image(i, (96, 64)) for i in range(n)]
    rows = [decode_image(_png(image), CurateConfig(), 64) for image in images]
    geometry = [g for _, _, g in rows]
    return StyleData(images=[np.asarray(img) for img, _, _ in rows], roles=np.array(["ref", "ref", "aux", "aux"][:n]),
                     concepts=np.zeros(n, int), captions=["a ref picture"] * n, tokens=["qvz"] * n,
                     class_words=["style"] * n,
                     original_sizes=np.array([[g["original_height"], g["original_width"]] for g in geometry]),
                     crops_top_left=np.array([[g["crop_top"], g["crop_left"]] for g in geometry]))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    """The weights of `before` that moved (an adapter's base layer is compared under its original name)."""
    after = snapshot(module)
    assert set(before) <= set(after), "a weight disappeared"
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def train_steps(models, method_name: str, cfg: TrainConfig, steps: int = 2):
    method = get_method(method_name, STYLE)
    data = style_data()
    torch.manual_seed(cfg.seed)
    groups = method.prepare(models, cfg)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    optimizer = build_optimizer(groups, cfg, CPU)
    for step in range(steps):
        optimisation_step(models, method, data, cache, optimizer, cfg, step, 0, CPU)
    return method, optimizer


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_each_preset_folder_is_detected_as_its_family(presets, family):
    assert PRESETS[FAMILY_PRESETS[family]] == family
    assert detect_family(presets[family], presets[family]) == family  # from the folder's own configs
    with pytest.raises(ValueError, match="set model.family"):
        detect_family("no-such/model", "no-such/model")


@pytest.mark.parametrize("family", FAMILY_PRESETS)
@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_styleboost_trains_unet_and_every_text_encoder_and_leaves_the_vae_bitwise(presets, family,
                                                                                   train_text_encoder):
    models = get_family(family).load_components(presets[family])
    before = {name: snapshot(models.module(name)) for name in ("unet", *models.text_encoders)}
    vae = snapshot(models.vae)
    method, _ = train_steps(models, "styleboost", TrainConfig(batch_size=1, train_text_encoder=train_text_encoder))
    assert not changed(vae, models.vae)
    assert changed(before["unet"], models.unet)
    for name in models.text_encoders:
        assert bool(changed(before[name], models.module(name))) == train_text_encoder, name
    assert method.trained_modules(models, TrainConfig(train_text_encoder=train_text_encoder)) == \
        (["unet", *models.text_encoders] if train_text_encoder else ["unet"])


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_textboost_tunes_every_text_encoder_and_only_its_adapter_and_new_rows(presets, family):
    models = get_family(family).load_components(presets[family])
    unet, vae = snapshot(models.unet), snapshot(models.vae)
    vocab = {name: enc.get_input_embeddings().weight.detach().clone() for name, enc in models.text_encoders.items()}
    method, _ = train_steps(models, "textboost", TrainConfig(batch_size=2))
    assert not changed(unet, models.unet) and not changed(vae, models.vae)
    for (name, encoder), (_, new_ids, _) in zip(models.text_encoders.items(), method.new_rows):
        rows = encoder.get_input_embeddings().weight.detach()
        assert torch.equal(rows[: len(vocab[name])], vocab[name]), f"{name}: an old embedding row moved"
        assert len(rows) == len(vocab[name]) + len(new_ids)
        trainable = {k for k, p in encoder.named_parameters() if p.requires_grad}
        assert trainable and all("lora" in k or "embed" in k for k in trainable), name


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_textboost_knowledge_preservation_is_zero_before_training(presets, family):
    models = get_family(family).load_components(presets[family])
    method = get_method("textboost", STYLE)
    cfg = TrainConfig(batch_size=2)
    torch.manual_seed(0)
    method.prepare(models, cfg)
    batch = method.sample_batch(style_data(), cfg, np.random.default_rng(0))
    losses = method.extra_losses(models, batch)
    assert losses["knowledge_preservation"].item() == 0.0  # the LoRA starts at zero (B = 0)
    parts = models.family.encode_prompts(models, ["a dog"], CPU).parts
    assert len(parts) == len(models.text_encoders)  # both SDXL encoders take part in the loss
    assert cosine_distance(parts[0], parts[0]).max().item() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_styledrop_trains_only_its_unet_adapter(presets, family):
    models = get_family(family).load_components(presets[family])
    frozen = {name: snapshot(models.module(name)) for name in models.text_encoders}
    base_unet = snapshot(models.unet)
    train_steps(models, "styledrop", TrainConfig(batch_size=2, learning_rate=1e-3))
    for name, before in frozen.items():
        assert not changed(before, models.module(name)), name
    moved = changed(base_unet, models.unet)
    assert not moved, f"base UNet weights moved: {sorted(moved)[:3]}"  # the adapter is beside them, not in them
    trainable = [p for p in models.unet.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) < 0.1 * sum(p.numel() for p in models.unet.parameters())


def test_sdxl_time_ids_are_each_images_recorded_size_and_crop(presets):
    models = get_family("sdxl").load_components(presets["sdxl"])
    seen = []
    models.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    data = style_data()
    train_steps(models, "styledrop", TrainConfig(batch_size=2, random_flip=False), steps=1)
    # a 96x64 source, its short side resized to 64: the square crop starts (96 - 64) / 2 = 16 px from the left
    assert data.original_sizes.tolist()[0] == [64, 96] and data.crops_top_left.tolist()[0] == [0, 16]
    assert seen and seen[0].tolist() == [[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]] * 2


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_stylealigned_without_sharing_equals_the_plain_pipeline(presets, family, tmp_path):
    torch.set_num_threads(1)  # bitwise across batch sizes needs one thread (see test_stylealigned.py)
    fam = get_family(family)
    method = get_method("stylealigned", STYLE)
    cfg = TrainConfig(method_options={"stylealigned": {"inversion_steps": 4}})
    method.prepare_reference(style_data(), cfg, fam, presets[family], tmp_path, "cpu")
    prompts, steps = ["a red circle", "a house"], 4

    def draw(pipe):
        return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in range(2)], height=64, width=64,
                    num_inference_steps=steps, guidance_scale=5.0, output_type="np").images

    expected = draw(fam.load_pipeline(presets[family]))
    sampler = method.load_for_sampling(fam, presets[family], str(tmp_path), "cpu")
    shared = draw(sampler)
    sampler.pipe.unet.set_attn_processor(AttnProcessor2_0())  # sharing off: the reference only rides along
    np.testing.assert_array_equal(draw(sampler), expected)
    assert not np.array_equal(shared, expected)
    assert sum(name.endswith("attn1.processor") for name in sampler.pipe.unet.attn_processors) > 0


def test_stylealigned_generated_reference_needs_no_image_and_shares_one_reference(presets, tmp_path):
    fam = get_family("sdxl")
    method = get_method("stylealigned", STYLE)
    cfg = TrainConfig(method_options={"stylealigned": {"reference": "generated", "reference_seed": 3}})
    method.prepare_reference(style_data(), cfg, fam, presets["sdxl"], tmp_path, "cpu")
    meta = json.loads((tmp_path / "reference.json").read_text())
    assert meta["caption"] == "a ref picture, ink wash painting" and not (tmp_path / "trajectory.safetensors").exists()
    sampler = method.load_for_sampling(fam, presets["sdxl"], str(tmp_path), "cpu")
    one = sampler(["a red circle"], [torch.Generator().manual_seed(0)], 64, 64, 3, 5.0, output_type="np").images
    two = sampler(["a red circle", "a house"], [torch.Generator().manual_seed(s) for s in (0, 1)], 64, 64, 3, 5.0,
                  output_type="np").images
    assert len(one) == 1 and len(two) == 2
    np.testing.assert_allclose(one[0], two[0], atol=1e-4)  # the reference is the same in both sets


class ClipSkipSD1(SD1):
    """A family made inside a test: SD 1.x conditioned on the penultimate text layer ("clip skip 2")."""

    name = "sd1-clip-skip"

    def encode_text(self, tokenizer, text_encoder, prompts, device):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids, output_hidden_states=True).hidden_states[-2], None


@pytest.mark.slow
def test_a_family_registered_in_a_test_runs_the_loop_export_and_sampling(presets, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, ClipSkipSD1.name, ClipSkipSD1)  # the one registry line
    family = get_family(ClipSkipSD1.name)
    models = family.load_components(presets["sd1"])
    assert not torch.equal(models.family.encode_prompts(models, ["a cat"], CPU).hidden_states,
                           get_family("sd1").encode_prompts(models, ["a cat"], CPU).hidden_states)
    curated = tmp_path / "curated.parquet"
    _write_curated(curated)
    cfg = TrainConfig(max_steps=2, batch_size=1)
    job = TrainJob(style="ink", method="styledrop", family=ClipSkipSD1.name, key="k" * 64, base_model=presets["sd1"],
                   curated_path=str(curated), model_dir=str(tmp_path / "model"), log_path=str(tmp_path / "log.jsonl"),
                   storage_path=str(tmp_path), style_config=STYLE.model_dump(), train=cfg.model_dump())
    base = copy.deepcopy(models)
    method, optimizer = train_steps(models, "styledrop", cfg)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, job.key, models, ["unet"], optimizer, 2, [0.5, 0.4])
    card = export_model(job, checkpoint, base)
    assert card["family"] == ClipSkipSD1.name and (tmp_path / "model" / DIFFUSERS_FILE).is_file()
    pipe = method.load_for_sampling(family, presets["sd1"], str(tmp_path / "model"), "cpu")
    image = pipe(["a cat"], num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def _write_curated(path):
    rows = []
    for i in range(2):
        image = noise_image(i, (64, 64))
        rows.append({"style": "ink", "role": "ref", "concept": 0, "token": "qvz", "class_word": "style",
                     "caption": "a ref picture", "caption_source": "test", "image": _png(image), "width": 64,
                     "height": 64, "original_width": 64, "original_height": 64, "crop_left": 0, "crop_top": 0,
                     "content_hash": str(i), "source_path": f"ref/{i}.png"})
    pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), path)


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_lora_exports_carry_the_familys_kohya_prefixes(presets, family, tmp_path):
    models = get_family(family).load_components(presets[family])
    method = get_method("textboost", STYLE)
    method.prepare(models, TrainConfig())
    save_lora(tmp_path, models.family, **models.text_encoders)
    prefixes = {key.split("_text_model_")[0] for key in load_file(tmp_path / KOHYA_FILE)}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert all(re.match(r"lora_te\d?_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj\.(lora_down\.weight|"
                        r"lora_up\.weight|alpha)$", key) for key in load_file(tmp_path / KOHYA_FILE))


def test_curation_records_each_images_source_size_and_crop(tmp_path):
    style_dir = make_style(tmp_path, "wide", "qvz", n_ref=4, n_aux=4)
    noise_image(77, (120, 80)).save(style_dir / "ref" / "ref_00.png")  # 3:2, landscape
    noise_image(78, (60, 90)).save(style_dir / "ref" / "ref_01.png")  # 2:3, portrait
    style = load_style(style_dir, REGISTRY)
    candidates = list_candidates(style)
    paths = np.array([str(c.path.resolve()) for c in candidates])
    batch = DecodeBatch(CurateConfig().model_dump(), 64)({"path": paths})  # what Ray Data runs on each batch
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    curate_style(style, candidates, {row["path"]: row for row in rows}, CurateConfig(), 64, tmp_path / "curated")
    table = pq.read_table(tmp_path / "curated" / "wide.parquet").to_pandas().set_index("source_path")
    # short side resized to 64: 120x80 -> 96x64, crop from x = 16; 60x90 -> 64x96, crop from y = 16
    assert table.loc["ref/ref_00.png", ["original_width", "original_height", "crop_left", "crop_top"]].tolist() == \
        [120, 80, 16, 0]
    assert table.loc["ref/ref_01.png", ["original_width", "original_height", "crop_left", "crop_top"]].tolist() == \
        [60, 90, 0, 16]
    data = StyleData.load(tmp_path / "curated" / "wide.parquet")
    assert data.geometry(np.array([0])).original_sizes.tolist() == [[80, 120]]
