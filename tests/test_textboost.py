"""TextBoost on the tiny preset, trained in-process with the shared loop's own step (no Ray)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from style_factory.config import Concept, StyleConfig, TrainConfig
from style_factory.data import CURATED_SCHEMA, StyleData, pixel_tensor
from style_factory.export import export_model, load_method
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE
from style_factory.loop import encode_latent_cache, grayscale, optimisation_step, save_checkpoint
from style_factory.methods import get_method
from style_factory.methods.textboost import timestep_distribution
from style_factory.train_job import TrainJob
from tests.helpers import load_sd1, noise_image

STYLE = StyleConfig(display_name="Watercolor", descriptor="watercolor painting style",
                    concepts=[Concept(token="zwx", class_word="style")])


def write_curated(folder: Path, captions: list[str], token: str = "zwx") -> str:
    """A curated Parquet (curate.py's schema) of StyleRef noise images, one per caption."""
    rows = []
    for i, caption in enumerate(captions):
        buffer = io.BytesIO()
        noise_image(i, (64, 64)).save(buffer, format="PNG")
        rows.append({"style": "water", "role": "ref", "concept": 0, "token": token, "class_word": "style",
                     "caption": caption, "caption_source": "sidecar", "image": buffer.getvalue(), "width": 64,
                     "height": 64, "original_width": 64, "original_height": 64, "crop_left": 0, "crop_top": 0,
                     "content_hash": str(i), "source_path": f"ref/{i}.png"})
    path = folder / "curated.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), path)
    return str(path)


def make_job(tmp_path: Path, base_model: str, method: str, style: StyleConfig, train: dict,
             captions: list[str]) -> TrainJob:
    return TrainJob(style="water", method=method, family="sd1", key=f"{method}-test", base_model=base_model,
                    curated_path=write_curated(tmp_path, captions), model_dir=str(tmp_path / "models" / method),
                    log_path=str(tmp_path / "logs" / method / "train_log.jsonl"), storage_path=str(tmp_path / "ray"),
                    style_config=style.model_dump(), train=TrainConfig(**train).model_dump())


def train_in_process(job: TrainJob, steps: int, export: bool = False) -> tuple[Components, list[float]]:
    """What a Ray Train worker does for `job` (prepare, cache, the shared step), then optionally its export."""
    cfg = TrainConfig.model_validate(job.train)
    method, data, models = load_method(job), job.load_data(), load_sd1(job.base_model)
    optimizer = torch.optim.AdamW(method.prepare(models, cfg), weight_decay=cfg.weight_decay)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    losses = [optimisation_step(models, method, data, cache, optimizer, cfg, step, 0, torch.device("cpu"))
              for step in range(steps)]
    if export:
        folder = Path(job.storage_path) / job.trainer_name
        folder.mkdir(parents=True)
        save_checkpoint(folder, job.key, models, method.trained_modules(models, cfg), optimizer, steps, losses)
        export_model(job, folder)
    return models, losses


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def component(models: Components, name: str) -> torch.nn.Module:
    """A part of `models` by component name, the VAE included."""
    return models.vae if name == "vae" else models.module(name)


def initial_rows(job: TrainJob, vocab: int) -> torch.Tensor:
    models = load_sd1(job.base_model)
    load_method(job).prepare(models, TrainConfig.model_validate(job.train))
    return models.text_encoders["text_encoder"].get_input_embeddings().weight[vocab:].detach()


# One StyleRef image is enough for TextBoost; lrs large enough that every trained tensor visibly moves.
TRAIN = {"batch_size": 2, "learning_rate": 1e-2, "max_steps": 3,
         "method_options": {"textboost": {"embedding_learning_rate": 1.0, "augment_probability": 0.5}}}


@pytest.fixture
def job(tmp_path, tiny_model) -> TrainJob:
    return make_job(tmp_path, tiny_model, "textboost", STYLE, TRAIN, ["a house by a lake"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model) -> tuple[TrainJob, Components]:
    job = make_job(tmp_path_factory.mktemp("textboost"), tiny_model, "textboost", STYLE, TRAIN, ["a house by a lake"])
    models, _ = train_in_process(job, steps=3, export=True)
    return job, models


@pytest.mark.slow
def test_only_the_lora_and_the_new_token_rows_change(job):
    base = load_sd1(job.base_model)
    before = {name: snapshot(component(base, name)) for name in ("text_encoder", "unet", "vae")}
    vocab = len(base.tokenizers["tokenizer"])
    models, losses = train_in_process(job, steps=3)
    assert all(np.isfinite(losses))
    for name in ("unet", "vae"):
        after = component(models, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    after = models.text_encoders["text_encoder"].state_dict()
    for key, value in before["text_encoder"].items():
        if key == "embeddings.token_embedding.weight":
            assert torch.equal(after[key][:vocab], value)  # the original vocabulary, bitwise
            new_rows = after[key][vocab:]
            assert len(new_rows) == 3 + 2  # "watercolor painting style" -> 3 vectors, <hflip>, <grayscale>
            assert not torch.equal(new_rows, initial_rows(job, vocab))
        else:  # peft keeps each adapted layer's own weights under `base_layer`
            lora_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(after[key] if key in after else after[lora_key], value), key
    trainable = [n for n, p in models.text_encoders["text_encoder"].named_parameters() if p.requires_grad]
    assert all("lora_" in n or n == "embeddings.token_embedding.weight" for n in trainable)
    assert sum("lora_" in n for n in trainable) == 2 * 3 * 3  # A and B on q, k, v of all three layers
    lora_b = [p for n, p in models.text_encoders["text_encoder"].named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # zero at init, trained now


def test_new_rows_are_clipped_to_the_mean_vocabulary_norm(job):
    base = load_sd1(job.base_model)
    mean_norm = base.text_encoders["text_encoder"].get_input_embeddings().weight.norm(dim=1).mean()
    models, _ = train_in_process(job, steps=3)  # embedding lr 1.0: the rows outgrow the bound without the clip
    embeddings = models.text_encoders["text_encoder"].get_input_embeddings().weight
    new_rows = embeddings[len(base.tokenizers["tokenizer"]):]
    norms = new_rows.norm(dim=1)
    assert (norms <= mean_norm * (1 + 1e-5)).all()
    assert torch.isclose(norms.max(), mean_norm, rtol=1e-5)  # the clip did act


def test_knowledge_preservation_is_zero_at_init_and_positive_after_an_update(job):
    cfg = TrainConfig.model_validate(job.train)
    method, data, models = load_method(job), job.load_data(), load_sd1(job.base_model)
    optimizer = torch.optim.AdamW(method.prepare(models, cfg))
    batch = method.sample_batch(data, cfg, np.random.default_rng(0))
    assert batch.preservation_prompts and len(batch.preservation_prompts) == cfg.batch_size
    assert method.extra_losses(models, batch)["knowledge_preservation"].item() == 0.0  # LoRA B starts at zero
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    optimisation_step(models, method, data, cache, optimizer, cfg, 0, 0, torch.device("cpu"))
    assert method.extra_losses(models, batch)["knowledge_preservation"].item() > 0


def test_timesteps_follow_the_log_snr_distribution(tiny_model):
    models = load_sd1(tiny_model)
    method = get_method("textboost", STYLE)
    p = timestep_distribution(models.noise_scheduler)
    alphas = models.noise_scheduler.alphas_cumprod.double()
    log_snr = (alphas / (1 - alphas)).log()
    torch.testing.assert_close(p, (log_snr[0] - log_snr) / (log_snr[0] - log_snr).sum())
    assert p[0] == 0 and (p.diff() > 0).all()  # never t=0, more mass the noisier
    draws = method.sample_timesteps(1_000_000, models, torch.Generator().manual_seed(0))
    empirical = torch.bincount(draws, minlength=len(p)).double() / len(draws)
    assert 0.5 * (empirical - p).abs().sum() < 0.02  # total variation (expected ~0.012 at 1M draws)


def test_augmentation_tokens_appear_exactly_when_their_view_is_used(job):
    cfg = TrainConfig.model_validate(job.train)
    method, models = load_method(job), load_sd1(job.base_model)
    method.prepare(models, cfg)
    data = StyleData(images=[np.zeros((64, 64, 3), np.uint8)] * 3, roles=np.array(["ref"] * 3), concepts=np.zeros(3, int),
                     captions=["a", "b", "c"], tokens=["zwx"] * 3, class_words=["style"] * 3)
    views = method.image_views(cfg)
    seen = set()
    for step in range(200):
        batch = method.sample_batch(data, cfg, np.random.default_rng(step))
        for prompt, view in zip(batch.prompts, batch.views):
            ops = views[view]
            assert ("<hflip>" in prompt) == ("hflip" in ops) and ("<grayscale>" in prompt) == ("grayscale" in ops)
            assert "<zwx> <zwx>_1 <zwx>_2" in prompt
            seen.add(ops)
    assert seen == set(views)  # every combination occurs at p = 0.5


def test_the_cache_holds_the_augmented_images(job):
    models = load_sd1(job.base_model)
    images = job.load_data().images
    pixels = pixel_tensor(images)
    views = [(), ("hflip",), ("grayscale",), ("hflip", "grayscale")]
    cache = torch.stack(encode_latent_cache(models.vae, images, views), dim=1)
    for index, view in enumerate([pixels, pixels.flip(-1), grayscale(pixels), grayscale(pixels.flip(-1))]):
        with torch.no_grad():
            fresh = models.vae.encode(view).latent_dist.mean
        torch.testing.assert_close(cache[index, :, 0], fresh, rtol=0, atol=1e-5)
    # grayscale() is PIL's "L" conversion, up to its rounding to 8 bits
    image = Image.fromarray(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    luma = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32)) / 127.5 - 1
    torch.testing.assert_close(grayscale(pixels)[0, 0], luma, rtol=0, atol=1.5 / 127.5)


def test_export_loads_in_diffusers_and_matches_the_trained_encoder(exported):
    job, models = exported
    model_dir = Path(job.model_dir)
    assert {p.name for p in model_dir.iterdir()} >= {DIFFUSERS_FILE, KOHYA_FILE, "embeddings", "model_card.json"}
    assert [p.name for p in (model_dir / "embeddings").iterdir()] == ["zwx.safetensors"]
    assert load_file(model_dir / "embeddings" / "zwx.safetensors")["<zwx>"].shape == (3, 64)

    method = load_method(job)
    prompt = method.eval_prompt("a house by a lake", STYLE)
    assert prompt == "a house by a lake, <zwx>"
    # load_textual_inversion + load_lora_weights
    pipe = method.load_for_sampling(get_family("sd1"), job.base_model, str(model_dir), "cpu")
    loaded, _ = pipe.encode_prompt(prompt, "cpu", 1, False)  # diffusers expands <zwx> to <zwx> <zwx>_1 <zwx>_2
    with torch.no_grad():
        trained = models.family.encode_prompts(models, ["a house by a lake, <zwx> <zwx>_1 <zwx>_2"],
                                               torch.device("cpu")).hidden_states
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    image = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_kohya_copy_has_a1111_names_and_the_trained_deltas(exported):
    job, models = exported
    kohya = load_file(Path(job.model_dir) / KOHYA_FILE)
    modules = [f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}_proj"
               for layer in range(3) for proj in ("q", "k", "v")]
    # style_factory.lora.zero_out_projections pads each adapted attention with an inert out_proj LoRA (diffusers and
    # A1111 tell the kohya text-encoder layout by it): present, and a zero delta
    padding = [f"lora_te_text_model_encoder_layers_{layer}_self_attn_out_proj" for layer in range(3)]
    assert set(kohya) == {f"{m}.{part}" for m in modules + padding
                          for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    for module in padding:
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        assert down.shape == (4, 64) and up.shape == (64, 4) and not (up @ down).any()
    for module in modules:
        down, up, alpha = (kohya[f"{module}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape == (4, 64) and up.shape == (64, 4) and alpha.item() == 4.0
        # the delta A1111 applies, alpha / rank * up @ down, is the one peft trained
        layer, proj = module.split("layers_")[1].split("_")[0], module.split("self_attn_")[1]
        peft_layer = models.text_encoders["text_encoder"].encoder.layers[int(layer)].self_attn.get_submodule(proj)
        expected = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(alpha / down.shape[0] * up @ down, expected)
