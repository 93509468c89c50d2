"""Train: every (style, method) fanned out over the cluster; one loop shared by every method.

The jobs are dealt into as many groups as the cluster trains at once. A group is one Ray Train run whose
workers load the base model once and train the group's jobs in turn, each on a fresh copy of the base kept
in host memory: a style pays no process start-up and no model load of its own. Checkpoints live under
`<run>/ray_train/<group>/` (a one-job group is named `<style>-<method>-<key>`); rerunning the same job
forms the same groups and resumes from the last checkpoint. Each finished model is exported to
`<run>/models/<style>/<method>/` as a diffusers folder, with `model_card.json` recording the key that
decides whether it is up to date.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from pipeline.config import StyleConfig, TrainConfig
from pipeline.files import (
    code_version,
    replace_dir_atomic,
    sha256_of,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.methods import Batch, Method, StyleData, get_method
from pipeline.models import (
    Components,
    base_model_identity,
    load_components,
    resolve_base_model,
)
from pipeline.priors import class_image_dir, generate_class_images
from pipeline.run import Run


@dataclass
class TrainJob:
    """Everything one (style, method) training run needs; plain data so it travels to Ray workers."""

    style: str
    method: str
    key: str  # hash of inputs, config and code: decides reuse
    base_model: str  # a folder or hub id loadable by from_pretrained
    curated_path: str
    model_dir: str
    log_path: str
    storage_path: str  # Ray Train checkpoints
    style_config: dict
    train: dict
    prior_dirs: list[str] = field(default_factory=list)  # generated class images, one folder per concept
    data_key: str = ""  # the curated data's key: which images the model learnt from

    @property
    def trainer_name(self) -> str:
        return f"{self.style}-{self.method}-{self.key[:12]}"

    @property
    def error_path(self) -> Path:
        """Where the job's worker records the error that stopped it (cleared when the job is tried again)."""
        return Path(self.log_path).with_suffix(".error.json")

    def is_done(self) -> bool:
        card = Path(self.model_dir) / "model_card.json"
        return card.is_file() and json.loads(card.read_text()).get("key") == self.key

    def load_data(self) -> StyleData:
        return StyleData.load(Path(self.curated_path), self.prior_dirs)

    def load_method(self) -> Method:
        return get_method(self.method, StyleConfig.model_validate(self.style_config))


# ---------------------------------------------------------------------------------------------
# The shared loop (runs on each Ray Train worker)
# ---------------------------------------------------------------------------------------------

def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's "L" conversion) in all three channels."""
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=-3, keepdim=True)
    return luma.expand_as(pixels)


VIEW_OPS = {"hflip": lambda pixels: pixels.flip(-1), "grayscale": grayscale}


def encode_latent_cache(vae, pixels: torch.Tensor, views: list[tuple[str, ...]],
                        batch_size: int = 32) -> torch.Tensor:
    """Mean and std of the VAE posterior per image and view (ops of VIEW_OPS, applied in order; () = as is):
    the VAE never runs again while training.

    Sampling mean + std * noise from this cache is distributed exactly like a fresh `encode().sample()`.
    Returns (len(views), N, 2, C, h, w).
    """
    cache = []
    with torch.no_grad():
        for ops in views:
            view = pixels
            for op in ops:
                view = VIEW_OPS[op](view)
            parts = []
            for start in range(0, len(view), batch_size):
                dist = vae.encode(view[start:start + batch_size].to(vae.device, vae.dtype)).latent_dist
                parts.append(torch.stack([dist.mean, dist.std], dim=1).float().cpu())
            cache.append(torch.cat(parts))
    return torch.stack(cache)


def stored_latent_cache(job: TrainJob, vae, data: StyleData, views: list[tuple[str, ...]]) -> torch.Tensor:
    """encode_latent_cache's result, stored beside the curated data once per (curated data, class images, base
    model, views): the style's other methods, its later rounds and every rerun load it instead of encoding.
    `<run>/curated/<style>.latents/<key>.safetensors`; written whole or not at all, so concurrent jobs at worst
    both encode."""
    key = sha256_of(job.data_key, Path(job.curated_path).stat().st_mtime_ns, job.prior_dirs,
                    base_model_identity(job.base_model), views, code_version("train.py"))[:16]
    path = Path(job.curated_path).with_suffix(".latents") / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["latents"]
    cache = encode_latent_cache(vae, data.pixels, views)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"latents": cache.contiguous()}, tmp)
    os.replace(tmp, path)
    return cache


def sample_latents(cache: torch.Tensor, rows: np.ndarray, views: np.ndarray, scaling: float,
                   generator: torch.Generator) -> torch.Tensor:
    picked = cache[torch.as_tensor(views.astype(np.int64)), torch.as_tensor(rows)]
    mean, std = picked[:, 0], picked[:, 1]
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    alphas = scheduler.alphas_cumprod[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# Per frozen text encoder: {(prompt, autocast dtype): embedding}. Weak keys: it goes when the encoder goes.
FROZEN_PROMPT_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_prompts(models: Components, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings of `prompts`. A frozen text encoder (no trainable weight) encodes each distinct prompt
    once: its output never changes, so later steps reuse it."""
    def encode(texts: list[str]) -> torch.Tensor:
        ids = models.tokenizer(texts, padding="max_length", max_length=models.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        return models.text_encoder(ids)[0]

    if any(p.requires_grad for p in models.text_encoder.parameters()):
        return encode(prompts)
    cache = FROZEN_PROMPT_EMBEDDINGS.setdefault(models.text_encoder, {})
    precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    new = [p for p in dict.fromkeys(prompts) if (p, precision) not in cache]
    if new:
        with torch.no_grad():
            cache.update({(p, precision): embedding for p, embedding in zip(new, encode(new))})
    return torch.stack([cache[(p, precision)] for p in prompts])


def denoising_loss(models: Components, method: Method, latents: torch.Tensor, text: torch.Tensor,
                   weights: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss every method shares: sum_i weights_i * ||target_i - prediction_i||^2."""
    scheduler = models.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = method.sample_timesteps(len(latents), models, generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    prediction = models.unet(noisy, timesteps, text).sample
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps.cpu(), cfg.snr_gamma,
                                                  cfg.prediction_type).to(per_sample.device)
    return (per_sample * weights.to(per_sample.device)).sum()


def training_step(models: Components, method: Method, batch: Batch, cache: torch.Tensor, cfg: TrainConfig,
                  generator: torch.Generator, views: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    latents = sample_latents(cache, batch.rows, views, models.vae.config.scaling_factor, generator).to(device)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    with autocast:
        text = encode_prompts(models, batch.prompts, device)
        losses = {"denoising": denoising_loss(models, method, latents, text, batch.weights, cfg, generator)}
        losses.update(method.extra_losses(models, batch))
    return losses


def step_generator(seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """Randomness is a function of (seed, step, rank), so a resumed run draws what the uninterrupted one would."""
    rng = np.random.default_rng([seed, step, rank])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def optimisation_step(models: Components, method: Method, data: StyleData, cache: torch.Tensor,
                      optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, rank: int,
                      device: torch.device) -> float:
    """One step of the shared loop: draw a batch, compute its losses, update the trainable weights."""
    rng, generator = step_generator(cfg.seed, step, rank)
    batch = method.sample_batch(data, cfg, rng)
    if batch.views is None:  # the method leaves the view to the loop: a random mirror image when enabled
        batch.views = rng.random(len(batch.rows)) < 0.5 if cfg.random_flip else np.zeros(len(batch.rows), bool)
    loss = sum(training_step(models, method, batch, cache, cfg, generator, batch.views, device).values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{method.name}: loss is {loss.item()} at step {step}; "
                                 "lower train.learning_rate or use mixed_precision: 'no'")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                   cfg.max_grad_norm)
    optimizer.step()
    method.after_step(models)
    return round(float(loss.detach()), 6)


def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: a checkpoint of a LoRA run holds the adapter, not the whole model."""
    module = module.module if hasattr(module, "module") else module  # DDP wraps the trained modules
    return {k: v.detach().contiguous().cpu() for k, v in module.named_parameters() if v.requires_grad}


def save_checkpoint(folder: Path, job_key: str, models: Components, modules: list[str], optimizer, step: int,
                    losses: list[float]) -> None:
    for name in modules:
        save_file(trained_state(getattr(models, name)), folder / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"job": job_key, "step": step, "losses": losses}))


def load_trained_weights(models: Components, modules: list[str], folder: Path) -> None:
    """Load a checkpoint into models prepared by the same method: it holds exactly their trainable weights."""
    for name in modules:
        module, state = getattr(models, name), load_file(folder / f"{name}.safetensors")
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ValueError(f"{folder / name}.safetensors does not hold the trainable weights of the prepared "
                             f"{name} (first differences: {sorted(set(state) ^ trainable)[:3]})")
        module.load_state_dict(state, strict=False)  # the frozen rest is the base model's


def apply_fast_paths(models: Components, cfg: TrainConfig) -> None:
    """Apply cfg's step-speed options to the prepared models (on their device); check attention is PyTorch SDPA."""
    other = {type(p).__name__ for p in models.unet.attn_processors.values() if not isinstance(p, AttnProcessor2_0)}
    if other:
        raise RuntimeError(f"UNet attention runs {sorted(other)}, not PyTorch SDPA (AttnProcessor2_0)")
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if any(p.requires_grad for p in models.text_encoder.parameters()):
            models.text_encoder.activation_checkpointing_enable()
            models.text_encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
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


# ---------------------------------------------------------------------------------------------
# Export (rank 0 of a training group; zero-shot methods in a task of their own)
# ---------------------------------------------------------------------------------------------

def write_model(job: TrainJob, method: Method, write: Callable[[Path], None], **facts) -> dict:
    """Write the model folder with `write`, plus its card (the key and `facts`); it appears whole or not at all."""
    style = StyleConfig.model_validate(job.style_config)
    card = {"key": job.key, "style": job.style, "method": job.method, "base_model": job.base_model,
            "tokens": style.tokens, **facts, "train": job.train, "data": {"file": Path(job.curated_path).name, "key": job.data_key},
            "eval_prompt_example": method.eval_prompt("a red circle on a blue background", style)}
    Path(job.model_dir).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=Path(job.model_dir).parent, prefix=f".{job.method}."))
    write(tmp)
    write_json_atomic(tmp / "model_card.json", card)
    replace_dir_atomic(tmp, Path(job.model_dir))
    return card


def export_model(job: TrainJob, checkpoint_dir: Path, base: Components | None = None, **facts) -> dict:
    """Write the trained model the method's way (atomically), plus its card and loss log.

    The checkpoint's weights go into a copy of `base` (the worker's copy in host memory), or into the base
    model loaded from disk when none is given."""
    cfg = TrainConfig.model_validate(job.train)
    method = job.load_method()
    models = copy.deepcopy(base) if base is not None else load_components(job.base_model)
    method.prepare(models, cfg)  # the same trainable structure (adapters, new tokens) the checkpoint was saved from
    load_trained_weights(models, method.trained_modules(cfg), checkpoint_dir)
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler.from_pretrained(job.base_model, subfolder="scheduler"),  # as load_pipeline samples
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    state = json.loads((checkpoint_dir / "state.json").read_text())
    # The log first: the model card marks the job done, so a crash between the two must not lose the log.
    log = "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(state["losses"]))
    write_text_atomic(Path(job.log_path), log)
    return write_model(job, method, lambda out: method.export(pipe, out, cfg),
                       steps=state["step"], final_loss=state["losses"][-1], **facts)


@ray.remote
def prepare_untrained(job: TrainJob) -> dict:
    """A zero-shot method's model folder, prepared from the data and the base model on one worker's resources."""
    cfg = TrainConfig.model_validate(job.train)
    method = job.load_method()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method.check_data(job.load_data(), cfg)
    return write_model(job, method, lambda out: method.prepare_reference(job.load_data(), cfg, job.base_model,
                                                                         out, device), steps=0, final_loss=None)


def train_job(job: TrainJob, method: Method, base: Components, checkpoint, device: torch.device) -> None:
    """Train `job` on a copy of `base` (host memory, untouched), resuming from `checkpoint` when it is this job's,
    reporting a checkpoint every `checkpoint_every` steps; rank 0 exports the model after the last step."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(job.train)
    rank = ray.train.get_context().get_world_rank()
    started = time.time()
    data = job.load_data()
    method.check_data(data, cfg)
    models = copy.deepcopy(base)
    torch.manual_seed(cfg.seed)  # before prepare: adapters and new token rows start from the same draw in any group
    param_groups = method.prepare(models, cfg)
    modules = method.trained_modules(cfg)
    for part in (models.vae, models.text_encoder, models.unet):
        part.to(device)
    cache = stored_latent_cache(job, models.vae, data, method.image_views(cfg))
    apply_fast_paths(models, cfg)
    optimizer = build_optimizer(param_groups, cfg, device)

    step, losses = 0, []
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / "state.json").read_text())
            if state.get("job") == job.key:  # the group's latest checkpoint may be an earlier, finished job's
                load_trained_weights(models, modules, Path(folder))
                optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True))
                step, losses = state["step"], state["losses"]
    for name in modules:  # data parallel across this style's workers (no-op for one worker)
        setattr(models, name, ray.train.torch.prepare_model(getattr(models, name)))

    while step < cfg.max_steps:
        losses.append(optimisation_step(models, method, data, cache, optimizer, cfg, step, rank, device))
        step += 1
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(Path(tmp), job.key, models, modules, optimizer, step, losses)
                    if step == cfg.max_steps:  # exported before it is reported: a restart finds the job done
                        export_model(job, Path(tmp), base, train_seconds=round(time.time() - started, 1))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"style": job.style, "method": job.method, "step": step, "loss": losses[-1]},
                                 checkpoint=checkpoint,
                                 checkpoint_dir_name=f"{job.style}-{job.method}-{job.key[:8]}-step_{step:07d}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: the group's jobs in turn, on a base model this worker loads once.

    Each job trains a copy of the base held in host memory, so no job sees another's weights and none pays
    the process start-up and model load again. A job that raises (its data, a NaN loss, out of memory) is
    recorded in `<job log>.error.json` and the group moves on; a worker that dies restarts the group, which
    skips the exported jobs and resumes the latest checkpoint.
    """
    import ray.train
    import ray.train.torch

    jobs = [TrainJob(**job) for job in config["jobs"]]
    torch.set_num_threads(max(1, int(TrainConfig.model_validate(jobs[0].train).cpus_per_worker)))
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()
    base = load_components(jobs[0].base_model)  # every job of a group shares its base model
    checkpoint = ray.train.get_checkpoint()  # the interrupted job's, if any: the first one this group trains
    for job in jobs:
        method = job.load_method()
        try:
            for round_job in method.rounds(job):  # a round is exported before the method plans the next one
                if not round_job.is_done():
                    train_job(round_job, method, base, checkpoint, device)
                    checkpoint = None  # its own reports replaced it, and checkpoint retention may have deleted it
                    if torch.distributed.is_initialized():
                        torch.distributed.barrier()  # the next round reads what rank 0 exported
        except Exception as err:  # noqa: BLE001 - the job's own failure; the group's other jobs go on
            if rank == 0:
                write_json_atomic(job.error_path, {"key": job.key, "error": f"{type(err).__name__}: {err}"})
            print(f"[train] {job.style}/{job.method} FAILED: {type(err).__name__}: {err}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Fan-out (driver side)
# ---------------------------------------------------------------------------------------------

def worker_kind(job: TrainJob) -> tuple:
    """Jobs of one kind can share workers: the same base model and the same workers."""
    cfg = TrainConfig.model_validate(job.train)
    return job.base_model, cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.max_failures


def group_jobs(jobs: list[TrainJob], slots: int) -> list[list[TrainJob]]:
    """Deal the trainable jobs of each kind into at most `slots` groups, longest first, each to the group with
    the fewest steps so far: each group is one Ray Train run whose workers load the base model once and train
    its jobs in turn.

    Dealt from every job, done or not, so that a rerun on the same cluster forms the same groups (the same
    Ray Train runs) and resumes their checkpoints; finished jobs are skipped inside the group."""
    def steps(job: TrainJob) -> int:
        return TrainConfig.model_validate(job.train).max_steps

    kinds: dict[tuple, list[TrainJob]] = {}
    for job in sorted(jobs, key=lambda j: -steps(j)):
        kinds.setdefault(worker_kind(job), []).append(job)
    groups = []
    for members in kinds.values():
        dealt: list[list[TrainJob]] = [[] for _ in range(min(slots, len(members)))]
        for job in members:
            min(dealt, key=lambda group: sum(map(steps, group))).append(job)
        groups += dealt
    return groups


def group_name(group: list[TrainJob]) -> str:
    """A one-job group keeps the job's trainer name; a larger one adds how many follow and their keys' hash."""
    first = group[0].trainer_name
    return first if len(group) == 1 else f"{first}+{len(group) - 1}-{sha256_of([j.key for j in group])[:8]}"


@ray.remote(num_cpus=0)
def fit_group(group: list[TrainJob]) -> None:
    """One Ray Train run that trains the group's jobs in turn (train_loop_per_worker), resuming its checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = TrainConfig.model_validate(group[0].train)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"jobs": [asdict(job) for job in group]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=group_name(group), storage_path=group[0].storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    ).fit()


def plan_training(run: Run) -> list[TrainJob]:
    """One job per live style and method, keyed by its curated data, settings, base model and code."""
    base = resolve_base_model(run.config.model.base, run.base_models_dir)
    jobs = []
    for style in run.live_styles():
        curated = run.curated(style.name)
        marker = curated.with_suffix(".json")
        data_key = json.loads(marker.read_text())["key"] if marker.is_file() else "missing"
        for method in style.methods(run.config):
            cfg = style.train_config(run.config, method)
            prior_dirs = [str(class_image_dir(run, r)) for r in get_method(method).class_images(style.config, cfg)]
            jobs.append(TrainJob(
                style=style.name, method=method, base_model=base, curated_path=str(curated),
                key=sha256_of(data_key, method, cfg.model_dump(), base_model_identity(base), prior_dirs,
                              code_version("train.py", "methods", "models.py", "lora.py")),
                model_dir=str(run.model_dir(style.name, method)), log_path=str(run.train_log(style.name, method)),
                storage_path=str(run.dir / "ray_train"), style_config=style.config.model_dump(), train=cfg.model_dump(),
                prior_dirs=prior_dirs, data_key=data_key))
    return jobs


def trainings_that_fit(jobs: list[TrainJob]) -> int:
    """How many trainings the cluster's current resources run at once (at least one)."""
    resources = ray.cluster_resources()
    fits = []
    for job in jobs:
        cfg = TrainConfig.model_validate(job.train)
        if cfg.gpus_per_worker:
            fits.append(resources.get("GPU", 0) // (cfg.gpus_per_worker * cfg.num_workers))
        else:
            fits.append(resources.get("CPU", 1) // (cfg.cpus_per_worker * cfg.num_workers))
    return max(1, int(min(fits, default=1)))


def train_all(jobs: list[TrainJob], max_concurrent: int | None = None) -> dict[tuple[str, str], dict]:
    """Train every job not already done, at most `max_concurrent` Ray Train runs at a time (default: as many
    as the cluster runs at once); zero-shot jobs each get a task. A failing style never stops the others.

    More runs in flight than the cluster can run would only wait, each holding a driver process's memory.
    """
    outcomes: dict[tuple[str, str], dict] = {}
    for job in jobs:
        if job.is_done():
            outcomes[(job.style, job.method)] = {"status": "reused", "model_dir": job.model_dir}
        job.error_path.unlink(missing_ok=True)  # a failure of an earlier run is tried again
    trainable = [job for job in jobs if job.load_method().trains]
    slots = max_concurrent or trainings_that_fit(jobs)  # from every job, as the groups: a rerun deals the same
    queue = [[job] for job in jobs if job not in trainable and (job.style, job.method) not in outcomes]
    queue += [group for group in group_jobs(trainable, slots) if not all(job.is_done() for job in group)]
    pending = {}
    while queue or pending:
        while queue and len(pending) < slots:
            group = queue.pop(0)
            pending[start_group(group)] = (group, time.time())
        [done], _ = ray.wait(list(pending), num_returns=1)
        group, started = pending.pop(done)
        try:
            ray.get(done)
            error = None
        except Exception as err:  # noqa: BLE001 - the group's run failed as a whole; its unfinished jobs say so
            lines = str(err).strip().splitlines()
            error = lines[-1] if lines else type(err).__name__
        for job in group:
            if (job.style, job.method) not in outcomes:
                outcomes[(job.style, job.method)] = job_outcome(job, error, time.time() - started)
    return outcomes


def start_group(group: list[TrainJob]) -> ray.ObjectRef:
    """A Ray Train run for trainable jobs; a task with one worker's resources for a zero-shot one."""
    if group[0].load_method().trains:
        print(f"[train] {group_name(group)}: {', '.join(f'{j.style}/{j.method}' for j in group)}, in turn, "
              "on workers that load the base model once", flush=True)
        return fit_group.remote(group)
    cfg = TrainConfig.model_validate(group[0].train)
    return prepare_untrained.options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker).remote(group[0])


def job_outcome(job: TrainJob, group_error: str | None, group_seconds: float) -> dict:
    """What became of a job once its group ended: its model card, the error it recorded, or the group's."""
    if job.is_done():
        card = json.loads((Path(job.model_dir) / "model_card.json").read_text())
        loss = "" if card["final_loss"] is None else f", final loss {card['final_loss']:.4f}"
        seconds = card.get("train_seconds", round(group_seconds, 1))
        print(f"[train] {job.style}/{job.method}: {card['steps']} steps{loss}, {seconds} s", flush=True)
        return {"status": "trained", "model_dir": job.model_dir, **card}
    recorded = job.error_path
    message = json.loads(recorded.read_text())["error"] if recorded.is_file() else group_error or "did not finish"
    message = explain(message, job)
    print(f"[train] {job.style}/{job.method} FAILED: {message}", flush=True)
    return {"status": "failed", "error": message}


def explain(message: str, job: TrainJob) -> str:
    """The error, plus what to change when it is one the settings can fix."""
    if "out of memory" in message.lower():
        message += (f" -- style {job.style!r} ran out of GPU memory: lower train.batch_size, set "
                    "train.mixed_precision: bf16 or train.gradient_checkpointing: true, or give each worker "
                    "a whole GPU (train.gpus_per_worker: 1)")
    return message


def train_styles(run: Run) -> dict[tuple[str, str], str]:
    """Train (or reuse) every live style x method; returns {(style, method): model folder} of the usable ones."""
    generate_class_images(run)  # the generated priors the jobs read (DreamBooth), each set once
    outcomes = train_all(plan_training(run), run.config.max_concurrent_trainings)
    trained = {}
    for (style, method), outcome in outcomes.items():
        run.record(style, f"train:{method}", "ok" if outcome["status"] == "trained" else
                   outcome["status"] if outcome["status"] == "reused" else outcome["error"])
        if outcome["status"] in ("trained", "reused"):
            trained[(style, method)] = outcome["model_dir"]
    return trained


def finished_models(run: Run) -> dict[tuple[str, str], str]:
    """The up-to-date trained models of the live styles, without training anything."""
    trained = {}
    for job in plan_training(run):
        if job.is_done():
            trained[(job.style, job.method)] = job.model_dir
        else:
            run.record(job.style, f"train:{job.method}", "not trained yet (run jobs.train)")
    return trained
