"""Generate: fixed content prompts x fixed seeds for every model, with Ray Data on an actor pool, into PNG files
(each image through pipeline/sampling.py).

`samples/<style>/<method>/p{prompt:03d}_s{seed}.png`, identical prompts, seeds, sampler and
resolution for every model of a run, so grids and metrics compare like with like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.families import get_family
from pipeline.files import replace_dir_atomic
from pipeline.methods import get_method
from pipeline.sampling import SampleJob, sample_name, sample_prompt, seal_samples

# Default content prompts for real base models: objects, scenes and people, no style words (the method adds its own).
DEFAULT_PROMPTS = [
    "a red circle on a blue background",
    "a yellow star above a green square",
    "a purple triangle left of an orange heart",
    "a large white house on a black background",
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
    "a bridge over a river at sunset",
    "a bird on a branch",
]
# Default content prompts for the toy presets (tiny, tiny-pretrained), which know only the toy world: exact
# toy-world captions covering every kind, color and background, half of them single objects, half pairs.
TOY_PROMPTS = [
    "a large red circle on a white background",
    "a small blue square on a yellow background",
    "a large green triangle on a pink background",
    "a large purple star on a light blue background",
    "a small orange heart on a grey background",
    "a large white house in a green meadow under a blue sky",
    "a large black circle on a sandy beach under a blue sky",
    "a small yellow star on a grey background",
    "a large blue house on a yellow background",
    "a small red triangle in a green meadow under a blue sky",
    "a large green heart on a white background",
    "a large purple square on a sandy beach under a blue sky",
    "a small red circle left of a large blue square on a white background",
    "a large yellow star above a small green house on a pink background",
    "a small black heart right of a large orange triangle on a light blue background",
    "a large white circle below a small purple star on a grey background",
    "a small green square above a small red heart on a yellow background",
    "a large blue triangle left of a large yellow circle in a green meadow under a blue sky",
    "a small purple house right of a small black star on a sandy beach under a blue sky",
    "a large orange circle above a small blue heart on a white background",
    "a small white triangle left of a large red house on a pink background",
    "a large black square below a small yellow triangle on a light blue background",
    "a small orange star right of a large green circle on a grey background",
    "a large red heart left of a small purple square on a yellow background",
]


def load_sampling_pipeline(job: SampleJob, device: str):
    """The job's model ready to sample: the untuned base, or what its method exported, on its family's pipeline."""
    family = get_family(job.family)
    if not job.model_dir:  # the untuned base: nothing to load on top of it
        return family.load_pipeline(job.base_model, device)
    return get_method(job.method).load_for_sampling(family, job.base_model, job.model_dir, device)


def partial_dir(job: SampleJob) -> Path:
    """Where a job's images gather until all are there; kept across an interruption, keyed by the job."""
    out = Path(job.out_dir)
    return out.parent / f".{out.name}.partial-{job.key[:16]}"


class Sampler:
    """A Ray Data actor: keeps the pipelines it has loaded (the last two), so the rows of one model, which
    arrive together, pay its load once per actor. Writes each image as it is made; a failing row returns
    its error instead of failing the dataset, so one broken model never costs the others their samples."""

    def __init__(self, jobs: list[SampleJob], device: str):
        if device == "cpu":  # one actor per core: more threads would only fight each other
            torch.set_num_threads(1)
        self.jobs, self.device = jobs, device
        self.loaded: dict[int, object] = {}

    def pipeline(self, job_index: int):
        if job_index not in self.loaded:
            if len(self.loaded) == 2:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[job_index] = load_sampling_pipeline(self.jobs[job_index], self.device)
        return self.loaded[job_index]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = []
        for job_index, prompt_index in zip(batch["job"].tolist(), batch["prompt_index"].tolist()):
            job = self.jobs[job_index]
            try:
                for seed, image in zip(job.seeds, sample_prompt(self.pipeline(job_index), job, prompt_index)):
                    path = partial_dir(job) / sample_name(prompt_index, seed)
                    image.save(path.with_suffix(".tmp.png"))
                    path.with_suffix(".tmp.png").replace(path)  # a half-written PNG is never taken as done
                errors.append("")
            except Exception as err:  # noqa: BLE001 - reported per model by generate_all
                last_line = (str(err).strip().splitlines() or [""])[-1]
                errors.append(f"{type(err).__name__}: {last_line}")
        return {"job": batch["job"], "error": np.array(errors, dtype=object)}


def generate_all(jobs: list[SampleJob], gpus_per_task: float = 0) -> dict[tuple[str, str], str]:
    """Sample every job not already done as one Ray Data pass over (model, prompt) rows on a pool of
    `Sampler` actors (one per CPU, or per `gpus_per_task` share of the GPUs); returns {(style, method): error}
    for the models that failed. Images already made by an interrupted run of the same job are kept."""
    todo = [job for job in jobs if not job.is_done()]
    rows = []
    for job_index, job in enumerate(todo):
        folder = partial_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        rows += [{"job": job_index, "prompt_index": i} for i in range(len(job.prompts))
                 if not all((folder / sample_name(i, seed)).is_file() for seed in job.seeds)]
    failures: dict[tuple[str, str], str] = {}
    if rows:
        resources = ray.cluster_resources()
        if gpus_per_task:
            actors, device = int(resources.get("GPU", 0) // gpus_per_task), "cuda"
            per_actor = {"num_gpus": gpus_per_task}
        else:
            actors, per_actor, device = int(resources.get("CPU", 1)), {"num_cpus": 1}, "cpu"
        results = ray.data.from_items(rows).map_batches(
            Sampler, fn_constructor_kwargs={"jobs": todo, "device": device}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(actors, len(rows)))), **per_actor,
        ).take_all()
        for row in results:
            if row["error"]:
                job = todo[row["job"]]
                failures.setdefault((job.style, job.method), row["error"])
    for job in todo:
        if (job.style, job.method) in failures:
            continue
        folder = partial_dir(job)
        seal_samples(folder, job)
        replace_dir_atomic(folder, Path(job.out_dir))
    return failures
