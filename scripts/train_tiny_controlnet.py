"""Train `tiny-controlnet-canny`, a Canny-edge ControlNet for `tiny-pretrained`, into style_factory/assets/.

    python scripts/train_tiny_controlnet.py [--out style_factory/assets] [--work results/controlnet] [--steps 3000]

`ControlNetModel.from_unet(tiny-pretrained's UNet)` (the UNet frozen) learns, with the standard ControlNet loss (the
frozen UNet's noise prediction, plus the ControlNet's residuals, against the noise: MSE), to draw the toy world's
scenes (style_factory/toyworld.py, plain look, 64 px) from their captions and their Canny maps
(style_factory/control.canny_map, 100/200). Half the captions are dropped, as the ControlNet paper does, so the edges
alone must carry the layout. Everything is seeded. The latents and text states are computed once; a checkpoint in
`--work` every 100 steps lets a cut-short run resume. At the end, held-out scenes are drawn with and without the
ControlNet and scored by `control.edge_alignment`; the figures go into `training.json` and the folder's README.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the script runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionControlNetPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from style_factory import toyworld  # noqa: E402
from style_factory.control import canny_map, edge_alignment  # noqa: E402
from style_factory.families import get_family  # noqa: E402
from style_factory.families.base import SD_SCHEDULE  # noqa: E402
from style_factory.files import write_json_atomic, write_text_atomic  # noqa: E402
from style_factory.models import ASSETS_DIR, TINY_CONTROLNET_CANNY, TINY_PRETRAINED_DIR_NAME  # noqa: E402
from style_factory.pretrain import (Log, encode_in_batches, render, set_lr, to_pixels, tokenize,  # noqa: E402
                                    training_device, training_scenes)

CANNY = (100, 200)  # StyleAligned's default canny_low / canny_high
HELD_OUT_FIRST_SEED = 700_000_000  # scenes never trained on


def canny_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC scenes -> their Canny maps, float NCHW in [0, 1], as the ControlNet pipelines feed them."""
    maps = np.stack([np.asarray(canny_map(Image.fromarray(image), *CANNY)) for image in images])
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255


def checkpoint_path(work: Path) -> Path:
    return work / "checkpoint.pt"


def train(args: argparse.Namespace, log: Log) -> tuple[ControlNetModel, StableDiffusionControlNetPipeline, float]:
    device = training_device()
    pipe = get_family("sd1").load_pipeline(str(ASSETS_DIR / TINY_PRETRAINED_DIR_NAME), "cpu")
    unet, vae, text_encoder = pipe.unet.to(device).requires_grad_(False), pipe.vae.to(device), pipe.text_encoder
    torch.manual_seed(args.seed)
    # the tiny VAE downsamples by 4 (SD's by 8): the map's embedding halves twice
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64)).to(device)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator, start, seconds = torch.Generator().manual_seed(args.seed + 1), 0, 0.0
    if checkpoint_path(args.work).is_file():
        saved = torch.load(checkpoint_path(args.work), weights_only=False)
        controlnet.load_state_dict(saved["controlnet"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        start, seconds = saved["step"], saved["seconds"]
        log(f"resumed at step {start}")
    if start >= args.steps:
        return controlnet.eval().cpu(), pipe, seconds
    scenes = training_scenes(args.scenes, first_seed=args.seed * 10_000_000)
    images = render(scenes, "plain", args.seed)
    controls = canny_batch(images)
    latents = encode_in_batches(lambda x: vae.encode(to_pixels(x.numpy()).to(device)).latent_dist.mean
                                * vae.config.scaling_factor, torch.from_numpy(images))
    captions = [toyworld.caption(s) for s in scenes]
    unique = sorted(set(captions)) + [""]
    states = encode_in_batches(lambda ids: text_encoder.to(device)(ids.to(device))[0], tokenize(pipe.tokenizer, unique))
    caption_of = torch.tensor([unique.index(c) for c in captions])
    log(f"data: {len(scenes)} scenes, {len(unique) - 1} captions, Canny {CANNY}; training on {device}")
    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"})
    controlnet.train()
    begun = time.time() - seconds
    for step in range(start, args.steps):
        # warm-up, then constant: a run can be stopped at any checkpoint, or continued with more --steps
        set_lr(optimizer, args.learning_rate * min(1.0, (step + 1) / 100))
        rows = torch.randperm(len(latents), generator=generator)[: args.batch_size]
        text = torch.where(torch.rand(len(rows), generator=generator) < args.caption_dropout, len(unique) - 1,
                           caption_of[rows])
        noise = torch.randn(latents[rows].shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        noisy = scheduler.add_noise(latents[rows], noise, timesteps.to(device))
        hidden = states[text]
        down, mid = controlnet(noisy, timesteps.to(device), encoder_hidden_states=hidden,
                               controlnet_cond=controls[rows].to(device), return_dict=False)
        prediction = unet(noisy, timesteps.to(device), encoder_hidden_states=hidden,
                          down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step}: loss {loss.item():.4f} ({(time.time() - begun) / (step + 1 - start or 1):.2f} s/step)"
                if step == start else f"step {step}: loss {loss.item():.4f}")
        if (step + 1) % 100 == 0 and step + 1 < args.steps:
            tmp = checkpoint_path(args.work).with_suffix(".tmp")
            torch.save({"controlnet": controlnet.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step + 1, "seconds": time.time() - begun}, tmp)
            tmp.replace(checkpoint_path(args.work))
    return controlnet.eval().cpu(), pipe, time.time() - begun


@torch.no_grad()
def held_out_alignment(controlnet: ControlNetModel, pipe, n: int, steps: int) -> dict:
    """Held-out scenes drawn from their captions with and without their Canny map; each image's edge alignment."""
    scenes = [toyworld.scene_from_seed(HELD_OUT_FIRST_SEED + i) for i in range(n)]
    maps = [canny_map(toyworld.render_plain(scene, 64), *CANNY) for scene in scenes]
    pipe = pipe.to("cpu")
    pipe.unet.to("cpu")
    control_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    scores = {"with_control": [], "without_control": []}
    for scene, structure in zip(scenes, maps):
        common = dict(prompt=toyworld.caption(scene), height=64, width=64, num_inference_steps=steps,
                      guidance_scale=5.0)
        plain = pipe(**common, generator=torch.Generator().manual_seed(0)).images[0]
        guided = control_pipe(**common, image=structure, generator=torch.Generator().manual_seed(0)).images[0]
        scores["without_control"].append(edge_alignment(plain, structure))
        scores["with_control"].append(edge_alignment(guided, structure))
    band = [float((np.asarray(m)[..., 0] > 0).mean()) for m in maps]
    return {"scenes": n, "ddim_steps": steps, "guidance_scale": 5.0, "first_seed": HELD_OUT_FIRST_SEED,
            **{k: round(float(np.mean(v)), 3) for k, v in scores.items()}, "per_scene": scores,
            "edge_pixels_share": round(float(np.mean(band)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "results" / "controlnet")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)  # the paper's 1e-5 is for SD 1.5's 860 M
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--caption-dropout", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-scenes", type=int, default=16)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "train.log")
    controlnet, pipe, seconds = train(args, log)
    alignment = held_out_alignment(controlnet, pipe, args.eval_scenes, steps=10)
    log(f"held-out edge alignment: {alignment['with_control']} with, {alignment['without_control']} without")
    folder = args.out / TINY_CONTROLNET_CANNY
    controlnet.save_pretrained(folder, safe_serialization=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "work")}
    card = {"settings": settings, "canny": CANNY, "base": "tiny-pretrained", "training_seconds": round(seconds),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else f"CPU, {torch.get_num_threads()} threads",
            "command": "python scripts/train_tiny_controlnet.py " + " ".join(sys.argv[1:]),
            "held_out_edge_alignment": alignment}
    write_json_atomic(folder / "training.json", card)
    write_text_atomic(folder / "README.md", "\n".join([
        f"# {TINY_CONTROLNET_CANNY}",
        "",
        "A Canny-edge ControlNet for `tiny-pretrained` (`ControlNetModel.from_unet`, the UNet frozen), trained by",
        "`scripts/train_tiny_controlnet.py` on plain toy-world scenes (style_factory/toyworld.py, 64 px) and their",
        f"Canny maps ({CANNY[0]}/{CANNY[1]}). Not a general ControlNet: it knows the toy world's edges only.",
        "",
        "| | |",
        "|---|---|",
        f"| data | {args.scenes:,} scenes, {args.caption_dropout:.0%} empty captions |",
        f"| training | {args.steps:,} steps x {args.batch_size}, AdamW lr {args.learning_rate} (constant after 100 "
        f"warm-up steps), seed {args.seed} |",
        f"| time | {seconds / 60:.0f} min on {card['device']} |",
        f"| held-out edge alignment | {alignment['with_control']} with the map, {alignment['without_control']} "
        f"without ({alignment['scenes']} scenes, DDIM {alignment['ddim_steps']}, CFG 5) |",
        "",
        "Edge alignment (`style_factory.control.edge_alignment`): the share of the drawn image's Canny edges within",
        "2 px of the control's edges.",
        f"Retrain: `{card['command']}`.",
        "",
    ]))


if __name__ == "__main__":
    main()
