"""`make bench`: how fast the pipeline is, every figure a ratio against a reference measured in the same run.

1. Training step: ours (cached latents and prompts, the shared `optimisation_step`) against a diffusers-style
   loop (bench/reference_loop.py), same model, batch and resolution; and the pipeline's overhead, our step
   against a bare UNet fwd+bwd+optimizer step on the same inputs.
2. FLOPs of a UNet fwd+bwd (FlopCounterMode, once per shape) over the step times: achieved TFLOP/s, and on a
   GPU the model-FLOPs utilisation against the device's peak.
3. Fan-out: N styles through `train_all` on local Ray, two or more per (warm) worker, against N x one style
   alone divided by the number of workers: above 1.0 when warm workers save more than concurrency costs.
4. Curation: Ray Data's `decode_all` against the same decoding in one process, over the example StyleRef
   images as 1024 px JPEGs (to 512 px), once and four times: each one's fixed cost per pass and rate per image.
5. Evaluation: generated images/s (8 prompts x 2 seeds, 20 steps, tiny pipeline) and features/s
   (the toy backbone).
6. Where the default run's time goes: the timings.json its last command wrote (Ray start, curation, each training
   group's start-up and its jobs in the warm worker, sampling, reference PNGs, scoring, report, Ray stop), against its
   compute timed here on one thread (its training steps, sampled images and features): the whole run over its compute.

The tiny preset at 64 px (bf16 on CUDA; the GPU check at real model size is `python -m bench.gpu`).
Prints a table and writes results/bench/<date>.json.

    python -m bench.run [--set KEY=VALUE ...]   # train options for "ours", e.g. --set compile=true
    python -m bench.run --breakdown-only [--run-dir results/tiny-demo]   # part 6 alone
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import ray
import torch
import torch.nn.functional as F
import transformers
import yaml
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.reference_loop import PRECISIONS, ReferenceLoop
from style_factory.backbones import toy_clip, toy_inception
from style_factory.config import CurateConfig, RunConfig, StyleConfig, TrainConfig, load_styles
from style_factory.curate import curate_styles, decode_all, list_candidates
from style_factory.decode import DecodeBatch
from style_factory.data import StyleData, pixel_tensor
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.generate import TOY_PROMPTS
from style_factory.methods import get_method
from style_factory.models import resolve_base_model
from style_factory.export import load_method
from style_factory.files import read_json
from style_factory.run import REGISTRY, TIMINGS_FILE, Run, start_ray
from style_factory.sampling import SAMPLES_MARKER, SampleJob, batch_size_for, generate_images
from style_factory.loop import (apply_fast_paths, build_optimizer, encode_latent_cache, optimisation_step, sample_latents,
                           step_generator)
from style_factory.train import plan_training, train_all
from style_factory.train_job import MODEL_CARD, TrainJob

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 3
ROUNDS, STEPS_PER_ROUND = 10, 4  # the loops take turns, so load from other processes hits all of them alike
FAN_OUT_STEPS = 10
BREAKDOWN_STEPS = 5  # steps timed per distinct training setup of the run whose time is broken down
# Dense bf16 tensor-core peaks, TFLOP/s, by a part of torch.cuda.get_device_name(); the first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L40", 181),
                    ("L4", 121), ("RTX 4090", 165)]


@dataclass
class Setup:
    """A model to time the training step on, and the inputs it is trained at."""

    name: str
    build: Callable[[], Components]  # a fresh copy, bitwise the same weights every call
    resolution: int
    mixed_precision: str


def synthetic_style(resolution: int, images: int = 16) -> StyleData:
    """One concept, half StyleRef and half Aux images of random pixels, each with its own caption."""
    pixels = np.random.default_rng(0).integers(0, 256, (images, resolution, resolution, 3), dtype=np.uint8)
    return StyleData(images=list(pixels), roles=np.repeat(["ref", "aux"], images // 2), concepts=np.zeros(images, int),
                     captions=[f"a picture number {i}" for i in range(images)], tokens=["zwx"] * images,
                     class_words=["style"] * images)


def autocast(cfg: TrainConfig, device: torch.device):
    precision = PRECISIONS.get(cfg.mixed_precision)
    return torch.autocast(device.type, dtype=precision) if precision else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(step: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def count_flops(step: Callable[[], object], device: torch.device) -> int:
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for the CPU SDPA kernel; the math backend is counted as the matmuls it is.
    with counter, sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext():
        step()
    return counter.get_total_flops()


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def warm_setup(models, method, data, cfg: TrainConfig, device: torch.device):
    """The latent cache and optimiser of `models` set up for `method`, as train_loop_per_worker sets them up."""
    param_groups = method.prepare(models, cfg)
    for part in (models.vae, *models.text_encoders.values(), models.unet):
        part.to(device)
    cache = encode_latent_cache(models.vae, data.images, method.image_views(cfg))
    apply_fast_paths(models, cfg)
    return cache, build_optimizer(param_groups, cfg, device)


def bench_training(setup: Setup, overrides: dict, device: torch.device) -> dict:
    """Median step times of our step, the reference step and a bare UNet step, taking turns."""
    cfg = TrainConfig(**{"batch_size": 2, "train_text_encoder": False, "mixed_precision": setup.mixed_precision,
                         **overrides})
    data = synthetic_style(setup.resolution)
    method = get_method("styleboost")

    ours = setup.build()
    cache, optimizer = warm_setup(ours, method, data, cfg, device)
    reference = ReferenceLoop(setup.build(), cfg, device)

    # The bare step's inputs: one batch of our noisy latents, timesteps and prompt embeddings.
    rng, generator = step_generator(cfg.seed, 0, 0)
    batch = method.sample_batch(data, cfg, rng)
    latents = sample_latents(cache, batch.rows, np.zeros(len(batch.rows), int), ours.vae.config.scaling_factor,
                             generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, ours.noise_scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator).to(device)
    noisy = ours.noise_scheduler.add_noise(latents, noise, timesteps)
    with autocast(cfg, device):
        text = ours.family.encode_prompts(ours, batch.prompts, device).hidden_states

    def unet_fwd_bwd(unet: torch.nn.Module) -> None:
        with autocast(cfg, device):
            prediction = unet(noisy, timesteps, text).sample
        F.mse_loss(prediction.float(), noise).backward()

    def bare_step() -> None:
        unet_fwd_bwd(ours.unet)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    our_steps, reference_steps = itertools.count(), itertools.count()

    def our_step() -> None:
        optimisation_step(ours, method, data, cache, optimizer, cfg, next(our_steps), 0, device)

    def reference_step() -> None:
        picked = method.sample_batch(data, cfg, step_generator(cfg.seed, next(reference_steps), 0)[0])
        reference.step(pixel_tensor([data.images[i] for i in picked.rows]), picked.prompts)

    # FLOPs on the reference's models: never compiled, so FlopCounterMode sees every operation.
    unet_flops = count_flops(lambda: unet_fwd_bwd(reference.models.unet), device)
    reference.optimizer.zero_grad(set_to_none=True)
    reference_flops = count_flops(reference_step, device)

    loops = {"ours": our_step, "reference": reference_step, "bare": bare_step}
    for step in loops.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(ROUNDS):
        for name, step in loops.items():
            times[name] += [seconds(step, device) for _ in range(STEPS_PER_ROUND)]
    step_s = {name: statistics.median(t) for name, t in times.items()}

    images = len(batch.rows)
    achieved = {name: unet_flops / step_s[name] / 1e12 for name in ("ours", "reference")}
    peak = peak_tflops(device)
    return {
        "setup": setup.name, "resolution": setup.resolution, "images_per_step": images,
        "train": {k: getattr(cfg, k) for k in ("mixed_precision", "optimizer", "gradient_checkpointing",
                                                "channels_last", "compile", "train_text_encoder")},
        "step_s": step_s, "steps_timed": ROUNDS * STEPS_PER_ROUND,
        "images_per_s": {name: images / step_s[name] for name in ("ours", "reference")},
        "speedup": step_s["reference"] / step_s["ours"],
        "overhead_pct_of_step": 100 * (step_s["ours"] - step_s["bare"]) / step_s["ours"],
        "unet_fwd_bwd_tflop_per_step": unet_flops / 1e12, "reference_step_tflop": reference_flops / 1e12,
        "achieved_tflops": achieved, "peak_bf16_tflops": peak,
        "mfu": {name: value / peak for name, value in achieved.items()} if peak else None,
    }


def bench_fan_out(workdir: Path, styles: list[str], workers: int) -> dict:
    """Wall time of len(styles) styles through train_all on `workers` concurrent trainings (so each worker
    trains several styles in turn, warm) against len(styles) x the time of the first style alone: the time
    cold one-style runs would take if they ran perfectly in parallel."""
    train = TrainConfig(max_steps=FAN_OUT_STEPS, checkpoint_every=FAN_OUT_STEPS, batch_size=2, cpus_per_worker=1)
    config = RunConfig(name="fan-out", results_dir=str(workdir), styles_dir=str(REPO / "styles"), styles=styles,
                       methods=["styleboost"], baselines=[], train=train)
    run = Run(config=config, styles=load_styles(config, REGISTRY))
    curate_styles(run)
    jobs = [replace(job, train=train.model_dump()) for job in plan_training(run)]  # not the styles' own steps

    def wall_time(jobs: list, folder: str, concurrent: int) -> float:
        out = workdir / folder  # fresh model folders and checkpoints: nothing is reused or resumed
        fresh = [replace(job, model_dir=str(out / job.style), log_path=str(out / f"{job.style}.jsonl"),
                         storage_path=str(out / "ray_train")) for job in jobs]
        start = time.perf_counter()
        outcomes = train_all(fresh, max_concurrent=concurrent)
        failed = {key: o["error"] for key, o in outcomes.items() if o["status"] != "trained"}
        if failed:
            raise RuntimeError(f"fan-out training failed: {failed}")
        return time.perf_counter() - start

    # Alone first: each run then starts one Ray worker process cold (its imports), as the pipeline's one run does.
    alone = wall_time(jobs[:1], "alone", 1)
    together = wall_time(jobs, "together", workers)
    return {"styles": len(jobs), "steps": FAN_OUT_STEPS, "concurrent_workers": workers, "together_s": together,
            "one_alone_s": alone, "efficiency": len(jobs) * alone / (together * workers)}


def bench_curation(workdir: Path, resolution: int, repeats: int = 4) -> dict:
    """decode_all (Ray Data) against the same DecodeBatch function in one process, over a folder of photo-sized
    JPEGs (the example StyleRef images at 1024 px) once and `repeats` times: the difference gives each one's
    fixed cost per pass and its rate per image."""
    config = RunConfig(styles_dir=str(REPO / "styles"))
    folder = workdir / "curation"
    folder.mkdir()
    paths = []
    for style in load_styles(config, REGISTRY):
        for candidate in list_candidates(style):
            if candidate.role == "ref" and not candidate.rejected:
                paths.append(folder / f"{style.name}-{candidate.path.stem}.jpg")
                Image.open(candidate.path).convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC) \
                    .save(paths[-1], quality=92)
    cfg = CurateConfig()
    decode_one_process = DecodeBatch(cfg.model_dump(), resolution)
    timed = {"ray_data": lambda batch: decode_all(batch, cfg, resolution),
             "one_process": lambda batch: decode_one_process({"path": np.array([str(p) for p in batch])})}
    figures = {}
    for name, decode in timed.items():
        small = seconds(lambda: decode(paths), torch.device("cpu"))
        large = seconds(lambda: decode(paths * repeats), torch.device("cpu"))
        rate = (repeats - 1) * len(paths) / (large - small)
        figures[name] = {"images_per_s": rate, "fixed_s": max(0.0, small - len(paths) / rate),
                         f"{len(paths)}_images_s": small, f"{repeats * len(paths)}_images_s": large}
    return {"images": len(paths), "source_px": 1024, "resolution": resolution, "repeats": repeats, **figures,
            "speedup": figures["ray_data"]["images_per_s"] / figures["one_process"]["images_per_s"]}


def bench_evaluation(workdir: Path, base_model: str, device: torch.device) -> dict:
    """A third of one model's default evaluation set through generate_images, then features of those images."""
    seeds, steps = [0, 1], 20
    job = SampleJob(style="bench", method="base", family="sd1", base_model=base_model, model_dir="",
                    prompts=TOY_PROMPTS[:8],
                    seeds=seeds, out_dir=str(workdir / "samples"), key="bench", resolution=64,
                    num_inference_steps=steps, guidance_scale=5.0)
    start = time.perf_counter()
    # loading the pipeline and writing the PNGs included, as in the stage
    generate_images(job, get_family("sd1").load_pipeline(base_model, str(device)), batch_size_for("auto", str(device)))
    generate_s = time.perf_counter() - start
    images = [Image.open(path).convert("RGB") for path in sorted((workdir / "samples").glob("*.png"))]
    inception, clip = toy_inception(str(device)), toy_clip(str(device))
    embedders = {"inception": inception.embed, "clip": clip.embed_images}
    feature_images = images * 4  # two batches of 32
    features_s = {}
    for name, embed in embedders.items():
        embed(images[:2])  # warm-up: first-call allocations
        features_s[name] = seconds(lambda: embed(feature_images), device)
    return {"images": len(images), "inference_steps": steps, "generate_s": generate_s,
            "generated_images_per_s": len(images) / generate_s, "feature_images": len(feature_images),
            "feature_images_per_s": {name: len(feature_images) / s for name, s in features_s.items()}}


def step_compute(job: TrainJob, device: torch.device, warmup_steps: int) -> float:
    """The seconds `job`'s steps take in this process on a warm model, set up as train_job sets it up (on CPU with
    the worker's threads: one per `cpus_per_worker`)."""
    cfg = TrainConfig.model_validate(job.train)
    method, data = load_method(job), job.load_data()
    models = get_family(job.family).load_components(job.base_model)
    torch.manual_seed(cfg.seed)
    cache, optimizer = warm_setup(models, method, data, cfg, device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    try:
        for step in range(warmup_steps):
            optimisation_step(models, method, data, cache, optimizer, cfg, step, 0, device)
        return sum(seconds(lambda: optimisation_step(models, method, data, cache, optimizer, cfg, step, 0, device),
                           device) for step in range(cfg.max_steps))
    finally:
        torch.set_num_threads(threads)


def run_compute(run_dir: Path, jobs: list[dict], samples: dict, images: dict[str, int]) -> dict:
    """The run's compute, timed here on one thread (as each of its workers and actors runs): every trained job's
    steps (its method and train settings on its curated data, BREAKDOWN_STEPS of them, scaled to its steps), its
    sampled images (the samples' protocol) and the features of every scored image (the toy backbones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    try:
        step_s: dict[str, float] = {}
        train_s = 0.0
        for timing in jobs:
            card = read_json(Path(timing["model_dir"]) / MODEL_CARD)
            settings = json.dumps([card["method"], {**card["train"], "max_steps": 0}], sort_keys=True)
            if settings not in step_s:
                style = StyleConfig(display_name=card["style"], descriptor=card["style"],
                                    concepts=[{"token": t, "class_word": "style"} for t in card["tokens"]])
                job = TrainJob(style=card["style"], method=card["method"], family=card["family"], key="bench",
                               base_model=card["base_model"], model_dir="", log_path="", storage_path="",
                               curated_path=str(run_dir / "curated" / card["data"]["file"]),
                               style_config=style.model_dump(), train={**card["train"], "max_steps": BREAKDOWN_STEPS})
                step_s[settings] = step_compute(job, cpu, warmup_steps=1) / BREAKDOWN_STEPS
            train_s += timing["steps"] * step_s[settings]
        pipe = get_family(samples["family"]).load_pipeline(samples["base_model"])
        batch = len(samples["seeds"])
        sample_s = seconds(lambda: pipe(TOY_PROMPTS[:batch], num_inference_steps=samples["num_inference_steps"],
                                        guidance_scale=samples["guidance_scale"], height=samples["resolution"],
                                        width=samples["resolution"]), cpu) / batch
        pictures = [Image.new("RGB", (samples["resolution"],) * 2, (i, 128, 255 - i)) for i in range(32)]
        feature_s = 0.0
        for embed in (toy_inception("cpu").embed, toy_clip("cpu").embed_images):
            embed(pictures[:2])
            feature_s += seconds(lambda: embed(pictures), cpu) / len(pictures)
    finally:
        torch.set_num_threads(threads)
    return {"training_steps": train_s, "sampling": images["sampled"] * sample_s,
            "features": (images["sampled"] + images["reference"]) * feature_s,
            "step_s": list(step_s.values()), "sample_s_per_image": sample_s, "feature_s_per_image": feature_s}


def default_run_breakdown(run_dir: Path) -> dict | None:
    """Where a run's wall time went, from the timings.json its last command wrote (style_factory/run.py `Run.timed`), its
    model cards and samples, against its compute (run_compute). None when the folder has no timings."""
    timings = read_json(run_dir / TIMINGS_FILE)
    if not timings:
        return None
    spans = timings["spans"]

    def total(what: str) -> float:
        return sum(span["seconds"] for span in spans if span["what"] == what)

    def start(what: str) -> float | None:
        return min((span["start"] for span in spans if span["what"] == what), default=None)

    def end(what: str) -> float | None:
        return max((span["start"] + span["seconds"] for span in spans if span["what"] == what), default=None)

    jobs = [span for span in spans if span["what"] == "train job" and span["steps"]]
    zero_shot = {span["job"]: span["group_seconds"] for span in spans if span["what"] == "train job"
                 and not span["steps"]}  # each prepared in a Ray task of its own
    groups = {}
    for job in jobs:
        group = groups.setdefault(job["group"], {"wall_s": job["group_seconds"], "jobs_s": 0.0, "jobs": 0})
        group["jobs_s"] += job["seconds"]
        group["jobs"] += 1
    for group in groups.values():  # the Ray Train run's start-up, its worker process and the base model's load
        group["start_up_s"] = group["wall_s"] - group["jobs_s"]
    sampled = [d for d in (run_dir / "samples").glob("*/*") if d.is_dir() and d.name not in ("ref", "heldout")]
    images = {"sampled": sum(len(list(d.glob("p*.png"))) for d in sampled),
              "reference": sum(len(list(d.glob("*.png"))) for d in (run_dir / "samples").glob("*/ref"))}
    samples = next((read_json(d / SAMPLES_MARKER) for d in sampled if (d / SAMPLES_MARKER).is_file()), None)
    first_stage = start("class images") or start("train") or start("sample")
    phases = {
        "python start-up, imports, config checks": start("ray start") - timings["process_start"],
        "ray start": total("ray start"),
        "curation (Ray Data)": first_stage - end("ray start") if first_stage else 0.0,
        "class images": total("class images"),
        "training (Ray Train groups, concurrent)": total("train"),
        "sampling (Ray Data actors: start-up, model loads, sampling, PNG writes)": total("sample"),
        "reference PNG writes": total("reference PNGs"),
        "scoring (a Ray task: start-up, backbone loads, features, metrics)": total("score"),
        "results, report, summary": (start("ray stop") or timings["end"]) - (end("score") or end("train") or 0.0),
        "ray stop": total("ray stop"),
    }
    wall = timings["end"] - timings["process_start"]
    compute = run_compute(run_dir, jobs, samples, images) if jobs and samples else None
    slots = max(1, len(groups))
    result = {"run_dir": str(run_dir), "command": timings["command"], "wall_s": wall, "phases_s": phases,
              "groups": groups, "zero_shot_tasks_s": zero_shot, "images": images, "compute_s": compute, "concurrent_slots": slots}
    if compute:
        compute_total = compute["training_steps"] + compute["sampling"] + compute["features"]
        result["compute_total_s"] = compute_total
        result["wall_over_compute"] = wall / (compute_total / slots)
    return result


def breakdown_table(b: dict) -> str:
    lines = [f"Where the run's wall time goes: {b['run_dir']} ({b['command']})",
             f"  {'whole command':72s}{b['wall_s']:8.1f} s"]
    lines += [f"  {name:72s}{seconds:8.1f} s" for name, seconds in b["phases_s"].items()]
    for name, group in b["groups"].items():
        lines.append(f"    group {name[:40]}: wall {group['wall_s']:.1f} s = start-up {group['start_up_s']:.1f} s "
                     f"+ {group['jobs']} job(s) in the warm worker {group['jobs_s']:.1f} s")
    for name, seconds in b["zero_shot_tasks_s"].items():
        lines.append(f"    zero-shot {name}: its Ray task {seconds:.1f} s")
    c = b["compute_s"]
    if c:
        lines += [f"  compute, timed here on one thread: training steps {c['training_steps']:.1f} s, sampling "
                  f"{c['sampling']:.1f} s ({b['images']['sampled']} images), features {c['features']:.1f} s",
                  f"  whole command over its compute spread over {b['concurrent_slots']} slots: "
                  f"{b['wall_over_compute']:.2f}x"]
    return "\n".join(lines)


def print_breakdown(run_dir: Path) -> dict | None:
    breakdown = default_run_breakdown(run_dir)
    print("\n" + (breakdown_table(breakdown) if breakdown else
                  f"No timings.json in {run_dir}: run `make all-styles` first for the default run's breakdown."))
    return breakdown


def table(results: dict) -> str:
    rows = [("", "ours", "reference", "ratio")]
    for t in results["training"]:
        ours, ref = t["images_per_s"]["ours"], t["images_per_s"]["reference"]
        rows += [
            (f"train {t['setup']}, {t['images_per_step']} img/step, "
             f"{t['train']['mixed_precision'].replace('no', 'fp32')} (img/s)",
             f"{ours:.1f}", f"{ref:.1f}", f"{t['speedup']:.2f}x"),
            (f"  step time, s (median of {t['steps_timed']})", f"{t['step_s']['ours']:.4f}",
             f"{t['step_s']['reference']:.4f}", ""),
            (f"  overhead over a bare UNet step ({t['step_s']['bare']:.4f} s)",
             f"{t['overhead_pct_of_step']:.1f}%", "", ""),
            (f"  achieved TFLOP/s ({t['unet_fwd_bwd_tflop_per_step']:.3g} TF UNet fwd+bwd per step)",
             f"{t['achieved_tflops']['ours']:.3f}", f"{t['achieved_tflops']['reference']:.3f}", ""),
            (f"  MFU (bf16 peak {t['peak_bf16_tflops']} TFLOP/s)", f"{t['mfu']['ours']:.1%}",
             f"{t['mfu']['reference']:.1%}", "") if t["mfu"] else
            ("  MFU", "n/a (no GPU peak)", "", ""),
        ]
    f, c, e = results["fan_out"], results["curation"], results["evaluation"]
    rows += [
        (f"fan-out {f['styles']} styles on {f['concurrent_workers']} warm workers vs {f['styles']} x 1 alone "
         f"/ {f['concurrent_workers']} (s)", f"{f['together_s']:.1f}",
         f"{f['styles'] * f['one_alone_s'] / f['concurrent_workers']:.1f}", f"{f['efficiency']:.2f}x"),
        (f"curate {c['source_px']} px JPEGs to {c['resolution']} px, Ray Data vs 1 process (img/s)",
         f"{c['ray_data']['images_per_s']:.1f}", f"{c['one_process']['images_per_s']:.1f}", f"{c['speedup']:.2f}x"),
        ("  fixed cost of a curation pass (s)", f"{c['ray_data']['fixed_s']:.2f}",
         f"{c['one_process']['fixed_s']:.2f}", ""),
        (f"generate {e['images']} images, tiny, {e['inference_steps']} steps (img/s)",
         f"{e['generated_images_per_s']:.1f}", "", ""),
    ]
    rows += [(f"features of {e['feature_images']} images, toy {name} (img/s)", f"{rate:.0f}", "", "")
             for name, rate in e["feature_images_per_s"].items()]
    header = f"Style Factory benchmark, {results['date']}, {results['device']}, torch {results['torch']}"
    return "\n".join([header] + [f"{a:62s}{b:>18s}{c:>11s}{d:>11s}" for a, b, c, d in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train option for our step (YAML value), e.g. compile=true; repeatable")
    parser.add_argument("--run-dir", type=Path, default=REPO / "results" / "tiny-demo",
                        help="the run whose wall time is broken down (default: the default run's folder)")
    parser.add_argument("--breakdown-only", action="store_true", help="only break down --run-dir's wall time")
    args = parser.parse_args(argv)
    if args.breakdown_only:
        print_breakdown(args.run_dir)
        return
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    TrainConfig.model_validate(overrides)  # a bad option fails before anything runs
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "no"
    started = time.localtime()
    results = {"date": time.strftime("%Y-%m-%d %H:%M", started),
               "device": torch.cuda.get_device_name() if device.type == "cuda"
               else f"cpu, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "overrides": overrides, "training": []}
    with tempfile.TemporaryDirectory(prefix="style-factory-bench-") as tmp:
        workdir = Path(tmp)
        tiny_model = resolve_base_model("tiny", workdir / "base-models")
        sd1 = get_family("sd1")
        setups = [Setup("tiny 64px", lambda: sd1.load_components(tiny_model), 64, precision)]
        for setup in setups:
            print(f"[bench] training step: {setup.name}", flush=True)
            results["training"].append(bench_training(setup, overrides, device))
            torch.cuda.empty_cache()

        start_ray()
        print("[bench] curation", flush=True)
        results["curation"] = bench_curation(workdir, resolution=512)
        cpus = int(ray.cluster_resources()["CPU"])
        styles = sorted(s.name for s in load_styles(RunConfig(styles_dir=str(REPO / "styles")), REGISTRY))
        styles = styles[:max(2, min(len(styles), 2 * cpus))]  # two or more styles per worker: warm turns show
        print("[bench] fan-out", flush=True)
        results["fan_out"] = bench_fan_out(workdir, styles, workers=max(1, len(styles) // 2))
        ray.shutdown()
        print("[bench] evaluation", flush=True)
        results["evaluation"] = bench_evaluation(workdir, tiny_model, device)

    print("\n" + table(results))
    results["default_run"] = print_breakdown(args.run_dir)
    out = REPO / "results" / "bench" / f"{time.strftime('%Y-%m-%d_%H%M%S', started)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
