"""What a run logs for people to watch, to the trackers `train.report_to` names: per training job, each loss term,
the learning rate, the gradient norm, images/s and validation samples; per model, its evaluation metrics at its
final step. TensorBoard event files go to `<run>/tensorboard/<style>/<method>/`; MLflow and Weights & Biases runs
are named `<style>/<method>`.

Nothing here changes what is trained: the scalars are read off a step already taken, and validation samples draw
from their own seeded generators with the global RNG state saved and restored around them.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.families.base import Components, unwrapped
from style_factory.loop import prediction_type
from style_factory.methods.base import Method
from style_factory.sampling import sample
from style_factory.train_job import TrainJob

VALIDATION_PROMPTS = 2  # default validation prompts: the first distinct StyleRef captions
VALIDATION_SEED = 0
VALIDATION_INFERENCE_STEPS = 20  # as evaluate's default
VALIDATION_GUIDANCE = 5.0
EVAL_METRICS = ("fid", "kid", "kid_vs_base", "clip_t", "style_sim", "style_consistency", "kid_heldout")


class Tracker:
    """One job's (or model's) log in every tracker of `report_to`. `purge_step`: TensorBoard hides what an earlier
    attempt logged from this step on (a resumed or retrained job)."""

    def __init__(self, folder: Path, name: str, report_to: list[str], purge_step: int | None = None):
        self.writers = []
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tensorboard", SummaryWriter(log_dir=str(folder), purge_step=purge_step)))
        if "mlflow" in report_to:
            import mlflow

            self.writers.append(("mlflow", mlflow.start_run(run_name=name)))
        if "wandb" in report_to:
            import wandb

            self.writers.append(("wandb", wandb.init(project="style-factory", name=name, dir=str(folder),
                                                     reinit=True)))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)
            elif kind == "mlflow":
                import mlflow

                mlflow.log_metrics(values, step=step)
            else:
                writer.log(values, step=step)

    def images(self, images: dict[str, tuple[str, object]], step: int) -> None:
        """tag -> (caption, PIL image)."""
        for kind, writer in self.writers:
            for tag, (caption, image) in images.items():
                if kind == "tensorboard":
                    writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
                    writer.add_text(f"{tag}/prompt", caption, step)
                elif kind == "mlflow":
                    import mlflow

                    mlflow.log_image(image, key=tag.replace("/", "_"), step=step)
                else:
                    import wandb

                    writer.log({tag: wandb.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            elif kind == "mlflow":
                import mlflow

                mlflow.end_run()
            else:
                writer.finish()


class TrainingTracker(Tracker):
    """A training job's log: `step` after each optimisation step, validation samples every `validation_every`."""

    def __init__(self, job: TrainJob, cfg: TrainConfig, method: Method, data: StyleData, start_step: int):
        # a StyleDrop round 1 is a job of its own: its folder is named as its model folder
        folder = Path(job.tensorboard_dir).with_name(Path(job.model_dir).name)
        super().__init__(folder, f"{job.style}/{folder.name}", cfg.report_to, purge_step=start_step + 1)
        self.cfg, self.method = cfg, method
        style = StyleConfig.model_validate(job.style_config)
        ref = [caption for caption, role in zip(data.captions, data.roles) if role == "ref"]
        contents = cfg.validation_prompts or list(dict.fromkeys(ref))[:VALIDATION_PROMPTS]
        self.prompts = [method.eval_prompt(content, style) for content in contents]
        self.resolution = data.resolution
        self.pipe = None

    def step(self, step: int, loss: float, record: dict, images_per_s: float) -> None:
        lrs = record["lrs"]
        values = {"train/loss": loss, **{f"train/loss/{name}": value for name, value in record["losses"].items()},
                  "train/lr": lrs[0], **{f"train/lr_group{i}": lr for i, lr in enumerate(lrs[1:], 1)},
                  "train/grad_norm": record["grad_norm"], "train/images_per_s": images_per_s}
        self.scalars(values, step)

    def due(self, step: int) -> bool:
        return bool(self.cfg.validation_every) and step % self.cfg.validation_every == 0

    def validate(self, models: Components, step: int, device: torch.device) -> None:
        """Sample the validation prompts with the weights of this step, one image each, seeded VALIDATION_SEED."""
        if self.pipe is None:
            plain = replace(models, unet=unwrapped(models.unet),
                            text_encoders={k: unwrapped(v) for k, v in models.text_encoders.items()})
            scheduler = DDIMScheduler.from_config(models.noise_scheduler.config,
                                                  prediction_type=prediction_type(models, self.cfg))
            self.pipe = models.family.pipeline(plain, scheduler)
            self.pipe.set_progress_bar_config(disable=True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images = sample(self.pipe, self.prompts, [VALIDATION_SEED] * len(self.prompts), self.resolution,
                            VALIDATION_INFERENCE_STEPS, VALIDATION_GUIDANCE)
        self.images({f"validation/{i}": (prompt, image) for i, (prompt, image) in
                     enumerate(zip(self.prompts, images))}, step)


def log_evaluation(folder: Path, name: str, report_to: list[str], row: dict, step: int) -> None:
    """A model's evaluation metrics (a results row), at its final training step."""
    tracker = Tracker(folder, name, report_to)
    try:
        tracker.scalars({f"eval/{k}": float(row[k]) for k in EVAL_METRICS if np.isfinite(row.get(k, np.nan))},
                        step)
    finally:
        tracker.close()
