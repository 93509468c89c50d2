"""Generate: fixed content prompts x fixed seeds for every model, as Ray tasks, into PNG files.

`samples/<style>/<method>/p{prompt:03d}_s{seed}.png`, identical prompts, seeds, sampler and
resolution for every model of a run, so grids and metrics compare like with like.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from pipeline.files import replace_dir_atomic, write_json_atomic

# Default content prompts: objects, scenes and people, no style words (the method adds its own).
DEFAULT_PROMPTS = [
    "a red circle on a blue background",
    "a yellow star above a green square",
    "a purple triangle left of an orange heart",
    "a large white house on a black background",
    "a small blue square on a yellow background",
    "a green circle below a red star",
    "a house by a lake",
    "a portrait of a woman",
    "a cat sitting on a chair",
    "a city street at night",
    "a bowl of fruit on a table",
    "a mountain landscape with a river",
    "a ship on the sea",
    "an old man reading a book",
    "a dog running in a park",
    "a lighthouse on a cliff",
    "a cup of coffee",
    "a bicycle leaning against a wall",
    "children playing in the snow",
    "a vase of flowers",
    "a castle on a hill",
    "a train crossing a bridge",
    "a forest in autumn",
    "a robot holding a flower",
]


@dataclass
class SampleJob:
    style: str
    method: str  # "base" for the untuned model
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
        marker = Path(self.out_dir) / "samples.json"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == self.key


def sample_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of one image: a function of the prompt and the run's seed only, not the model."""
    return seed * 100_003 + prompt_index


def sample_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}_s{seed}.png"


def generate_images(job: SampleJob, device: str = "cpu") -> None:
    """Sample every prompt x seed with one loaded pipeline; the folder appears whole or not at all."""
    from pipeline.methods import get_method
    from pipeline.models import load_pipeline

    if job.method == "base":
        pipe = load_pipeline(job.base_model, device)
    else:
        pipe = get_method(job.method).load_for_sampling(job.base_model, job.model_dir, device)
    out = Path(job.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    for index, prompt in enumerate(job.prompts):
        generators = [torch.Generator().manual_seed(sample_seed(index, s)) for s in job.seeds]
        images = pipe([prompt] * len(job.seeds), generator=generators, height=job.resolution,
                      width=job.resolution, num_inference_steps=job.num_inference_steps,
                      guidance_scale=job.guidance_scale).images
        for seed, image in zip(job.seeds, images):
            image.save(tmp / sample_name(index, seed))
    write_json_atomic(tmp / "samples.json", {"key": job.key, "base_model": job.base_model,
                                             "model_dir": job.model_dir, "prompts": job.prompts,
                                             "seeds": job.seeds, "sampler": "DDIM",
                                             "num_inference_steps": job.num_inference_steps,
                                             "guidance_scale": job.guidance_scale, "resolution": job.resolution})
    replace_dir_atomic(tmp, out)


@ray.remote(num_cpus=1)
def generate_task(job: SampleJob) -> str:
    torch.set_num_threads(1)
    generate_images(job, "cuda" if torch.cuda.is_available() else "cpu")
    return job.out_dir


def generate_all(jobs: list[SampleJob], gpus_per_task: float = 0) -> dict[tuple[str, str], str]:
    """Run every job not already done; returns {(style, method): error} for the ones that failed."""
    task = generate_task.options(num_gpus=gpus_per_task) if gpus_per_task else generate_task
    pending = {task.remote(job): job for job in jobs if not job.is_done()}
    failures = {}
    for ref, job in pending.items():
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the others
            failures[(job.style, job.method)] = str(err).strip().splitlines()[-1]
    return failures
