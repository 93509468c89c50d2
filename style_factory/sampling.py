"""Sampling, the one mechanism every image this project generates goes through: evaluation sets, StyleDrop's
feedback candidates and DreamBooth's class images. A set is fixed by its prompts and seeds; its folder holds one
PNG per (prompt, seed) and `samples.json`, whose key says what made it.

Images are drawn in batches of `evaluate.batch_size` across the prompts and seeds of one model, each from its own
seeded generator, so an image is the same whichever batch it lands in, up to float round-off of batched kernels
(at most 1/255 per pixel measured on the tiny preset: tests/test_batched_sampling.py). The batch size is therefore
in no key: it changes how fast a set is made, not what it holds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from style_factory.files import (folder_manifest, make_temp_dir, manifest_problem, read_json, replace_dir_atomic,
                            write_json_atomic)

SAMPLES_MARKER = "samples.json"
AUTO_BATCH_SIZE = {"cpu": 8, "cuda": 32}  # evaluate.batch_size "auto", by device type (others: the GPU's)


@dataclass
class SampleJob:
    style: str
    method: str  # "base" for the untuned model
    family: str  # the base model's family (style_factory.families)
    base_model: str  # diffusers folder or hub id
    model_dir: str  # the method's exported model ("" for base)
    prompts: list[str]  # full prompts, one per content prompt, in order
    seeds: list[int]
    out_dir: str
    key: str
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    content_dir: str = ""  # a composition (style_factory/methods/content.py): the subject's content adapter
    gamma: float = 0.0  # a composition: the content adapter's share of each noise prediction
    # a LoRA extracted from a full fine-tune (style_factory/checkpoint.py), model_dir its folder: the fine-tune's folder
    extracted_from: str = ""

    def is_done(self) -> bool:
        """The folder holds this job's images, every one of them as written."""
        marker = read_json(Path(self.out_dir) / SAMPLES_MARKER)
        return (marker is not None and marker.get("key") == self.key and bool(marker.get("files"))
                and manifest_problem(Path(self.out_dir), marker["files"]) is None)


def sample_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of one image: a function of the prompt and the run's seed only, not the model."""
    return seed * 100_003 + prompt_index


def sample_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}_s{seed}.png"


def batch_size_for(setting: int | str, device: str) -> int:
    """Images per pipeline call on `device` for an `evaluate.batch_size` setting (an int, or "auto")."""
    if setting != "auto":
        return int(setting)
    return AUTO_BATCH_SIZE.get(torch.device(device).type, AUTO_BATCH_SIZE["cuda"])


def in_batches(items: list, batch_size: int) -> list[list]:
    """`items` in order, cut into lists of `batch_size` (the last one shorter)."""
    return [items[start:start + batch_size] for start in range(0, len(items), batch_size)]


def sample(pipe, prompts: list[str], generator_seeds: list[int], resolution: int, num_inference_steps: int,
           guidance_scale: float) -> list:
    """One pipeline call: image i is prompts[i] drawn from a generator seeded with generator_seeds[i]."""
    generators = [torch.Generator().manual_seed(s) for s in generator_seeds]
    return pipe(prompts, generator=generators, height=resolution, width=resolution,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images


def draws(job: SampleJob) -> list[tuple[int, int]]:
    """Every image of a job as (prompt index, seed), prompt by prompt."""
    return [(index, seed) for index in range(len(job.prompts)) for seed in job.seeds]


def sample_draws(pipe, job: SampleJob, batch: list[tuple[int, int]]) -> list:
    """One pipeline call for these (prompt index, seed) images of the job, whichever prompts they mix: image
    (i, seed) comes from generator seed sample_seed(i, seed)."""
    return sample(pipe, [job.prompts[index] for index, _ in batch], [sample_seed(index, seed) for index, seed in batch],
                  job.resolution, job.num_inference_steps, job.guidance_scale)


def manifest(job: SampleJob) -> dict:
    return {"key": job.key, "family": job.family, "base_model": job.base_model, "model_dir": job.model_dir,
            "prompts": job.prompts, "seeds": job.seeds, "sampler": "DDIM",
            "num_inference_steps": job.num_inference_steps, "guidance_scale": job.guidance_scale,
            "resolution": job.resolution,
            **({"content_dir": job.content_dir, "gamma": job.gamma} if job.content_dir else {})}


def seal_samples(folder: Path, job: SampleJob) -> None:
    """Write `samples.json` into a folder of finished images: the job's key and protocol, and what is there."""
    write_json_atomic(folder / SAMPLES_MARKER, {**manifest(job), "files": folder_manifest(folder)})


def generate_images(job: SampleJob, pipe, batch_size: int) -> None:
    """Sample every prompt x seed in this process with `pipe` (the job's model, loaded), `batch_size` images per
    call; the folder appears whole or not at all."""
    out = Path(job.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    for batch in in_batches(draws(job), batch_size):
        for (index, seed), image in zip(batch, sample_draws(pipe, job, batch)):
            image.save(tmp / sample_name(index, seed))
    seal_samples(tmp, job)
    replace_dir_atomic(tmp, out)
