"""Export: a finished job's model folder, written whole or not at all, with the model card that marks it done.
Rank 0 of a training group exports its trained jobs; a zero-shot method's folder is prepared in a task of its own."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from diffusers import DDIMScheduler

from style_factory.checkpoint import full_model_files
from style_factory.config import StyleConfig, TrainConfig
from style_factory.families import get_family
from style_factory.families.base import Components
from style_factory.files import folder_manifest, make_temp_dir, replace_dir_atomic, write_json_atomic, write_text_atomic
from style_factory.loop import load_trained_weights
from style_factory.methods import get_method
from style_factory.methods.base import Method
from style_factory.train_job import MODEL_CARD, TrainJob


def load_method(job: TrainJob) -> Method:
    return get_method(job.method, StyleConfig.model_validate(job.style_config))


def write_model(job: TrainJob, method: Method, write: Callable[[Path], None], **facts) -> dict:
    """Write the model folder with `write`, plus its card (the key and `facts`); it appears whole or not at all."""
    style = StyleConfig.model_validate(job.style_config)
    card = {"key": job.key, "style": job.style, "method": job.method, "family": job.family,
            "base_model": job.base_model, "tokens": style.tokens, **facts, "train": job.train, "columns": job.columns,
            "data": {"file": Path(job.curated_path).name, "key": job.data_key},
            "prompt_template": method.eval_prompt("<content>", style)}  # how to prompt it: content in <content>
    Path(job.model_dir).parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(Path(job.model_dir).parent, f".{job.method}.")
    write(tmp)
    card["files"] = folder_manifest(tmp)  # what a rerun checks before it trusts the folder
    write_json_atomic(tmp / MODEL_CARD, card)
    replace_dir_atomic(tmp, Path(job.model_dir))
    return card


def export_model(job: TrainJob, checkpoint_dir: Path, base: Components | None = None, **facts) -> dict:
    """Write the trained model the method's way (atomically), plus its card and loss log.

    The checkpoint's weights go into a copy of `base` (the worker's copy in host memory), or into the base
    model loaded from disk when none is given."""
    cfg = TrainConfig.model_validate(job.train)
    method = load_method(job)
    models = copy.deepcopy(base) if base is not None else get_family(job.family).load_components(job.base_model)
    method.prepare(models, cfg)  # the same trainable structure (adapters, new tokens) the checkpoint was saved from
    load_trained_weights(models, method.trained_modules(models, cfg), checkpoint_dir)
    # the scheduler as load_pipeline samples; a prediction type set in train is the one the model now has
    override = {"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}
    pipe = models.family.pipeline(models, DDIMScheduler.from_pretrained(job.base_model, subfolder="scheduler",
                                                                        **override))
    state = json.loads((checkpoint_dir / "state.json").read_text())
    # The log first: the model card marks the job done, so a crash between the two must not lose the log.
    log = "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(state["losses"]))
    write_text_atomic(Path(job.log_path), log)
    untuned = (lambda: base) if base is not None else (lambda: get_family(job.family).load_components(job.base_model))
    extras = full_model_files(job.style, job.method, models, untuned, method.trained_modules(models, cfg), cfg.export)

    def write(out: Path) -> None:
        method.export(pipe, models, out, cfg)
        extras.write(out)
    return write_model(job, method, write, steps=state["step"], final_loss=state["losses"][-1], **extras.facts,
                       **facts)


@ray.remote
def prepare_untrained(job: TrainJob) -> dict:
    """A zero-shot method's model folder, prepared from the data and the base model on one worker's resources."""
    cfg = TrainConfig.model_validate(job.train)
    method = load_method(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method.check_data(job.load_data(), cfg)
    return write_model(job, method, lambda out: method.prepare_reference(
        job.load_data(), cfg, get_family(job.family), job.base_model, out, device), steps=0, final_loss=None)
