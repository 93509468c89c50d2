"""Train: every (style, method) fanned out over the cluster; one loop shared by every method and family.

The jobs are dealt into as many groups as the cluster trains at once. A group is one Ray Train run
(style_factory/train_group.py) whose workers (style_factory/worker.py) load the base model once and train the
group's jobs in turn, each on a fresh copy of the base kept in host memory: a style pays no process start-up and no
model load of its own. Checkpoints live under `<run>/ray_train/<group>/` (a one-job group is named
`<style>-<method>-<key>`); rerunning the same job forms the same groups and resumes from the last checkpoint. Each
finished model is exported to `<run>/models/<style>/<method>/` (style_factory/export.py), with `model_card.json`
recording the key that decides whether it is up to date.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from style_factory.config import WATCH_FIELDS, Style, TrainConfig
from style_factory.export import prepare_untrained
from style_factory.families import FAMILIES
from style_factory.files import code_version, read_json, sha256_of
from style_factory.methods import METHODS, get_method
from style_factory.models import base_model_identity
from style_factory.priors import class_image_dir, generate_class_images
from style_factory.progress import report
from style_factory.run import Run
from style_factory.train_group import fit_group, group_name
from style_factory.train_job import MODEL_CARD, TrainJob

SEED_COLUMN = "train_seed"  # results' column of a trained model's training seed
SWEEP_PREFIX = "sweep."  # results' columns of a sweep point's settings: sweep.learning_rate


def worker_kind(job: TrainJob) -> tuple:
    """Jobs of one kind can share workers: the same base model and the same workers."""
    cfg = TrainConfig.model_validate(job.train)
    return job.family, job.base_model, cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.max_failures


def group_jobs(jobs: list[TrainJob], slots: int) -> list[list[TrainJob]]:
    """Deal the trainable jobs of each kind into at most `slots` groups, longest first, each to the group with
    the fewest steps so far: each group is one Ray Train run whose workers load the base model once and train
    its jobs in turn.

    Dealt from every job, done or not, so that a rerun on the same cluster forms the same groups (the same
    Ray Train runs) and resumes their checkpoints; finished jobs are skipped inside the group."""
    def steps(job: TrainJob) -> int:
        return TrainConfig.model_validate(job.train).max_steps

    kinds: dict[tuple, list[TrainJob]] = {}
    for job in sorted(jobs, key=lambda j: -steps(j)):
        kinds.setdefault(worker_kind(job), []).append(job)
    groups = []
    for members in kinds.values():
        dealt: list[list[TrainJob]] = [[] for _ in range(min(slots, len(members)))]
        for job in members:
            min(dealt, key=lambda group: sum(map(steps, group))).append(job)
        groups += dealt
    return groups


def model_variants(run: Run, style: Style, method: str) -> list[tuple[str, dict, TrainConfig]]:
    """The models of one style and method: one per sweep point (`sweep`) and training seed (`train.seeds`), each
    (name, result columns, settings). A zero-shot method has one per sweep point (its options; no training seed).
    The model of `train.seed` keeps the plain name (adding seeds retrains nothing), another seed adds `-s<seed>`; a
    sweep point adds `-p<i>`."""
    trains = METHODS[method].trains
    variants = []
    for index, point in list(enumerate(run.config.sweep.points(method))) or [(None, {})]:
        cfg = style.train_config(run.config, method, point)
        for seed in cfg.training_seeds() if trains else [cfg.seed]:
            name = method + (f"-p{index}" if index is not None else "") + (f"-s{seed}" if seed != cfg.seed else "")
            columns = {**({SEED_COLUMN: seed} if trains else {}), **{f"{SWEEP_PREFIX}{k}": v for k, v in point.items()}}
            variants.append((name, columns, TrainConfig.model_validate({**cfg.model_dump(), "seed": seed,
                                                                         "seeds": None})))
    return variants


def plan_training(run: Run) -> list[TrainJob]:
    """One job per live style, method, sweep point and training seed, keyed by its curated data, settings (but
    WATCH_FIELDS, which only show a run), base model and code: the loop's, its method's and its family's, so that
    editing one method retrains only that method's models."""
    base, family = run.base_model, run.family
    jobs = []
    for style in run.live_styles():
        curated = run.curated(style.name)
        marker = curated.with_suffix(".json")
        data_key = (read_json(marker) or {}).get("key", "missing")
        for method in style.methods(run.config):
            code = code_version("style_factory.worker", METHODS[method].__module__, FAMILIES[family].__module__)
            for name, columns, cfg in model_variants(run, style, method):
                prior_dirs = [str(class_image_dir(run, r)) for r in get_method(method).class_images(style.config, cfg)]
                jobs.append(TrainJob(
                    style=style.name, method=method, family=family, base_model=base, curated_path=str(curated),
                    key=sha256_of(data_key, method, cfg.model_dump(exclude=WATCH_FIELDS | {"seeds"}),
                                  base_model_identity(base), prior_dirs, code),
                    first_round_key=sha256_of(data_key, method, get_method(method).first_round_settings(
                        cfg.model_dump(exclude=WATCH_FIELDS | {"seeds"})), base_model_identity(base), prior_dirs, code),
                    model_dir=str(run.model_dir(style.name, name)), log_path=str(run.train_log(style.name, name)),
                    storage_path=str(run.dir / "ray_train"), style_config=style.config.model_dump(),
                    train=cfg.model_dump(), prior_dirs=prior_dirs, data_key=data_key,
                    sample_batch_size=run.config.evaluate.batch_size,
                    tensorboard_dir=str(run.tensorboard_dir(style.name, name)), name=name, columns=columns,
                    keep_steps=run.config.evaluate.checkpoint_steps(cfg.max_steps) if METHODS[method].trains else []))
    return jobs


def trainings_that_fit(jobs: list[TrainJob]) -> int:
    """How many trainings the cluster's current resources run at once (at least one)."""
    resources = ray.cluster_resources()
    fits = []
    for job in jobs:
        cfg = TrainConfig.model_validate(job.train)
        if cfg.gpus_per_worker:
            fits.append(resources.get("GPU", 0) // (cfg.gpus_per_worker * cfg.num_workers))
        else:
            fits.append(resources.get("CPU", 1) // (cfg.cpus_per_worker * cfg.num_workers))
    return max(1, int(min(fits, default=1)))


def train_all(jobs: list[TrainJob], max_concurrent: int | None = None) -> dict[tuple[str, str], dict]:
    """Train every job not already done, at most `max_concurrent` Ray Train runs at a time (default: as many
    as the cluster runs at once); zero-shot jobs each get a task. A failing style never stops the others.

    More runs in flight than the cluster can run would only wait, each holding a driver process's memory.
    """
    outcomes: dict[tuple[str, str], dict] = {}
    for job in jobs:
        problem = job.problem()
        if problem is None:
            outcomes[(job.style, job.model_name)] = {"status": "reused", "model_dir": job.model_dir,
                                                     "models": job_models(job)}
        elif Path(job.model_dir).exists() and problem != "made from other data, settings or code":
            print(f"[train] {job.style}/{job.model_name}: not reused, {problem}: training it again", flush=True)
        job.error_path.unlink(missing_ok=True)  # a failure of an earlier run is tried again
    trainable = [job for job in jobs if METHODS[job.method].trains]
    expected = {}  # the progress view's totals: every model's steps, the reused ones done
    for job in trainable:
        steps = TrainConfig.model_validate(job.train).max_steps
        expected[f"{job.style}/{job.model_name}"] = (steps if (job.style, job.model_name) in outcomes else 0, steps)
    report("train", expected)
    slots = max_concurrent or trainings_that_fit(jobs)  # from every job, as the groups: a rerun deals the same
    queue = [[job] for job in jobs if job not in trainable and (job.style, job.model_name) not in outcomes]
    queue += [group for group in group_jobs(trainable, slots) if not all(job.is_done() for job in group)]
    pending = {}
    while queue or pending:
        while queue and len(pending) < slots:
            group = queue.pop(0)
            pending[start_group(group)] = (group, time.time())
        ready: list = []
        while not ready:  # in short waits: a Ctrl-C is raised between them, never held until a group ends
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        [done] = ready
        group, started = pending.pop(done)
        try:
            ray.get(done)
            error = None
        except Exception as err:  # noqa: BLE001 - the group's run failed as a whole; its unfinished jobs say so
            lines = str(err).strip().splitlines()
            error = lines[-1] if lines else type(err).__name__
        for job in group:
            if (job.style, job.model_name) not in outcomes:
                outcomes[(job.style, job.model_name)] = {**job_outcome(job, error, time.time() - started),
                                                     "group": group_name(group),
                                                     "group_seconds": round(time.time() - started, 1)}
    return outcomes


def start_group(group: list[TrainJob]) -> ray.ObjectRef:
    """A Ray Train run for trainable jobs; a task with one worker's resources for a zero-shot one."""
    if METHODS[group[0].method].trains:
        print(f"[train] {group_name(group)}: {', '.join(f'{j.style}/{j.model_name}' for j in group)}, in turn, "
              "on workers that load the base model once", flush=True)
        return fit_group.remote(group)
    cfg = TrainConfig.model_validate(group[0].train)
    return prepare_untrained.options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker).remote(group[0])


def job_outcome(job: TrainJob, group_error: str | None, group_seconds: float) -> dict:
    """What became of a job once its group ended: its model card, the error it recorded, or the group's."""
    if job.is_done():
        card = read_json(Path(job.model_dir) / MODEL_CARD)
        loss = "" if card["final_loss"] is None else f", final loss {card['final_loss']:.4f}"
        seconds = card.get("train_seconds", round(group_seconds, 1))
        print(f"[train] {job.style}/{job.model_name}: {card['steps']} steps{loss}, {seconds} s", flush=True)
        return {"status": "trained", "model_dir": job.model_dir, **card, "models": job_models(job)}
    recorded = job.error_path
    message = (read_json(recorded) or {}).get("error") or group_error or "did not finish"
    message = explain(message, job)
    print(f"[train] {job.style}/{job.model_name} FAILED: {message}", flush=True)
    return {"status": "failed", "error": message}


def explain(message: str, job: TrainJob) -> str:
    """The error, plus what to change when it is one the settings can fix."""
    if "out of memory" in message.lower():
        message += (f" -- style {job.style!r} ran out of GPU memory: lower train.batch_size, set "
                    "train.mixed_precision: bf16 or train.gradient_checkpointing: true, or give each worker "
                    "a whole GPU (train.gpus_per_worker: 1)")
    return message


def job_models(job: TrainJob) -> dict[str, str]:
    """The models a finished job made, by name: its final one and each kept step's."""
    return {made.model_name: made.model_dir for made in [job, *map(job.step_job, job.keep_steps)]}


def train_styles(run: Run) -> dict[tuple[str, str], str]:
    """Train (or reuse) every live style x model; returns {(style, model name): model folder} of the usable
    ones, kept steps' models included."""
    with run.timed("class images"):
        generate_class_images(run)  # the generated priors the jobs read (DreamBooth), each set once
    with run.timed("train"):
        outcomes = train_all(plan_training(run), run.config.max_concurrent_trainings)
    trained = {}
    for (style, name), outcome in outcomes.items():
        if outcome["status"] == "trained":  # its time inside its group's warm worker, and the group's wall
            run.timings.append({"what": "train job", "job": f"{style}/{name}", "group": outcome["group"],
                                "seconds": outcome.get("train_seconds"), "group_seconds": outcome["group_seconds"],
                                "steps": outcome["steps"], "model_dir": outcome["model_dir"]})
        run.record(style, f"train:{name}", "ok" if outcome["status"] == "trained" else
                   outcome["status"] if outcome["status"] == "reused" else outcome["error"])
        if outcome["status"] in ("trained", "reused"):
            trained.update({(style, name): folder for name, folder in outcome["models"].items()})
    return trained


def finished_models(run: Run) -> dict[tuple[str, str], str]:
    """The up-to-date trained models of the live styles, without training anything."""
    trained = {}
    for job in plan_training(run):
        if job.is_done():
            trained.update({(job.style, name): folder for name, folder in job_models(job).items()})
        else:
            run.record(job.style, f"train:{job.model_name}", "not trained yet (run jobs.train)")
    return trained
