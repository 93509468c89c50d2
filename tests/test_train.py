"""The shared training loop's pieces and StyleBoost, on the tiny preset, in-process (Ray runs in test_e2e)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from style_factory.config import TrainConfig
from style_factory.data import StyleData, pixel_tensor
from style_factory.loop import encode_latent_cache, min_snr_weights, sample_latents, step_generator, training_step
from style_factory.methods import get_method
from tests.helpers import load_sd1


def toy_data(n_per_role: int = 4, concepts: int = 2) -> StyleData:
    rows = [(role, c) for c in range(concepts) for role in ("ref", "aux") for _ in range(n_per_role)]
    return StyleData(
        images=list(np.random.default_rng(0).integers(0, 256, (len(rows), 64, 64, 3), dtype=np.uint8)),
        roles=np.array([r for r, _ in rows]), concepts=np.array([c for _, c in rows]),
        captions=[f"caption {i}" for i in range(len(rows))],
        tokens=[["zwx", "ukj"][c] for _, c in rows], class_words=[["style", "background"][c] for _, c in rows])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def run_steps(models, cfg: TrainConfig, data: StyleData, steps: int) -> list[float]:
    method = get_method("styleboost")
    groups = method.prepare(models, cfg)
    optimizer = torch.optim.AdamW(groups)
    cache = encode_latent_cache(models.vae, data.images, [(), ("hflip",)])
    losses = []
    for step in range(steps):
        rng, generator = step_generator(cfg.seed, step, 0)
        batch = method.sample_batch(data, cfg, rng)
        flip = rng.random(len(batch.rows)) < 0.5
        loss = sum(training_step(models, method, batch, cache, cfg, generator, flip, torch.device("cpu"),
                                 data.geometry(batch.rows)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_training_changes_trainable_weights_and_leaves_frozen_ones_bitwise_equal(tiny_model, train_text_encoder):
    models = load_sd1(tiny_model)
    before = {name: snapshot(models.vae if name == "vae" else models.module(name))
              for name in ("unet", "text_encoder", "vae")}
    cfg = TrainConfig(max_steps=2, batch_size=2, train_text_encoder=train_text_encoder)
    losses = run_steps(models, cfg, toy_data(), steps=2)
    assert all(np.isfinite(losses))
    assert changed(before["vae"], models.vae) == set()
    unet_params = {k for k, _ in models.unet.named_parameters()}
    assert len(changed(before["unet"], models.unet) & unet_params) > 0.9 * len(unet_params)
    assert bool(changed(before["text_encoder"], models.text_encoders["text_encoder"])) == train_text_encoder


def test_latent_cache_equals_a_fresh_encode_for_both_flips(tiny_model):
    models = load_sd1(tiny_model)
    data = toy_data(n_per_role=2, concepts=1)
    cache = encode_latent_cache(models.vae, data.images, [(), ("hflip",)], batch_size=3)
    pixels = pixel_tensor(data.images)
    with torch.no_grad():
        for flip, view in enumerate([pixels, pixels.flip(-1)]):
            fresh = models.vae.encode(view).latent_dist
            torch.testing.assert_close(torch.stack(cache)[:, flip, 0], fresh.mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.stack(cache)[:, flip, 1], fresh.std, rtol=0, atol=1e-5)
    # Sampling from the cache is mean + std * noise, like latent_dist.sample().
    rows, flip = np.array([0, 1]), np.array([False, True])
    a = sample_latents(cache, rows, flip, 1.0, torch.Generator().manual_seed(3))
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    picked = torch.stack([cache[0][0], cache[1][1]])
    torch.testing.assert_close(a, picked[:, 0] + picked[:, 1] * noise)


def test_styleboost_batches_bind_tokens_and_class_words_one_concept_at_a_time():
    data = toy_data()
    method = get_method("styleboost")
    cfg = TrainConfig(batch_size=3, prior_loss_weight=0.5)
    seen = set()
    for step in range(20):
        batch = method.sample_batch(data, cfg, step_generator(1, step, 0)[0])
        concepts = set(data.concepts[batch.rows])
        assert len(concepts) == 1  # each batch comes from one concept (Multi-StyleBoost)
        seen |= concepts
        refs, auxes = batch.rows[:3], batch.rows[3:]
        assert all(data.roles[i] == "ref" for i in refs) and all(data.roles[i] == "aux" for i in auxes)
        token, word = data.tokens[refs[0]], data.class_words[refs[0]]
        assert all(p.endswith(f", {token} {word}") for p in batch.prompts[:3])
        assert all(p.endswith(f", {word}") and token not in p for p in batch.prompts[3:])
        torch.testing.assert_close(batch.weights, torch.tensor([1 / 3] * 3 + [0.5 / 3] * 3))
    assert seen == {0, 1}


def test_styleboost_rejects_a_concept_without_aux_images():
    data = toy_data(concepts=1)
    keep = data.roles == "ref"
    ref_only = StyleData([image for image, k in zip(data.images, keep) if k], data.roles[keep], data.concepts[keep],
                         data.captions, data.tokens, data.class_words)
    with pytest.raises(ValueError, match="no Aux images"):
        get_method("styleboost").check_data(ref_only, TrainConfig())
    get_method("styleboost").check_data(ref_only, TrainConfig(prior_loss_weight=0))


def test_randomness_is_a_function_of_seed_step_and_rank():
    a, b = step_generator(5, 17, 0), step_generator(5, 17, 0)
    assert a[0].random() == b[0].random() and torch.equal(torch.rand(3, generator=a[1]), torch.rand(3, generator=b[1]))
    assert step_generator(5, 17, 1)[0].random() != step_generator(5, 17, 0)[0].random()


def test_min_snr_weights_match_the_formula(tiny_model):
    scheduler = load_sd1(tiny_model).noise_scheduler
    t = torch.tensor([0, 250, 999])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0, "epsilon"), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0, "v_prediction"), torch.clamp(snr, max=5.0) / (snr + 1))


def test_v_prediction_and_min_snr_train(tiny_model):
    models = load_sd1(tiny_model)
    cfg = TrainConfig(batch_size=1, prediction_type="v_prediction", snr_gamma=5.0, train_text_encoder=False)
    assert all(np.isfinite(run_steps(models, cfg, toy_data(concepts=1), steps=2)))


def test_prompts_are_encoded_with_the_real_clip_tokenizer(tiny_model):
    import open_clip

    models = load_sd1(tiny_model)
    ids = models.tokenizers["tokenizer"](["a red circle, zwx style"]).input_ids[0]
    reference = open_clip.get_tokenizer("ViT-B-32")(["a red circle, zwx style"])[0]
    assert ids == reference[: len(ids)].tolist() and ids[0] == 49406 and ids[-1] == 49407
    assert models.family.encode_prompts(models, ["a", "b"], torch.device("cpu")).hidden_states.shape == (2, 77, 64)
