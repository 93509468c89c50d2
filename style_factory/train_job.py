"""The record of one training job: plain data, so it travels to Ray workers, and what decides whether it is done."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from style_factory.data import StyleData
from style_factory.files import manifest_problem, read_json, sha256_of

MODEL_CARD = "model_card.json"


@dataclass
class TrainJob:
    """Everything one (style, method) training run needs."""

    style: str
    method: str
    family: str  # the base model's family (style_factory.families)
    key: str  # hash of inputs, config and code: decides reuse
    base_model: str  # a folder or hub id loadable by from_pretrained
    curated_path: str
    model_dir: str
    log_path: str
    storage_path: str  # Ray Train checkpoints
    style_config: dict
    train: dict
    prior_dirs: list[str] = field(default_factory=list)  # generated class images, one folder per concept
    data_key: str = ""  # the curated data's key: which images the model learnt from
    # evaluate.batch_size, for a method that samples while it trains (StyleDrop's feedback); not in the key, as it
    # changes no image (style_factory/sampling.py)
    sample_batch_size: int | str = "auto"
    tensorboard_dir: str = ""  # where its trackers log (style_factory/tracking.py); "" = nowhere
    name: str = ""  # the model's name, its folder's: the method, plus its sweep point and training seed; "" = method
    columns: dict = field(default_factory=dict)  # what tells it from its method's other models: train_seed, sweep.*
    # steps before the last whose weights are exported too (evaluate.checkpoints), each as its own model (step_job);
    # not in the key: keeping a step changes no weight
    keep_steps: list[int] = field(default_factory=list)
    # the key of the rounds before the last (StyleDrop's round 1): the job's inputs but the options that decide only
    # the last round (Method.first_round_settings); "" = key
    first_round_key: str = ""

    @property
    def model_name(self) -> str:
        return self.name or self.method

    @property
    def trainer_name(self) -> str:
        return f"{self.style}-{self.model_name}-{self.key[:12]}"

    def step_job(self, step: int) -> TrainJob:
        """The model of this job's weights after `step` steps: `<model_dir>-step<step>`, keyed by this job and
        the step."""
        return replace(self, key=sha256_of(self.key, "step", step), model_dir=f"{self.model_dir}-step{step}",
                       name=f"{self.model_name}-step{step}", keep_steps=[], tensorboard_dir="",
                       log_path=str(Path(self.log_path).with_name(f"train_log_step{step}.jsonl")))

    @property
    def error_path(self) -> Path:
        """Where the job's worker records the error that stopped it (cleared when the job is tried again)."""
        return Path(self.log_path).with_suffix(".error.json")

    def problem(self) -> str | None:
        """Why the job is not done: what is wrong with its model folder, or with a kept step's; None when each
        is up to date."""
        for step, job in [(None, self), *((k, self.step_job(k)) for k in self.keep_steps)]:
            if (problem := job.folder_problem()) is not None:
                return problem if step is None else f"its step {step} model: {problem}"
        return None

    def folder_problem(self) -> str | None:
        """Why the model folder is not this job's finished model; None when it is (its card parses, holds this
        job's key, and every file it lists is there as written)."""
        card = read_json(Path(self.model_dir) / MODEL_CARD)
        if card is None:
            return "no model yet" if not (Path(self.model_dir) / MODEL_CARD).exists() else \
                f"{Path(self.model_dir) / MODEL_CARD} does not parse"
        if card.get("key") != self.key:
            return "made from other data, settings or code"
        return manifest_problem(Path(self.model_dir), card.get("files") or {"(manifest)": {"size": -1}})

    def is_done(self) -> bool:
        return self.problem() is None

    def load_data(self) -> StyleData:
        return StyleData.load(Path(self.curated_path), self.prior_dirs)
