"""Generate: fixed content prompts x fixed seeds for every model, with Ray Data on an actor pool, into PNG files
(each image through style_factory/sampling.py).

`samples/<style>/<method>/p{prompt:03d}_s{seed}.png`, identical prompts, seeds, sampler and
resolution for every model of a run, so grids and metrics compare like with like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from style_factory.families import get_family
from style_factory.files import replace_dir_atomic
from style_factory.lora import load_adapter
from style_factory.methods import get_method
from style_factory.methods.content import load_composition
from style_factory.progress import report
from style_factory.sampling import SampleJob, batch_size_for, draws, in_batches, sample_draws, sample_name, seal_samples

# Default content prompts for real base models: objects, scenes and people, no style words (the method adds its own).
DEFAULT_PROMPTS = [
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
    """The job's model ready to sample: the untuned base, what its method exported, a LoRA extracted from a full
    fine-tune, or a composition of two adapters, on its family's pipeline."""
    family = get_family(job.family)
    if job.content_dir:  # a composition: the style's StyleDrop adapter (model_dir) beside a content adapter
        return load_composition(family, job.base_model, job.model_dir, job.content_dir, job.gamma, device)
    if not job.model_dir:  # the untuned base: nothing to load on top of it
        return family.load_pipeline(job.base_model, device)
    if job.extracted_from:  # the base with the LoRA file alone, as a user loads it
        pipe = family.load_pipeline(job.base_model, device)
        load_adapter(pipe, job.model_dir)
        return pipe
    return get_method(job.method).load_for_sampling(family, job.base_model, job.model_dir, device)


def partial_dir(job: SampleJob) -> Path:
    """Where a job's images gather until all are there; kept across an interruption, keyed by the job."""
    out = Path(job.out_dir)
    return out.parent / f".{out.name}.partial-{job.key[:16]}"


class Sampler:
    """A Ray Data actor: a row is one batch, (job, its images as (prompt index, seed)), drawn in one pipeline call.
    Keeps the pipelines it has loaded (the last two), so the rows of one model, which arrive together, pay its
    load once per actor. Writes each image as it is made; a failing row returns its error instead of failing the
    dataset, so one broken model never costs the others their samples."""

    def __init__(self, jobs: list[SampleJob], batches: list[tuple[int, list[tuple[int, int]]]], device: str):
        if device == "cpu":  # one actor per core: more threads would only fight each other
            torch.set_num_threads(1)
        self.jobs, self.batches, self.device = jobs, batches, device
        self.loaded: dict[int, object] = {}

    def pipeline(self, job_index: int):
        if job_index not in self.loaded:
            if len(self.loaded) == 2:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[job_index] = load_sampling_pipeline(self.jobs[job_index], self.device)
        return self.loaded[job_index]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs, errors = [], []
        for batch_index in batch["batch"].tolist():
            job_index, images = self.batches[batch_index]
            job = self.jobs[job_index]
            jobs.append(job_index)
            try:
                for (prompt_index, seed), image in zip(images, sample_draws(self.pipeline(job_index), job, images)):
                    path = partial_dir(job) / sample_name(prompt_index, seed)
                    image.save(path.with_suffix(".tmp.png"))
                    path.with_suffix(".tmp.png").replace(path)  # a half-written PNG is never taken as done
                report("sample", {str(Path(job.out_dir) / sample_name(i, seed)): (1, 1) for i, seed in images})
                errors.append("")
            except Exception as err:  # noqa: BLE001 - reported per model by generate_all
                last_line = (str(err).strip().splitlines() or [""])[-1]
                errors.append(f"{type(err).__name__}: {last_line}")
        return {"job": np.array(jobs), "error": np.array(errors, dtype=object)}


def generate_all(jobs: list[SampleJob], gpus_per_task: float = 0,
                 batch_size: int | str = "auto") -> dict[tuple[str, str], str]:
    """Sample every job not already done as one Ray Data pass on a pool of `Sampler` actors (one per CPU, or per
    `gpus_per_task` share of the GPUs), a row per batch of `batch_size` images (evaluate.batch_size) of one model,
    across its prompts and seeds; returns {(style, model name): error} for the models that failed. Images already made
    by an interrupted run of the same job are kept."""
    todo = [job for job in jobs if not job.is_done()]
    device = "cuda" if gpus_per_task else "cpu"
    batches = []
    for job_index, job in enumerate(todo):
        folder = partial_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [(i, seed) for i, seed in draws(job) if not (folder / sample_name(i, seed)).is_file()]
        batches += [(job_index, batch) for batch in in_batches(missing, batch_size_for(batch_size, device))]
    failures: dict[tuple[str, str], str] = {}
    if batches:
        resources = ray.cluster_resources()
        if gpus_per_task:
            actors, per_actor = int(resources.get("GPU", 0) // gpus_per_task), {"num_gpus": gpus_per_task}
        else:
            actors, per_actor = int(resources.get("CPU", 1)), {"num_cpus": 1}
        # as many blocks as models, in order: an actor takes a block whole, so it loads each model about once
        rows = ray.data.from_items([{"batch": i} for i in range(len(batches))], override_num_blocks=len(todo))
        pool = max(1, min(actors, len(batches)))  # all started at once: none waits for the pool to scale up
        results = rows.map_batches(
            Sampler, fn_constructor_kwargs={"jobs": todo, "batches": batches, "device": device}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool, initial_size=pool), **per_actor,
        ).take_all()
        for row in results:
            if row["error"]:
                job = todo[row["job"]]
                failures.setdefault((job.style, Path(job.out_dir).name), row["error"])
    for job in todo:
        if (job.style, Path(job.out_dir).name) in failures:
            continue
        folder = partial_dir(job)
        seal_samples(folder, job)
        replace_dir_atomic(folder, Path(job.out_dir))
    return failures
