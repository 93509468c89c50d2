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

CPU: the tiny preset at 64 px. CUDA: also an SD1.5-shaped model (random weights) at 512 px, both in bf16.
Prints a table and writes results/bench/<date>.json.

    python -m bench.run [--set KEY=VALUE ...]   # train options for "ours", e.g. --set compile=true
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
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from bench.reference_loop import PRECISIONS, ReferenceLoop
from pipeline.backbones import toy_clip, toy_inception
from pipeline.config import CurateConfig, RunConfig, TrainConfig, load_styles
from pipeline.curate import DecodeBatch, curate_styles, decode_all, list_candidates
from pipeline.data import StyleData
from pipeline.families import get_family
from pipeline.families.base import Components
from pipeline.generate import TOY_PROMPTS
from pipeline.methods import get_method
from pipeline.models import resolve_base_model
from pipeline.run import REGISTRY, Run, start_ray
from pipeline.sampling import SampleJob, generate_images
from pipeline.loop import (apply_fast_paths, build_optimizer, encode_latent_cache, optimisation_step, sample_latents,
                           step_generator)
from pipeline.train import plan_training, train_all

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 3
ROUNDS, STEPS_PER_ROUND = 10, 4  # the loops take turns, so load from other processes hits all of them alike
FAN_OUT_STEPS = 10
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


def sd15_components(tiny: Components) -> Components:
    """Stable Diffusion 1.5's networks with random weights (nothing is downloaded), with the tiny preset's
    tokenizer and noise schedule (SD1.5's): UNet 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # every other default is SD1.5's
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    return replace(tiny, unet=unet, vae=vae, text_encoders={"text_encoder": text_encoder}, frozen_prompts={},
                   source="sd15-shaped, random weights")


def synthetic_style(resolution: int, images: int = 16) -> StyleData:
    """One concept, half StyleRef and half Aux images of random pixels, each with its own caption."""
    pixels = torch.rand(images, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return StyleData(pixels=pixels, roles=np.repeat(["ref", "aux"], images // 2), concepts=np.zeros(images, int),
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


def bench_training(setup: Setup, overrides: dict, device: torch.device) -> dict:
    """Median step times of our step, the reference step and a bare UNet step, taking turns."""
    cfg = TrainConfig(**{"batch_size": 2, "train_text_encoder": False, "mixed_precision": setup.mixed_precision,
                         **overrides})
    data = synthetic_style(setup.resolution)
    method = get_method("styleboost")

    ours = setup.build()  # set up as train_loop_per_worker does
    param_groups = method.prepare(ours, cfg)
    for part in (ours.vae, *ours.text_encoders.values(), ours.unet):
        part.to(device)
    cache = encode_latent_cache(ours.vae, data.pixels, method.image_views(cfg))
    apply_fast_paths(ours, cfg)
    optimizer = build_optimizer(param_groups, cfg, device)
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
        reference.step(data.pixels[picked.rows], picked.prompts)

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
    generate_images(job, get_family("sd1").load_pipeline(base_model, str(device)))
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
    args = parser.parse_args(argv)
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
        if device.type == "cuda":
            setups.append(Setup("sd15-shaped 512px", lambda: sd15_components(sd1.load_components(tiny_model)), 512,
                                precision))
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
    out = REPO / "results" / "bench" / f"{time.strftime('%Y-%m-%d_%H%M%S', started)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
