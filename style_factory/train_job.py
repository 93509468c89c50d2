"""The record of one training job: plain data, so it travels to Ray workers, and what decides whether it is done."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from style_factory.data import StyleData
from style_factory.files import manifest_problem, read_json

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

    @property
    def trainer_name(self) -> str:
        return f"{self.style}-{self.method}-{self.key[:12]}"

    @property
    def error_path(self) -> Path:
        """Where the job's worker records the error that stopped it (cleared when the job is tried again)."""
        return Path(self.log_path).with_suffix(".error.json")

    def problem(self) -> str | None:
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
