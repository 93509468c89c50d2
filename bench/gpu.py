"""`make bench-gpu`: the prepared GPU check at real model size, one command, at most 8 minutes on one H100/H200.

Random weights at the real architectures (tests/real_shapes.py: SD 1.5 at 512 px, SDXL base at 1024 px), bf16
autocast, cached latents (random latents of the right shape). In order of importance, each part skipped once the
time budget is spent (the output says which):
1. training step, ours (style_factory/loop.py `optimisation_step`, the family's denoiser) against the reference loop
   (bench/reference_loop.py, diffusers' train_dreambooth.py), images/s and their ratio, at batch 1, 4, 8 and 16
   images per step (an out-of-memory is recorded and the larger batches are not tried); full fine-tune (StyleBoost's
   parameters) and LoRA (StyleDrop's peft adapter, in both loops); torch.compile off, and on for ours (the reference
   runs as the script does, eager);
2. MFU of each: FLOPs of one image's step counted once per shape and mode (torch.utils.flop_counter), against the
   device's dense bf16 peak (bench/run.py's table, or --peak-tflops);
3. peak memory of each (torch.cuda.max_memory_allocated);
4. generation images/s at batch 1, 8 and 32, 30 DDIM steps with CFG, through the family's diffusers pipeline;
5. a warm group: 4 styles x 50 steps through the real Ray Train fan-out (`train_all`, one GPU, one group) on the
   tiny model and synthetic 64 px data: each style's wall time in the group (its model card's train_seconds)
   against its compute (the same steps timed in this process on a warm model).

Writes results/bench/<date>-gpu.json after every part (a kill keeps what was measured) and prints a table.
`--dry-run` runs the same code on CPU at the tiny presets' shapes (tiny, tiny-sdxl; 64 px, fp32), in about a minute.

    python -m bench.gpu [--dry-run] [--peak-tflops T] [--budget-s S] [--out FILE]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import io
import itertools
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import diffusers
import numpy as np
import pyarrow as pa
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.reference_loop import PRECISIONS, ReferenceLoop
from bench.run import REPO, count_flops, peak_tflops, seconds, step_compute, synthetic_style
from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import CURATED_SCHEMA, pixel_tensor
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.files import sha256_of, write_json_atomic, write_parquet_atomic
from style_factory.lora import add_lora
from style_factory.loop import apply_fast_paths, build_optimizer, optimisation_step
from style_factory.methods import get_method
from style_factory.models import resolve_base_model
from style_factory.run import shutdown_ray, start_ray
from style_factory.train import train_all
from style_factory.train_job import TrainJob
from tests.real_shapes import CLIP_BIGG, CLIP_L, SD15_UNET, SDXL_UNET

# SD 1.5's and SDXL's VAE (the same layout; SDXL's scales latents by 0.13025 and upcasts to decode in fp16)
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
BENCH_STYLE = StyleConfig(display_name="Bench", descriptor="bench style",
                          concepts=[{"token": "zwx", "class_word": "style"}])
MODES = {"full": "styleboost", "lora": "styledrop"}  # the method whose trainable parameters each mode trains


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    resolution: int
    real: bool  # the real architecture with random weights; False: the family's tiny preset


@dataclass(frozen=True)
class Plan:
    shapes: tuple[Shape, Shape]  # SD 1.x-shaped, SDXL-shaped
    batches: tuple[int, ...]  # images per training step
    compile_batches: tuple[int, ...]  # those timed with torch.compile on (each batch size is a compile); () = none
    warmup_steps: int
    timed_steps: int
    generation_batches: tuple[int, ...]
    generation_steps: int
    group_styles: int
    group_steps: int
    group_beside_parts: bool  # the warm group trains beside the parts (the dry run), else at its turn (see WarmGroup)
    budget_s: float
    reserve_s: dict  # what a part needs left in the budget to be started: its usual duration
    precision: str


GPU_PLAN = Plan(shapes=(Shape("sd15-512px", "sd1", 512, True), Shape("sdxl-1024px", "sdxl", 1024, True)),
                batches=(1, 4, 8, 16), compile_batches=(8,), warmup_steps=3, timed_steps=10,
                generation_batches=(1, 8, 32), generation_steps=30, group_styles=4, group_steps=50, group_beside_parts=False,
                budget_s=450,
                reserve_s={"train": 25, "compiled": 75, "generation": 30, "warm_group": 60}, precision="bf16")
DRY_PLAN = Plan(shapes=(Shape("tiny-sd1-64px", "sd1", 64, False), Shape("tiny-sdxl-64px", "sdxl", 64, False)),
                batches=(1, 2), compile_batches=(), warmup_steps=1, timed_steps=2, generation_batches=(1, 2),
                generation_steps=2, group_styles=2, group_steps=3, group_beside_parts=True,
                budget_s=300,
                reserve_s={"train": 0, "compiled": 0, "generation": 0, "warm_group": 0}, precision="no")


class Budget:
    def __init__(self, seconds_total: float):
        self.total, self.start = seconds_total, time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)


def build_components(shape: Shape, base_models: Path, device: torch.device) -> Components:
    """The tiny preset's components; for a real shape, its networks replaced by the real architecture with random
    weights, initialised on `device` (the preset's tokenizers and SD noise schedule are the real ones)."""
    family = get_family(shape.family)
    tiny = family.load_components(resolve_base_model(family.tiny_preset, base_models))
    if not shape.real:
        return tiny
    torch.manual_seed(0)
    with torch.device(device):
        if shape.family == "sdxl":
            return replace(tiny, unet=UNet2DConditionModel(**SDXL_UNET),
                           vae=AutoencoderKL(**SD_VAE, scaling_factor=0.13025, force_upcast=True),
                           text_encoders={"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                                          "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))},
                           frozen_prompts={}, source=f"{shape.name}, random weights")
        return replace(tiny, unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE),
                       text_encoders={"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}, frozen_prompts={},
                       source=f"{shape.name}, random weights")


def random_latent_cache(models: Components, views: int, images: int, resolution: int) -> list[torch.Tensor]:
    """A latent cache as encode_latent_cache returns it, per image (views, 2, C, h, w): random means, std 0.1."""
    side = resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)
    mean = torch.randn(views, images, 1, models.vae.config.latent_channels, side, side,
                       generator=torch.Generator().manual_seed(0))
    return list(torch.cat([mean, torch.full_like(mean, 0.1)], dim=2).unbind(1))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated since the last reset; on CPU the process's peak RSS (over its whole life)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def time_batches(step: Callable[[int], object], batches: tuple[int, ...], plan: Plan, device: torch.device,
                 budget: Budget) -> dict[int, dict]:
    """Median step time, images/s and peak memory of `step(batch)` at each batch; an out-of-memory ends the sweep."""
    results: dict[int, dict] = {}
    out_of_memory_at = None
    for batch in batches:
        if out_of_memory_at is not None:
            results[batch] = {"error": f"not tried: batch {out_of_memory_at} ran out of memory"}
            continue
        if budget.left() <= 0:
            results[batch] = {"error": "skipped: time budget spent"}
            continue
        reset_peak(device)
        try:
            for _ in range(plan.warmup_steps):
                step(batch)
            step_s = statistics.median(seconds(lambda: step(batch), device) for _ in range(plan.timed_steps))
            results[batch] = {"step_s": step_s, "images_per_s": batch / step_s,
                              "peak_memory_gb": peak_memory_gb(device)}
        except Exception as err:  # noqa: BLE001 - recorded per configuration; the sweep and the other parts go on
            out_of_memory_at = batch if is_oom(err) else None
            results[batch] = {"error": f"out of memory ({error_text(err)})" if is_oom(err) else error_text(err)}
        free_memory(device)
    return results


def train_config(plan: Plan, compiled: bool) -> TrainConfig:
    """Frozen text encoders (prompts cached), no prior term: every image of a step is a StyleRef image."""
    return TrainConfig(batch_size=1, train_text_encoder=False, prior_loss_weight=0.0,
                       mixed_precision=plan.precision, compile=compiled)


def bench_ours(shape: Shape, mode: str, compiled: bool, batches: tuple[int, ...], plan: Plan, base_models: Path,
               device: torch.device, budget: Budget) -> tuple[dict[int, dict], int | None, int]:
    """Our step, as train_job sets it up, at each batch; the FLOPs of one image's step (eager only), and the
    number of trained parameters."""
    cfg = train_config(plan, compiled)
    method = get_method(MODES[mode], BENCH_STYLE)
    data = synthetic_style(shape.resolution)
    models = build_components(shape, base_models, device)
    param_groups = method.prepare(models, cfg)
    for part in (models.vae, *models.text_encoders.values(), models.unet):
        part.to(device)
    cache = random_latent_cache(models, len(method.image_views(cfg)), len(data.images), shape.resolution)
    apply_fast_paths(models, cfg)
    optimizer = build_optimizer(param_groups, cfg, device)
    steps = itertools.count()

    def step(batch: int) -> None:
        optimisation_step(models, method, data, cache, optimizer, cfg.model_copy(update={"batch_size": batch}),
                          next(steps), 0, device)

    flops = None
    if not compiled:  # FlopCounterMode sees every operation of the eager model; a compiled one is the same math
        step(1)  # the frozen prompts are encoded and cached at the first step, as in training
        flops = count_flops(lambda: step(1), device)
    results = time_batches(step, batches, plan, device, budget)
    return results, flops, sum(p.numel() for group in param_groups for p in group["params"])


def bench_reference(shape: Shape, mode: str, plan: Plan, base_models: Path, device: torch.device,
                    budget: Budget) -> dict[int, dict]:
    """The reference loop at each batch: VAE encode and text encoders every step; LoRA as train_dreambooth_lora.py
    adds it (the UNet in the training precision, the adapter trained), with StyleDrop's adapter."""
    cfg = train_config(plan, False)
    method = get_method(MODES[mode], BENCH_STYLE)
    data = synthetic_style(shape.resolution)
    models = build_components(shape, base_models, device)
    reference = ReferenceLoop(models, cfg, device)
    if mode == "lora":
        options = method.options(cfg)
        models.unet.to(dtype=PRECISIONS.get(cfg.mixed_precision, torch.float32))
        adapter = add_lora(models.unet, options.rank, options.alpha, options.target_modules)
        reference.optimizer = torch.optim.AdamW(adapter, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(0)

    def step(batch: int) -> None:
        picked = method.sample_batch(data, cfg.model_copy(update={"batch_size": batch}), rng)
        reference.step(pixel_tensor([data.images[i] for i in picked.rows]), picked.prompts)

    return time_batches(step, plan.batches, plan, device, budget)


def bench_training(shape: Shape, mode: str, compiled: bool, plan: Plan, base_models: Path, device: torch.device,
                   budget: Budget, state: dict) -> dict:
    """One configuration: ours against the reference (measured once per shape and mode, eager) at each batch."""
    key = f"{shape.name} {mode}"
    batches = plan.compile_batches if compiled else plan.batches
    ours, flops, trained = bench_ours(shape, mode, compiled, batches, plan, base_models, device, budget)
    free_memory(device)  # our models are gone with bench_ours' frame: the reference gets the whole device
    if flops is not None:
        state["flops"][key] = flops
    if key not in state["reference"]:
        state["reference"][key] = bench_reference(shape, mode, plan, base_models, device, budget)
        free_memory(device)
    reference, flops = state["reference"][key], state["flops"].get(key)
    rows = []
    for batch in batches:
        row = {"batch": batch, "ours": ours[batch], "reference": reference[batch]}
        if "images_per_s" in ours[batch] and "images_per_s" in reference[batch]:
            row["ratio"] = ours[batch]["images_per_s"] / reference[batch]["images_per_s"]
        if flops is not None and "images_per_s" in ours[batch]:
            row["achieved_tflops"] = flops * ours[batch]["images_per_s"] / 1e12
            if state["peak_tflops"]:
                row["mfu"] = row["achieved_tflops"] / state["peak_tflops"]
        rows.append(row)
    return {"shape": shape.name, "family": shape.family, "resolution": shape.resolution, "mode": mode,
            "method": MODES[mode], "compile": compiled, "reference_compile": False, "precision": plan.precision,
            "trained_parameters": trained, "step_tflop_per_image": None if flops is None else flops / 1e12,
            "batches": rows}


def bench_generation(shape: Shape, plan: Plan, base_models: Path, device: torch.device, budget: Budget) -> dict:
    """Images/s of the family's pipeline (DDIM, CFG 5) at each batch, decoding included; one warm-up call first."""
    models = build_components(shape, base_models, device)
    pipe = models.family.pipeline(models, DDIMScheduler.from_config(models.noise_scheduler.config))
    pipe.to(device, PRECISIONS.get(plan.precision, torch.float32))
    pipe.set_progress_bar_config(disable=True)

    def generate(batch: int, steps: int) -> None:
        pipe([f"a picture number {i}" for i in range(batch)], num_inference_steps=steps, guidance_scale=5.0,
             height=shape.resolution, width=shape.resolution, generator=torch.Generator(device).manual_seed(0))

    generate(1, 2)
    rows = []
    for batch in plan.generation_batches:
        if budget.left() <= 0:
            rows.append({"batch": batch, "error": "skipped: time budget spent"})
            continue
        reset_peak(device)
        try:
            elapsed = seconds(lambda: generate(batch, plan.generation_steps), device)
            rows.append({"batch": batch, "seconds": elapsed, "images_per_s": batch / elapsed,
                         "peak_memory_gb": peak_memory_gb(device)})
        except Exception as err:  # noqa: BLE001 - recorded per batch
            rows.append({"batch": batch, "error": error_text(err)})
            free_memory(device)
    return {"shape": shape.name, "family": shape.family, "resolution": shape.resolution,
            "inference_steps": plan.generation_steps, "guidance_scale": 5.0, "precision": plan.precision,
            "batches": rows}


def synthetic_curated(path: Path, seed: int, resolution: int, images: int = 16) -> Path:
    """A curated table (curate.py's schema) of random images, half StyleRef and half Aux."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buffer, "PNG")
        rows.append({"style": path.stem, "role": "ref" if i < images // 2 else "aux", "concept": 0, "token": "zwx",
                     "class_word": "style", "caption": f"a picture number {i}", "caption_source": "bench",
                     "image": buffer.getvalue(), "width": resolution, "height": resolution,
                     "original_width": resolution, "original_height": resolution, "crop_left": 0, "crop_top": 0,
                     "content_hash": hashlib.sha256(buffer.getvalue()).hexdigest(), "source_path": f"{i}.png"})
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), path)
    return path


class WarmGroup:
    """The warm group's jobs (`group_styles` styles x `group_steps` steps through train_all as one group: the one GPU,
    or one CPU) and its Ray, started in a background thread as the check starts, so that a local instance's start-up
    (its processes, a few seconds of CPU) overlaps the parts before it: on a GPU host's many cores this costs the GPU
    parts nothing measurable, and the first timed step comes after the first part's model build anyway.

    The same thread runs train_all once `go` is called: on a GPU at the warm group's turn, after the parts before it
    (nothing of the group trains while another part is timed; its start-up and every style's wall are timed from
    there); in the dry run at once (`Plan.group_beside_parts`), so Ray Train's start-up and the group's CPU steps run
    on the second core beside the single-threaded parts: the dry run's figures prove the code, they measure nothing."""

    def __init__(self, plan: Plan, workdir: Path, base_models: Path, device: torch.device):
        self.plan, self.device = plan, device
        self.gpus = 1 if device.type == "cuda" else 0
        self.cfg = TrainConfig(max_steps=plan.group_steps, checkpoint_every=plan.group_steps, batch_size=2,
                               mixed_precision=plan.precision, gpus_per_worker=self.gpus, cpus_per_worker=1)
        base = resolve_base_model("tiny", base_models)
        self.jobs = []
        for i in range(plan.group_styles):
            style = f"bench-{i}"
            curated = synthetic_curated(workdir / "curated" / f"{style}.parquet", i, resolution=64)
            self.jobs.append(TrainJob(
                style=style, method="styleboost", family="sd1", base_model=base, curated_path=str(curated),
                key=sha256_of("bench-gpu", style, self.cfg.model_dump(), time.time()),
                model_dir=str(workdir / "models" / style), log_path=str(workdir / "logs" / f"{style}.jsonl"),
                storage_path=str(workdir / "ray_train"), style_config=BENCH_STYLE.model_dump(),
                train=self.cfg.model_dump(), data_key=style))
        self.started, self.cancelled = threading.Event(), False
        self.ray_start_s = self.group_s = self.outcomes = self.error = None
        self.stop_ray = False
        self.thread = threading.Thread(target=self._run, name="warm-group", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            start = time.perf_counter()
            self.stop_ray = start_ray()
            self.ray_start_s = time.perf_counter() - start if self.stop_ray else None  # None: Ray was running
            self.started.wait()
            if not self.cancelled:
                start = time.perf_counter()
                self.outcomes = train_all(self.jobs, max_concurrent=1)
                self.group_s = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - reported as the warm group's error by `result`
            self.error = err

    def go(self) -> None:
        self.started.set()

    def result(self) -> dict:
        """Each style's wall time inside the warm group against its compute (its steps timed in this process on a
        warm model, before the group trains on a GPU), and the group's wall against the sum."""
        compute = None
        if not self.started.is_set():
            compute = {job.style: step_compute(job, self.device, self.plan.warmup_steps) for job in self.jobs}
            free_memory(self.device)
            self.go()
        waited = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - waited
        self.close()
        if self.error is not None:
            raise self.error
        if compute is None:  # the group ran beside the parts: its compute is timed once it is done
            compute = {job.style: step_compute(job, self.device, self.plan.warmup_steps) for job in self.jobs}
        styles = []
        for job in self.jobs:
            outcome = self.outcomes[(job.style, job.method)]
            if outcome["status"] != "trained":
                styles.append({"style": job.style, "error": outcome.get("error", outcome["status"])})
                continue
            wall = outcome["train_seconds"]
            styles.append({"style": job.style, "wall_s": wall, "compute_s": compute[job.style],
                           "wall_over_compute": wall / compute[job.style]})
        plan, cfg = self.plan, self.cfg
        return {"how": "Ray Train fan-out (train_all), one group trained in turn on warm workers", "model": "tiny",
                "resolution": 64, "steps": plan.group_steps, "batch_size": cfg.batch_size,
                "gpus_per_worker": self.gpus, "precision": plan.precision,
                "beside_parts": plan.group_beside_parts, "ray_start_s": self.ray_start_s,
                "waited_s": waited, "group_wall_s": self.group_s, "compute_s": sum(compute.values()),
                "group_wall_over_compute": self.group_s / sum(compute.values()), "styles": styles}

    def close(self) -> None:
        """Stop the group's Ray (a group the budget skipped never trains)."""
        self.cancelled = True
        self.go()
        self.thread.join()
        if self.stop_ray:
            self.stop_ray = False
            shutdown_ray()


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def parts(plan: Plan) -> list[tuple[str, str, str]]:
    """(part, what, budget class) in order of importance: what runs first when the budget is short."""
    sd, xl = (shape.name for shape in plan.shapes)
    order = [("training", f"{sd} full eager", "train"), ("training", f"{sd} full compiled", "compiled"),
             ("training", f"{xl} full eager", "train"), ("generation", sd, "generation"),
             ("generation", xl, "generation"),
             ("warm_group", f"{plan.group_styles} styles x {plan.group_steps} steps", "warm_group"),
             ("training", f"{sd} lora eager", "train"), ("training", f"{xl} lora eager", "train"),
             ("training", f"{sd} lora compiled", "compiled"), ("training", f"{xl} full compiled", "compiled"),
             ("training", f"{xl} lora compiled", "compiled")]
    if plan.group_beside_parts:  # it trains from the start, beside the others: its figures are collected last
        order.sort(key=lambda entry: entry[0] == "warm_group")
    return order


def run_part(part: str, what: str, plan: Plan, workdir: Path, device: torch.device, budget: Budget,
             state: dict) -> dict:
    shapes = {shape.name: shape for shape in plan.shapes}
    base_models = workdir / "base-models"
    if part == "training":
        shape, mode, compiled = what.split()
        return bench_training(shapes[shape], mode, compiled == "compiled", plan, base_models, device, budget, state)
    if part == "generation":
        return bench_generation(shapes[what], plan, base_models, device, budget)
    return state["warm_group"].result()


def table(results: dict) -> str:
    lines = [f"Style Factory GPU check, {results['date']}, {results['device']}, torch {results['torch']}, "
             f"peak {results['peak_bf16_tflops']} TFLOP/s ({results['peak_source']})"]
    lines.append(f"{'training (images/step)':44s}{'ours img/s':>11s}{'ref img/s':>11s}{'ratio':>7s}{'TFLOP/s':>9s}"
                 f"{'MFU':>7s}{'mem GB':>8s}")
    for t in results["training"]:
        if "error" in t:
            lines.append(f"{t['what']:44s} {t['error']}")
            continue
        for row in t["batches"]:
            name = f"{t['shape']} {t['mode']} {'compiled' if t['compile'] else 'eager'} b{row['batch']}"
            ours, ref = row["ours"], row["reference"]
            if "error" in ours:
                lines.append(f"{name:44s} {ours['error']}")
                continue
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
            reference = f"{ref['images_per_s']:11.2f}{row['ratio']:6.2f}x" if "ratio" in row else f"{'-':>11s}{'':7s}"
            lines.append(f"{name:44s}{ours['images_per_s']:11.2f}{reference}"
                         f"{row.get('achieved_tflops', float('nan')):9.3g}{mfu:>7s}{ours['peak_memory_gb']:8.1f}"
                         + ("" if "ratio" in row else f"  reference: {ref['error']}"))
    for g in results["generation"]:
        if "error" in g:
            lines.append(f"generation {g['what']:33s} {g['error']}")
            continue
        for row in g["batches"]:
            name = f"generate {g['shape']} b{row['batch']}, {g['inference_steps']} steps CFG"
            lines.append(f"{name:44s} {row['error']}" if "error" in row else
                         f"{name:44s}{row['images_per_s']:11.2f}{'':34s}{row['peak_memory_gb']:8.1f}")
    group = results.get("warm_group")
    if group and "error" in group:
        lines.append(f"warm group: {group['error']}")
    elif group:
        lines.append(f"warm group, {len(group['styles'])} styles x {group['steps']} steps ({group['how']}): "
                     f"group wall {group['group_wall_s']:.1f} s over compute {group['compute_s']:.1f} s = "
                     f"{group['group_wall_over_compute']:.2f}x")
        for s in group["styles"]:
            lines.append(f"  {s['style']}: {s['error']}" if "error" in s else
                         f"  {s['style']}: wall {s['wall_s']:.1f} s, compute {s['compute_s']:.2f} s, "
                         f"{s['wall_over_compute']:.2f}x")
    for skipped in results["skipped"]:
        lines.append(f"skipped: {skipped['part']} {skipped['what']} ({skipped['reason']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU at the tiny presets' shapes")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, where the table lacks it")
    parser.add_argument("--budget-s", type=float, help="time budget in seconds (default: 450 on GPU, 300 dry)")
    parser.add_argument("--out", type=Path, help="the JSON file (default results/bench/<date>-gpu.json)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here, nothing measured. Run it on a GPU machine; "
              "`python -m bench.gpu --dry-run` runs the same code on CPU at tiny shapes.")
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget_s is not None:
        plan = replace(plan, budget_s=args.budget_s)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:  # its figures prove the code, they measure nothing: one thread stays quick on a shared CPU
        torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    table_peak = peak_tflops(device)
    peak = args.peak_tflops or table_peak
    started = time.localtime()
    suffix = "-gpu-dry-run" if args.dry_run else "-gpu"
    out = args.out or REPO / "results" / "bench" / f"{time.strftime('%Y-%m-%d_%H%M%S', started)}{suffix}.json"
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M", started), "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": version("peft"), "ray": version("ray"), "git_commit": git_commit(), "command": " ".join(sys.argv),
        "peak_bf16_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else
        "device table" if table_peak else "unknown: pass --peak-tflops for MFU",
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
        "process peak RSS (CPU: over the whole run, not per configuration)",
        "budget_s": plan.budget_s, "plan": {k: v for k, v in vars(plan).items() if k not in ("shapes", "reserve_s")},
        "shapes": [vars(shape) for shape in plan.shapes], "training": [], "generation": [], "warm_group": None,
        "skipped": [],
    }
    print(f"[bench-gpu] {results['device']}: peak {peak} TFLOP/s ({results['peak_source']}); budget "
          f"{plan.budget_s:.0f} s; writing {out}", flush=True)
    budget = Budget(plan.budget_s)
    state = {"flops": {}, "reference": {}, "peak_tflops": peak}
    with tempfile.TemporaryDirectory(prefix="style-factory-bench-gpu-") as tmp:
        if budget.left() >= max(plan.reserve_s["warm_group"], 1e-9):  # see WarmGroup: Ray starts in the background
            state["warm_group"] = WarmGroup(plan, Path(tmp), Path(tmp) / "base-models", device)
            if plan.group_beside_parts:
                state["warm_group"].go()
        try:
            run_parts(plan, Path(tmp), device, budget, state, results, out)
        finally:
            if "warm_group" in state:
                state["warm_group"].close()
    print("\n" + table(results))
    print(f"\nwritten {out}")
    return 0


def run_parts(plan: Plan, workdir: Path, device: torch.device, budget: Budget, state: dict, results: dict,
              out: Path) -> None:
    """Each part in order of importance, skipped when the budget is spent; the JSON written after each."""
    for part, what, cost in parts(plan):
        if cost == "compiled" and not plan.compile_batches:
            results["skipped"].append({"part": part, "what": what, "reason": "no compile in the dry run: an "
                                       "inductor compile takes minutes on CPU"})
        elif budget.left() < max(plan.reserve_s[cost], 1e-9):
            results["skipped"].append({"part": part, "what": what, "reason": "time budget spent"})
            print(f"[bench-gpu] skipped {part} {what}: time budget spent", flush=True)
        else:
            print(f"[bench-gpu] {part} {what} ({budget.left():.0f} s left)", flush=True)
            try:
                record = run_part(part, what, plan, workdir, device, budget, state)
            except Exception as err:  # noqa: BLE001 - one failing part keeps the others
                record = {"what": what, "error": error_text(err)}
                print(f"[bench-gpu] {part} {what} FAILED: {record['error']}", flush=True)
            free_memory(device)
            if part == "warm_group":
                results["warm_group"] = record
            else:
                results[part].append({"what": what, **record})
        results["elapsed_s"] = plan.budget_s - budget.left()
        write_json_atomic(out, results)


if __name__ == "__main__":
    raise SystemExit(main())
