"""The shared loop's fast paths: cached latents and prompt embeddings change nothing but speed, and each
step-speed option of TrainConfig validates and trains on CPU."""
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from pydantic import ValidationError

from style_factory.config import ConfigError, TrainConfig, load_run_config
from style_factory.data import pixel_tensor
from style_factory.families.base import Conditioning
from style_factory.loop import (VIEW_OPS, apply_fast_paths, build_optimizer, denoising_loss, encode_latent_cache,
                           optimisation_step, step_generator, stored_latent_cache, training_step)
from style_factory.methods import get_method
from style_factory.run import REGISTRY
from style_factory.train_job import TrainJob
from tests.helpers import load_sd1
from tests.test_train import toy_data

CPU = torch.device("cpu")


def fresh_text_embeddings(models, prompts: list[str]) -> torch.Tensor:
    tokenizer = models.tokenizers["tokenizer"]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return models.text_encoders["text_encoder"](ids)[0]


def encode_prompts(models, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The family's prompt conditioning, as the cross-attention tensor the old encode_prompts returned."""
    return models.family.encode_prompts(models, prompts, device).hidden_states


def test_cached_latents_give_the_loss_of_encoding_in_the_step(tiny_model):
    models = load_sd1(tiny_model)
    method = get_method("styleboost")
    cfg = TrainConfig(batch_size=2, train_text_encoder=False)
    method.prepare(models, cfg)
    data = toy_data(concepts=1)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    batch = method.sample_batch(data, cfg, step_generator(cfg.seed, 0, 0)[0])
    views = np.array([0, 1, 1, 0])  # as is and mirrored
    cached = training_step(models, method, batch, cache, cfg, step_generator(cfg.seed, 0, 0)[1], views, CPU,
                           data.geometry(batch.rows))

    # Uncached: encode the batch's images in the step, drawing the same noise from the same generator.
    generator = step_generator(cfg.seed, 0, 0)[1]
    pixels = torch.stack([VIEW_OPS["hflip"](p) if v else p for p, v in zip(pixel_tensor(data.images)[batch.rows], views)])
    with torch.no_grad():
        posterior = models.vae.encode(pixels).latent_dist
    torch.testing.assert_close(torch.stack([cache[r][v, 0] for r, v in zip(batch.rows, views)]), posterior.mean,
                               rtol=0, atol=1e-5)
    latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) \
        * models.vae.config.scaling_factor
    text = fresh_text_embeddings(models, batch.prompts)
    conditioning = Conditioning(parts=(text,))
    uncached = denoising_loss(models, method, latents, conditioning, data.geometry(batch.rows), batch.weights, cfg,
                              generator)
    torch.testing.assert_close(cached["denoising"], uncached, rtol=1e-5, atol=1e-6)


def test_latents_are_stored_beside_the_curated_data_and_encoded_once(tiny_model, tmp_path):
    models = load_sd1(tiny_model)
    data, views = toy_data(concepts=1), [(), ("hflip",)]
    curated = tmp_path / "curated" / "ink.parquet"
    curated.parent.mkdir()
    curated.write_bytes(b"curated table")
    job = TrainJob(style="ink", method="styleboost", family="sd1", key="k", base_model=tiny_model,
                   curated_path=str(curated), model_dir="", log_path="", storage_path="", style_config={}, train={},
                   data_key="data-1")
    first = stored_latent_cache(job, models.vae, data, views)
    assert all(map(torch.equal, first, encode_latent_cache(models.vae, data.images, views)))
    [stored] = (tmp_path / "curated" / "ink.latents").iterdir()
    assert all(map(torch.equal, stored_latent_cache(job, None, data, views), first))  # loaded: no VAE needed
    with pytest.raises(AttributeError):  # other curated data (or other views) is encoded anew, not mixed up
        stored_latent_cache(replace(job, data_key="data-2"), None, data, views)
    with pytest.raises(AttributeError):
        stored_latent_cache(job, None, data, [()])


def test_a_frozen_text_encoder_encodes_each_distinct_prompt_once(tiny_model):
    models = load_sd1(tiny_model)
    models.text_encoders["text_encoder"].requires_grad_(False)
    fresh = fresh_text_embeddings(models, ["a zwx style", "a style"])
    encoded = []
    encoder = models.text_encoders["text_encoder"]
    encoder.register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))

    first = encode_prompts(models, ["a zwx style", "a style", "a zwx style"], CPU)
    assert encoded == [2]  # the distinct prompts, once
    torch.testing.assert_close(first, fresh[[0, 1, 0]])
    second = encode_prompts(models, ["a style", "a zwx style"], CPU)
    assert encoded == [2]  # all from the cache
    torch.testing.assert_close(second, fresh[[1, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls give other numbers: cached apart
        encode_prompts(models, ["a style"], CPU)
    assert encoded == [2, 1]


def test_a_trained_text_encoder_encodes_every_time(tiny_model):
    models = load_sd1(tiny_model)
    get_method("styleboost").prepare(models, TrainConfig(train_text_encoder=True))
    encoded = []
    encoder = models.text_encoders["text_encoder"]
    encoder.register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))
    for _ in range(2):
        assert encode_prompts(models, ["a zwx style"], CPU).requires_grad
    assert encoded == [1, 1]
    assert not models.frozen_prompts


@pytest.mark.parametrize("field, value", [("optimizer", "sgd"), ("gradient_checkpointing", "sometimes"),
                                          ("channels_last", "maybe"), ("compile", [True])])
def test_fast_step_options_reject_bad_values(field, value, tmp_path):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**{field: value})
    config = tmp_path / "run.yaml"
    config.write_text(f"train:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=f"train.{field}"):
        load_run_config(config, REGISTRY)


def first_step(tiny_model: str, cfg: TrainConfig):
    """The models, optimizer and loss after one optimisation_step, set up as train_loop_per_worker does."""
    torch.manual_seed(0)
    models = load_sd1(tiny_model)
    method = get_method("styleboost")
    groups = method.prepare(models, cfg)
    data = toy_data(concepts=1)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    apply_fast_paths(models, cfg)
    optimizer = build_optimizer(groups, cfg, CPU)
    loss = optimisation_step(models, method, data, cache, optimizer, cfg, 0, 0, CPU)
    return models, optimizer, loss


@pytest.fixture(scope="module")
def plain_loss(tiny_model) -> float:
    return first_step(tiny_model, TrainConfig(batch_size=1, train_text_encoder=False))[2]


@pytest.mark.parametrize("options", [{"gradient_checkpointing": True},
                                     {"gradient_checkpointing": True, "train_text_encoder": True},
                                     {"channels_last": True}, {"optimizer": "adamw_fused"}])
def test_each_option_trains_with_the_loss_of_the_plain_step(tiny_model, plain_loss, options):
    cfg = TrainConfig(batch_size=1, **{"train_text_encoder": False, **options})
    before = load_sd1(tiny_model).unet.conv_in.weight
    models, optimizer, loss = first_step(tiny_model, cfg)
    assert loss == pytest.approx(plain_loss, rel=1e-5)  # the same batch, noise and model: the same loss
    assert not torch.allclose(models.unet.conv_in.weight, before)
    assert models.unet.is_gradient_checkpointing == cfg.gradient_checkpointing
    assert models.text_encoders["text_encoder"].is_activation_checkpointing == (
        cfg.gradient_checkpointing and cfg.train_text_encoder)
    assert models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == cfg.channels_last
    assert optimizer.defaults["fused"] == (True if cfg.optimizer == "adamw_fused" else None)


def test_auto_optimizer_is_fused_on_cuda_only(tiny_model):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer([{"params": params}], TrainConfig(), torch.device("cuda")).defaults["fused"]
    assert not build_optimizer([{"params": params}], TrainConfig(), CPU).defaults["fused"]


def test_adamw_8bit_asks_for_bitsandbytes_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ImportError, match="adamw_8bit needs the bitsandbytes package"):
        build_optimizer([{"params": params}], TrainConfig(optimizer="adamw_8bit"), CPU)


@pytest.mark.slow
def test_compile_compiles_the_unet_in_place_keeping_its_parameter_names(tiny_model):
    models = load_sd1(tiny_model)
    names = [name for name, _ in models.unet.named_parameters()]
    apply_fast_paths(models, TrainConfig(compile=True))  # not run here: inductor takes minutes on a small CPU
    assert models.unet._compiled_call_impl is not None
    assert [name for name, _ in models.unet.named_parameters()] == names  # checkpoints keep their keys


def test_attention_other_than_pytorch_sdpa_is_refused(tiny_model):
    models = load_sd1(tiny_model)
    models.unet.set_attn_processor(AttnProcessor())
    with pytest.raises(RuntimeError, match="not PyTorch SDPA"):
        apply_fast_paths(models, TrainConfig())
