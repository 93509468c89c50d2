"""The Ray Train worker: a group's jobs in turn, each trained by the shared loop on a copy of the base model that the
worker loaded once, resuming the group's checkpoint, exported by rank 0 after its last step."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from style_factory.config import TrainConfig
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.export import export_model, load_method
from style_factory.files import write_json_atomic
from style_factory.loop import (apply_fast_paths, build_optimizer, optimisation_step, restore_checkpoint, save_checkpoint,
                           stored_latent_cache)
from style_factory.methods.base import Method
from style_factory.progress import StepReporter
from style_factory.tracking import TrainingTracker
from style_factory.train_job import TrainJob


def checkpoint_prefix(job: TrainJob) -> str:
    return f"{job.style}-{job.model_name}-{job.key[:8]}"


def checkpoint_step(job: TrainJob, folder: Path) -> int:
    """The step of a checkpoint folder of `job` (named by `checkpoint_prefix`); 0 for another job's."""
    prefix = f"{checkpoint_prefix(job)}-step_"
    return int(folder.name[len(prefix):]) if folder.name.startswith(prefix) else 0


def train_job(job: TrainJob, method: Method, base: Components, checkpoint, device: torch.device) -> None:
    """Train `job` on a copy of `base` (host memory, untouched), resuming from `checkpoint` when it is this job's,
    reporting a checkpoint every `checkpoint_every` steps; rank 0 exports the model after the last step, and logs
    each step (and validation samples) to the job's trackers."""
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
    modules = method.trained_modules(models, cfg)
    for part in (models.vae, *models.text_encoders.values(), models.unet):
        part.to(device)
    cache = stored_latent_cache(job, models.vae, data, method.image_views(cfg))
    apply_fast_paths(models, cfg)
    optimizer = build_optimizer(param_groups, cfg, device)

    progress = StepReporter(f"{job.style}/{Path(job.model_dir).name}", cfg.max_steps) if rank == 0 else None
    step, losses = 0, []
    missing = [k for k in job.keep_steps if not job.step_job(k).is_done()]
    if checkpoint and missing and checkpoint_step(job, Path(checkpoint.path)) > min(missing):
        checkpoint = None  # a kept step's model went missing: only training past it again makes it
    if checkpoint:
        # the group's latest checkpoint (it may be an earlier, finished job's), then this job's earlier ones that
        # retention kept beside it: a checkpoint cut short falls back to the one before, then to the base model
        latest = Path(checkpoint.path)
        earlier = sorted((p for p in latest.parent.glob(f"{checkpoint_prefix(job)}-step_*") if p != latest),
                         reverse=True)
        step, losses, restored = restore_checkpoint(job.key, models, modules, optimizer, [latest, *earlier])
        if step == cfg.max_steps:  # trained to the end, but the exported model went missing or broke since
            if rank == 0:
                progress(step)
                export_model(job, restored, base, train_seconds=round(time.time() - started, 1))
            return
    for name in modules:  # data parallel across this style's workers (no-op for one worker)
        models.set_module(name, ray.train.torch.prepare_model(models.module(name)))
    if progress is not None:
        progress(step)

    world_size = ray.train.get_context().get_world_size()
    tracked = rank == 0 and bool(job.tensorboard_dir) and bool(cfg.report_to)
    tracker = TrainingTracker(job, cfg, method, data, step) if tracked else None
    try:
        while step < cfg.max_steps:
            tick, record = time.perf_counter(), {} if tracker is not None else None
            losses.append(optimisation_step(models, method, data, cache, optimizer, cfg, step, rank, device, record))
            step += 1
            if progress is not None:
                progress(step)
            if tracker is not None:
                tracker.step(step, losses[-1], record, record["images"] * world_size / (time.perf_counter() - tick))
                if tracker.due(step):
                    tracker.validate(models, step, device)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or step in job.keep_steps:
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if rank == 0:
                        save_checkpoint(Path(tmp), job.key, models, modules, optimizer, step, losses)
                        if step in missing:  # a kept step: its weights exported as a model of their own
                            export_model(job.step_job(step), Path(tmp), base,
                                         train_seconds=round(time.time() - started, 1))
                        if step == cfg.max_steps:  # exported before it is reported: a restart finds the job done
                            export_model(job, Path(tmp), base, train_seconds=round(time.time() - started, 1))
                        checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report({"style": job.style, "method": job.method, "step": step, "loss": losses[-1]},
                                     checkpoint=checkpoint,
                                     checkpoint_dir_name=f"{checkpoint_prefix(job)}-step_{step:07d}")
    finally:
        if tracker is not None:
            tracker.close()


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
    base = get_family(jobs[0].family).load_components(jobs[0].base_model)  # a group's jobs share their base model
    checkpoint = ray.train.get_checkpoint()  # the interrupted job's, if any: the first one this group trains
    for job in jobs:
        method = load_method(job)
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
            print(f"[train] {job.style}/{job.model_name} FAILED: {type(err).__name__}: {err}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
