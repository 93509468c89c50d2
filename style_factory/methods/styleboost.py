"""StyleBoost / Multi-StyleBoost: full fine-tune of UNet (+ every text encoder of the family).

StyleRef images are bound to the concept's rare token ("<caption>, zwx style"); Aux images to the
class word alone ("<caption>, style"), as the prior term weighted by `prior_loss_weight`. Several
concepts (tokens) per style are trained at once; each batch comes from one concept, as in the paper.
"""
from __future__ import annotations

import numpy as np
import torch

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.families.base import Components
from style_factory.methods.base import Batch, Method

INSTANCE_PROMPT = "{caption}, {token} {class_word}"
CLASS_PROMPT = "{caption}, {class_word}"


class StyleBoost(Method):
    name = "styleboost"
    prior_role = "aux"  # which rows of StyleData the prior term draws from
    missing_prior = ("no Aux images; StyleBoost needs them as its prior "
                     "(add images to the concept's aux folder, or set prior_loss_weight: 0)")

    def prior_prompt(self, data: StyleData, row: int) -> str:
        return CLASS_PROMPT.format(caption=data.captions[row], class_word=data.class_words[row])

    def check_data(self, data: StyleData, cfg: TrainConfig) -> None:
        for concept in range(data.num_concepts):
            if not len(data.indices("ref", concept)):
                raise ValueError(f"concept {concept} has no StyleRef images")
            if cfg.prior_loss_weight > 0 and not len(data.indices(self.prior_role, concept)):
                raise ValueError(f"concept {concept} has {self.missing_prior}")

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        models.vae.requires_grad_(False)
        models.unet.requires_grad_(True)
        groups = [{"params": list(models.unet.parameters()), "lr": cfg.learning_rate}]
        for encoder in models.text_encoders.values():
            encoder.requires_grad_(cfg.train_text_encoder)
            if cfg.train_text_encoder:
                groups.append({"params": list(encoder.parameters()),
                               "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
        return groups

    def trained_modules(self, models: Components, cfg: TrainConfig) -> list[str]:
        return ["unet", *models.text_encoders] if cfg.train_text_encoder else ["unet"]

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        concept = int(rng.integers(data.num_concepts))
        ref = data.indices("ref", concept)
        rows = rng.choice(ref, cfg.batch_size, replace=len(ref) < cfg.batch_size)
        prompts = [INSTANCE_PROMPT.format(caption=data.captions[i], token=data.tokens[i],
                                          class_word=data.class_words[i]) for i in rows]
        weights = [1.0 / cfg.batch_size] * cfg.batch_size
        if cfg.prior_loss_weight > 0:
            prior = data.indices(self.prior_role, concept)
            prior_rows = rng.choice(prior, cfg.batch_size, replace=len(prior) < cfg.batch_size)
            rows = np.concatenate([rows, prior_rows])
            prompts += [self.prior_prompt(data, i) for i in prior_rows]
            weights += [cfg.prior_loss_weight / cfg.batch_size] * cfg.batch_size
        return Batch(rows=rows, prompts=prompts, weights=torch.tensor(weights))

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        return ", ".join([content] + [f"{c.token} {c.class_word}" for c in style.concepts])
