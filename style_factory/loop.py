"""The shared training loop's step math, the same for every method and family: cached latents, the denoising loss,
one optimisation step, checkpoints of the trained weights, the step-speed options and the optimiser.

What differs between methods comes from the `Method` (`style_factory/methods/`); what differs between base models from the
family (`models.family`: prompt conditioning and the denoiser call). `style_factory/worker.py` runs these steps.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.training_utils import compute_snr
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from style_factory.config import TrainConfig
from style_factory.data import ImageGeometry, StyleData, pixel_tensor
from style_factory.families.base import Components, unwrapped
from style_factory.files import code_version, move_aside, read_json, sha256_of
from style_factory.methods.base import Batch, Method
from style_factory.models import base_model_identity
from style_factory.train_job import TrainJob


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's "L" conversion) in all three channels."""
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=-3, keepdim=True)
    return luma.expand_as(pixels)


VIEW_OPS = {"hflip": lambda pixels: pixels.flip(-1), "grayscale": grayscale}


def encode_latent_cache(vae, images: list[np.ndarray], views: list[tuple[str, ...]],
                        batch_size: int = 32) -> list[torch.Tensor]:
    """Mean and std of the VAE posterior per image and view (ops of VIEW_OPS, applied in order; () = as is):
    the VAE never runs again while training. `images` are StyleData's uint8 images, encoded batch by batch among
    those of one size (bucket), so no float copy of the whole set is ever made.

    Sampling mean + std * noise from this cache is distributed exactly like a fresh `encode().sample()`.
    The VAE runs in its own (float32) precision, never under autocast: SDXL's VAE overflows in float16.
    Returns per image a (len(views), 2, C, h, w) tensor.
    """
    cache: list[torch.Tensor | None] = [None] * len(images)
    shapes = [image.shape for image in images]
    with torch.no_grad():
        for shape in dict.fromkeys(shapes):
            rows = [i for i, other in enumerate(shapes) if other == shape]
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                pixels, encoded = pixel_tensor([images[i] for i in part]), []
                for ops in views:
                    view = pixels
                    for op in ops:
                        view = VIEW_OPS[op](view)
                    dist = vae.encode(view.to(vae.device, vae.dtype)).latent_dist
                    encoded.append(torch.stack([dist.mean, dist.std], dim=1).float().cpu())
                for i, latent in zip(part, torch.stack(encoded, dim=1)):
                    if not torch.isfinite(latent).all():
                        raise FloatingPointError(f"the VAE ({vae.dtype}) encoded the images to non-finite latents; "
                                                 "load it in float32 (SDXL's VAE overflows in float16)")
                    cache[i] = latent
    return cache


def stored_latent_cache(job: TrainJob, vae, data: StyleData, views: list[tuple[str, ...]]) -> list[torch.Tensor]:
    """encode_latent_cache's result, stored beside the curated data once per (curated data, class images, base
    model, views): the style's other methods, its later rounds and every rerun load it instead of encoding.
    `<run>/curated/<style>.latents/<key>.safetensors`; written whole or not at all, so concurrent jobs at worst
    both encode."""
    key = sha256_of(job.data_key, Path(job.curated_path).stat().st_mtime_ns, job.prior_dirs,
                    base_model_identity(job.base_model), views, code_version("style_factory.loop"))[:16]
    path = Path(job.curated_path).with_suffix(".latents") / f"{key}.safetensors"
    expected = (len(data.images), len(views))
    if path.is_file():
        try:
            stored = load_file(path)
            cache = [stored[str(i)] for i in range(len(stored))]
            found = (len(cache), {len(latent) for latent in cache})
            if found == (expected[0], {expected[1]}):
                return cache
            problem = f"holds {found[0]} images x {sorted(found[1])} views, not {expected[0]} x {expected[1]}"
        except (SafetensorError, OSError, KeyError) as err:
            problem = f"cannot be read ({type(err).__name__}: {err})"
        aside = move_aside(path)
        print(f"[train] {job.style}/{job.method}: latent cache {path} {problem}; moved to {aside.name}, encoding "
              "again", flush=True)
    cache = encode_latent_cache(vae, data.images, views)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({str(i): latent.contiguous() for i, latent in enumerate(cache)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written cache behind
        raise
    return cache


def sample_latents(cache: list[torch.Tensor], rows: np.ndarray, views: np.ndarray, scaling: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Latents of `rows` (images of one size) in their `views`, drawn from the cached posteriors."""
    picked = torch.stack([cache[int(row)][int(view)] for row, view in zip(rows, views)])
    mean, std = picked[:, 0], picked[:, 1]
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets, on diffusers' SNR."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def prediction_type(models: Components, cfg: TrainConfig) -> str:
    """What the denoiser predicts: train.prediction_type, else what the base model's scheduler config says."""
    return cfg.prediction_type or models.noise_scheduler.config.prediction_type


def denoising_loss(models: Components, method: Method, latents: torch.Tensor, conditioning, geometry: ImageGeometry,
                   weights: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss every method shares: sum_i weights_i * ||target_i - prediction_i||^2."""
    scheduler, kind = models.noise_scheduler, prediction_type(models, cfg)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = method.sample_timesteps(len(latents), models, generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    prediction = models.family.denoise(models, noisy, timesteps, conditioning, geometry)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps.cpu(), cfg.snr_gamma,
                                                  kind).to(per_sample.device)
    return (per_sample * weights.to(per_sample.device)).sum()


def size_groups(cache: list[torch.Tensor], rows: np.ndarray) -> list[np.ndarray]:
    """Positions in `rows` of the images of each latent size, in order of first appearance: one group, unless a
    batch's part has no image in the step's bucket (`StyleData.indices`) and so came from another."""
    shapes = [tuple(cache[int(row)].shape[-2:]) for row in rows]
    return [np.flatnonzero([other == shape for other in shapes]) for shape in dict.fromkeys(shapes)]


def training_step(models: Components, method: Method, batch: Batch, cache: list[torch.Tensor], cfg: TrainConfig,
                  generator: torch.Generator, views: np.ndarray, device: torch.device,
                  geometry: ImageGeometry) -> dict[str, torch.Tensor]:
    """The batch's losses; its denoising loss is computed per image size (one UNet call when it is one bucket)."""
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    denoising = []
    with autocast:
        for group in size_groups(cache, batch.rows):
            latents = sample_latents(cache, batch.rows[group], views[group], models.vae.config.scaling_factor,
                                     generator).to(device)
            conditioning = models.family.encode_prompts(models, [batch.prompts[i] for i in group], device)
            denoising.append(denoising_loss(models, method, latents, conditioning, geometry.take(group),
                                            batch.weights[group], cfg, generator))
        losses = {"denoising": sum(denoising[1:], denoising[0])}
        losses.update(method.extra_losses(models, batch))
    return losses


def step_generator(seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """Randomness is a function of (seed, step, rank), so a resumed run draws what the uninterrupted one would."""
    rng = np.random.default_rng([seed, step, rank])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


CAPTION_DROPOUT_STREAM = 1  # caption dropout draws from its own generator: on or off, the rest draws the same


def in_one_bucket(data: StyleData, rng: np.random.Generator) -> StyleData:
    """`data` restricted to the bucket of a StyleRef image drawn at random (so buckets come up in proportion to their
    StyleRef images, and every image is drawn); as it is, with no draw, when all StyleRef images share one size."""
    sizes = data.sizes[data.indices("ref")]
    if len(np.unique(sizes, axis=0)) < 2:
        return data
    return replace(data, bucket=tuple(int(side) for side in sizes[rng.integers(len(sizes))]))


def drop_captions(data: StyleData, cfg: TrainConfig, step: int, rank: int) -> tuple[StyleData, np.ndarray]:
    """With probability cfg.caption_dropout per StyleRef and Aux image, its caption left out of this step's prompt
    (the method's style words stay: "zwx style"), drawn from a generator of (seed, step, rank); and which rows."""
    if cfg.caption_dropout == 0:
        return data, np.zeros(len(data.captions), bool)
    draws = np.random.default_rng([cfg.seed, step, rank, CAPTION_DROPOUT_STREAM]).random(len(data.captions))
    dropped = (draws < cfg.caption_dropout) & np.isin(data.roles, ["ref", "aux"])
    return replace(data, captions=["" if drop else text for text, drop in zip(data.captions, dropped)]), dropped


def draw_batch(method: Method, data: StyleData, cfg: TrainConfig, step: int, rank: int,
               rng: np.random.Generator) -> Batch:
    """The method's batch for this step, from one bucket, with caption dropout applied; views set when the method
    leaves them to the loop (a random mirror image when enabled)."""
    data, dropped = drop_captions(in_one_bucket(data, rng), cfg, step, rank)
    batch = method.sample_batch(data, cfg, rng)
    batch.prompts = [prompt.lstrip(" ,") if dropped[row] else prompt for row, prompt in zip(batch.rows, batch.prompts)]
    if batch.views is None:
        batch.views = rng.random(len(batch.rows)) < 0.5 if cfg.random_flip else np.zeros(len(batch.rows), bool)
    return batch


def optimisation_step(models: Components, method: Method, data: StyleData, cache: list[torch.Tensor],
                      optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, rank: int,
                      device: torch.device, record: dict | None = None) -> float:
    """One step of the shared loop: draw a batch, compute its losses, update the trainable weights.

    `record`, when given, receives what the step computed anyway, for the trackers: each loss term (`losses`), the
    gradient norm before clipping, each parameter group's learning rate (`lrs`) and the batch's image count."""
    rng, generator = step_generator(cfg.seed, step, rank)
    batch = draw_batch(method, data, cfg, step, rank, rng)
    terms = training_step(models, method, batch, cache, cfg, generator, batch.views, device,
                          data.geometry(batch.rows))
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{method.name}: loss is {loss.item()} at step {step}; "
                                 "lower train.learning_rate or use mixed_precision: 'no'")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                               cfg.max_grad_norm)
    optimizer.step()
    method.after_step(models)
    if record is not None:
        record.update(losses={name: float(term.detach()) for name, term in terms.items()},
                      grad_norm=float(grad_norm), lrs=[group["lr"] for group in optimizer.param_groups],
                      images=len(batch.rows))
    return round(float(loss.detach()), 6)


def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: a checkpoint of a LoRA run holds the adapter, not the whole model."""
    return {k: v.detach().contiguous().cpu() for k, v in unwrapped(module).named_parameters() if v.requires_grad}


def save_checkpoint(folder: Path, job_key: str, models: Components, modules: list[str], optimizer, step: int,
                    losses: list[float]) -> None:
    for name in modules:
        save_file(trained_state(models.module(name)), folder / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"job": job_key, "step": step, "losses": losses}))


def load_trained_weights(models: Components, modules: list[str], folder: Path) -> None:
    """Load a checkpoint into models prepared by the same method: it holds exactly their trainable weights.
    Every file is read and checked before any weight is set, so a file that fails leaves the models as they were."""
    states = {}
    for name in modules:
        module, state = models.module(name), load_file(folder / f"{name}.safetensors")
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ValueError(f"{folder / name}.safetensors does not hold the trainable weights of the prepared "
                             f"{name} (first differences: {sorted(set(state) ^ trainable)[:3]})")
        states[name] = state
    for name, state in states.items():
        models.module(name).load_state_dict(state, strict=False)  # the frozen rest is the base model's


def restore_checkpoint(job_key: str, models: Components, modules: list[str], optimizer,
                       folders: list[Path]) -> tuple[int, list[float], Path | None]:
    """The trained weights, optimiser state, step and losses of the first of `folders` (latest first) that is a
    readable checkpoint of this job; (0, [], None) when none is: training starts from the base model."""
    for folder in folders:
        state = read_json(folder / "state.json")
        if state is None or state.get("job") != job_key:  # another job's (a group trains several), or cut short
            continue
        try:
            optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
            load_trained_weights(models, modules, folder)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
            print(f"[train] checkpoint {folder} cannot be read ({type(err).__name__}: {err}); trying an earlier one",
                  flush=True)
            continue
        optimizer.load_state_dict(optimizer_state)
        return state["step"], state["losses"], folder
    return 0, [], None


def apply_fast_paths(models: Components, cfg: TrainConfig) -> None:
    """Apply cfg's step-speed options to the prepared models (on their device); check attention is PyTorch SDPA."""
    other = {type(p).__name__ for p in models.unet.attn_processors.values() if not isinstance(p, AttnProcessor2_0)}
    if other:
        raise RuntimeError(f"UNet attention runs {sorted(other)}, not PyTorch SDPA (AttnProcessor2_0)")
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for encoder in models.text_encoders.values():
            if any(p.requires_grad for p in encoder.parameters()):
                encoder.activation_checkpointing_enable()
                encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
    if cfg.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        models.unet.compile()  # in place: parameter names, hence checkpoints, stay those of the plain UNet


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as cfg.optimizer names it; "auto" is the fused kernel on CUDA and PyTorch's default elsewhere."""
    name = cfg.optimizer if cfg.optimizer != "auto" else "adamw_fused" if device.type == "cuda" else "adamw"
    if name == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError("train.optimizer: adamw_8bit needs the bitsandbytes package (pip install "
                              "bitsandbytes); or choose optimizer: adamw or adamw_fused") from None
        return bitsandbytes.optim.AdamW8bit(param_groups, weight_decay=cfg.weight_decay)
    if name == "adamw_fused":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)  # foreach kernels on CUDA
