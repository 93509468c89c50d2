"""Sampling, the one mechanism every image this project generates goes through: evaluation sets, StyleDrop's
feedback candidates and DreamBooth's class images. A set is fixed by its prompts and seeds; its folder holds one
PNG per (prompt, seed) and `samples.json`, whose key says what made it."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.files import folder_manifest, manifest_problem, read_json, replace_dir_atomic, write_json_atomic

SAMPLES_MARKER = "samples.json"


@dataclass
class SampleJob:
    style: str
    method: str  # "base" for the untuned model
    family: str  # the base model's family (pipeline.families)
    base_model: str  # diffusers folder or hub id
    model_dir: str  # the method's exported model ("" for base)
    prompts: list[str]  # full prompts, one per content prompt, in order
    seeds: list[int]
    out_dir: str
    key: str
    resolution: int
    num_inference_steps: int
    guidance_scale: float

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


def sample(pipe, prompts: list[str], generator_seeds: list[int], resolution: int, num_inference_steps: int,
           guidance_scale: float) -> list:
    """One pipeline call: image i is prompts[i] drawn from a generator seeded with generator_seeds[i]."""
    generators = [torch.Generator().manual_seed(s) for s in generator_seeds]
    return pipe(prompts, generator=generators, height=resolution, width=resolution,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images


def sample_prompt(pipe, job: SampleJob, prompt_index: int) -> list:
    """One prompt, every seed, in one batch: image i comes from generator seed sample_seed(prompt_index, seeds[i])."""
    return sample(pipe, [job.prompts[prompt_index]] * len(job.seeds),
                  [sample_seed(prompt_index, s) for s in job.seeds], job.resolution, job.num_inference_steps,
                  job.guidance_scale)


def manifest(job: SampleJob) -> dict:
    return {"key": job.key, "family": job.family, "base_model": job.base_model, "model_dir": job.model_dir,
            "prompts": job.prompts, "seeds": job.seeds, "sampler": "DDIM",
            "num_inference_steps": job.num_inference_steps, "guidance_scale": job.guidance_scale,
            "resolution": job.resolution}


def seal_samples(folder: Path, job: SampleJob) -> None:
    """Write `samples.json` into a folder of finished images: the job's key and protocol, and what is there."""
    write_json_atomic(folder / SAMPLES_MARKER, {**manifest(job), "files": folder_manifest(folder)})


def generate_images(job: SampleJob, pipe) -> None:
    """Sample every prompt x seed in this process with `pipe` (the job's model, loaded); the folder appears whole
    or not at all."""
    out = Path(job.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    for index in range(len(job.prompts)):
        for seed, image in zip(job.seeds, sample_prompt(pipe, job, index)):
            image.save(tmp / sample_name(index, seed))
    seal_samples(tmp, job)
    replace_dir_atomic(tmp, out)
