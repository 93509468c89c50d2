"""One group's Ray Train run: the task that starts it imports Ray Train and the config, not the models' libraries
(diffusers, peft: seconds per group), which only the train workers need."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import ray

from style_factory.config import TrainConfig
from style_factory.files import sha256_of

if TYPE_CHECKING:
    from style_factory.train_job import TrainJob


def group_name(group: list[TrainJob]) -> str:
    """A one-job group keeps the job's trainer name; a larger one adds how many follow and their keys' hash."""
    first = group[0].trainer_name
    return first if len(group) == 1 else f"{first}+{len(group) - 1}-{sha256_of([j.key for j in group])[:8]}"


def train_loop(config: dict) -> None:
    """Ray Train's entry point on each worker (style_factory/worker.py), imported there rather than in this task."""
    from style_factory.worker import train_loop_per_worker

    train_loop_per_worker(config)


@ray.remote(num_cpus=0)
def fit_group(group: list[TrainJob]) -> None:
    """One Ray Train run that trains the group's jobs in turn (train_loop_per_worker), resuming its checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = TrainConfig.model_validate(group[0].train)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    TorchTrainer(
        train_loop,
        train_loop_config={"jobs": [asdict(job) for job in group]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=group_name(group), storage_path=group[0].storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    ).fit()
