"""TextBoost (Park et al., arXiv 2409.08248; nahyeonkaty/textboost@0390854): tune only the text encoder(s).

Trained, in every text encoder of the family (SDXL: both): a LoRA on the attention projections (peft, r=4, alpha=4
on q, k, v) and new token embeddings; the UNet and VAE stay frozen, so one StyleRef image is enough. Each concept
token becomes a placeholder `<token>` (+ `<token>_1`, ... : diffusers' multi-vector naming) initialised from the init
phrase (the style's descriptor), plus one token per augmentation. Only the new rows of the embedding matrix change
(their gradient is masked) and after each step their norm is clipped to the mean norm of the vocabulary.

What the shared loop gets on top of the denoising loss:
- augmentation tokens: `<hflip>` / `<grayscale>` end the caption exactly when the row's cached latent is
  of the mirrored / grayscale image (style mode of the paper: these two ops only, each with probability p;
  train.random_flip does not apply, as an unannounced mirror image would undo the pairing);
- knowledge preservation: kpl_weight * mean over prompts and all 77 positions of 1 - cos(E_phi(p), E_0(p)),
  p from a pool of generic captions (10% empty, 10% the class template). E_0 is the encoder with the LoRA
  switched off: the pool holds no new token, and no other embedding row ever changes, so that is the
  frozen encoder without keeping a copy of it;
- timesteps from p(t) ∝ max_s logSNR(s) - logSNR(t), as the paper describes. The public code never samples
  this way: its `--disable_weighted_sample` is store_true with default=True, so it is always "disabled".
Not ported: the fixed null embedding for classifier-free guidance (a SD2.1-only asset) and `--mixing`.

Exported: the LoRA in kohya's layout, which `pipe.load_lora_weights`, ComfyUI and A1111 load (style_factory/lora.py),
and one embedding file per concept in `embeddings/`, in the family's form (SD 1.x/2.x: one tensor; SDXL: `clip_l` and `clip_g`), for
`pipe.load_textual_inversion` (the prompt's `<token>` expands to its vectors).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.families.base import Components, Family, unwrapped
from style_factory.lora import add_lora, load_adapter, save_lora
from style_factory.methods.base import Batch, Method

TRAIN_PROMPT = "{caption}, {placeholder}"  # the untuned baseline is asked for "<content>, <descriptor>"
AUGMENTATIONS = {"hflip": "horizontally flipped", "grayscale": "grayscale"}  # token -> its init phrase
CLASS_PROMPT = "a photo of {class_word}"
# Generic captions for knowledge preservation (the paper draws from InstructPix2Pix's human-written ones).
PRESERVATION_CAPTIONS = [
    "a photo of a dog on the beach", "a man riding a bicycle down a street", "a bowl of soup on a wooden table",
    "a red car parked in front of a house", "two children playing in a park", "a mountain lake at sunrise",
    "an old woman knitting by the window", "a cat sleeping on a sofa", "a city skyline at night",
    "a vase of sunflowers", "a train crossing a bridge", "a plate of pasta with tomatoes",
    "a lighthouse on a rocky coast", "a horse standing in a field", "a kitchen with white cabinets",
    "a boat on a calm river", "a bookshelf full of books", "a snowy forest path", "a birthday cake with candles",
    "a woman holding an umbrella in the rain",
]


class TextBoostOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    # peft's kind (style_factory/lora.py); no LoKr: diffusers has no LoKr loader for a text encoder
    adapter: Literal["lora", "dora"] = "lora"
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    embedding_learning_rate: float = Field(1e-3, gt=0)  # the LoRA uses text_encoder_learning_rate or learning_rate
    kpl_weight: float = Field(0.1, ge=0)
    num_vectors: int | None = Field(None, ge=1)  # per placeholder; None: one per init-phrase token (public code)
    init_phrase: str | None = None  # None: the style's descriptor
    augment_probability: float = Field(0.2, ge=0, le=1)  # per augmentation and image
    prompt_pool: list[str] | None = None  # knowledge-preservation captions; None: PRESERVATION_CAPTIONS


@dataclass
class TextBoostBatch(Batch):
    preservation_prompts: list[str] | None = None


def timestep_distribution(scheduler) -> torch.Tensor:
    """p(t) ∝ max_s logSNR(s) - logSNR(t), SNR(t) = alphabar_t / (1 - alphabar_t): 0 at t=0, most mass when noisy."""
    alphas = scheduler.alphas_cumprod.double()
    log_snr = torch.log(alphas / (1 - alphas))
    weights = log_snr.max() - log_snr
    return weights / weights.sum()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos over the last dim, written out so that identical inputs give exactly 0
    (F.cosine_similarity normalises each side first and leaves ~1e-7)."""
    dot, a2, b2 = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
    return 1 - dot / (a2 * b2).sqrt().clamp_min(1e-12)


def placeholder_names(token: str, num_vectors: int) -> list[str]:
    """`<zwx>`, `<zwx>_1`, ...: the names `load_textual_inversion` gives a multi-vector embedding's rows."""
    name = f"<{token.strip('<>')}>"
    return [name] + [f"{name}_{i}" for i in range(1, num_vectors)]


class TextBoost(Method):
    name = "textboost"
    Options = TextBoostOptions

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        opts = self.options(cfg)
        self.kpl_weight = opts.kpl_weight  # extra_losses sees no config
        models.unet.requires_grad_(False)
        models.vae.requires_grad_(False)
        init_phrases = {c.token: opts.init_phrase or self.style.descriptor for c in self.style.concepts}
        init_phrases |= {f"<{op}>": phrase for op, phrase in AUGMENTATIONS.items()}
        self.placeholders: dict[str, list[str]] = {}  # the same names in every tokenizer: one prompt serves all
        self.new_rows = []  # per text encoder: (its embedding matrix, the new rows' ids, their norm bound)
        lora, embedding_groups = [], []
        for tokenizer, encoder in models.encoder_pairs():
            lora += add_lora(encoder, opts.rank, opts.alpha, opts.target_modules, opts.adapter)
            vocabulary = encoder.get_input_embeddings().weight.detach()  # before the new rows
            init_vectors = []
            for token, phrase in init_phrases.items():
                phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
                count = len(self.placeholders.get(token, ())) or (
                    (opts.num_vectors or len(phrase_ids)) if token in self.style.tokens else 1)
                if count > len(phrase_ids):
                    raise ValueError(f"num_vectors={count} exceeds the {len(phrase_ids)} tokens of {phrase!r}")
                # vector i starts as the mean of the i-th of `count` consecutive slices of the phrase's embeddings
                init_vectors += [chunk.mean(0) for chunk in torch.tensor_split(vocabulary[phrase_ids], count)]
                self.placeholders[token] = placeholder_names(token, count)
            names = [name for names in self.placeholders.values() for name in names]
            if tokenizer.add_tokens(names) != len(names):
                raise ValueError(f"the tokenizer already knows some of {names}")
            max_norm = vocabulary.norm(dim=1).mean()
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embeddings = encoder.get_input_embeddings().weight
            new_ids = torch.tensor(tokenizer.convert_tokens_to_ids(names))
            with torch.no_grad():
                embeddings[new_ids] = torch.stack(init_vectors).to(embeddings.dtype)
            embeddings.requires_grad_(True)
            mask = torch.zeros(len(embeddings), 1, dtype=embeddings.dtype)
            mask[new_ids] = 1
            embeddings.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))  # only the new rows learn
            self.new_rows.append((embeddings, new_ids, max_norm))
            embedding_groups.append(embeddings)
        return [{"params": lora, "lr": cfg.text_encoder_learning_rate or cfg.learning_rate},
                # no decay: with a zero gradient, AdamW leaves the other rows bitwise unchanged
                {"params": embedding_groups, "lr": opts.embedding_learning_rate, "weight_decay": 0.0}]

    def trained_modules(self, models: Components, cfg: TrainConfig) -> list[str]:
        return list(models.text_encoders)

    def image_views(self, cfg: TrainConfig) -> list[tuple[str, ...]]:
        """Every combination of the augmentations: (), (hflip,), (grayscale,), (hflip, grayscale)."""
        return [tuple(op for k, op in enumerate(AUGMENTATIONS) if mask >> k & 1)
                for mask in range(2 ** len(AUGMENTATIONS))]

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        opts = self.options(cfg)
        ref = data.indices("ref")
        rows = rng.choice(ref, cfg.batch_size, replace=len(ref) < cfg.batch_size)
        fired = rng.random((len(rows), len(AUGMENTATIONS))) < opts.augment_probability
        views = self.image_views(cfg)
        prompts, view_index = [], []
        for row, on in zip(rows, fired):
            ops = tuple(op for op, hit in zip(AUGMENTATIONS, on) if hit)
            placeholder = " ".join(self.placeholders[data.tokens[row]])
            prompts.append(TRAIN_PROMPT.format(caption=data.captions[row], placeholder=placeholder)
                           + "".join(f", {self.placeholders[f'<{op}>'][0]}" for op in ops))
            view_index.append(views.index(ops))
        pool = opts.prompt_pool or PRESERVATION_CAPTIONS
        preservation = []
        for draw in rng.random(cfg.batch_size):
            if draw < 0.1:
                preservation.append("")
            elif draw < 0.2:
                concept = self.style.concepts[rng.integers(len(self.style.concepts))]
                preservation.append(CLASS_PROMPT.format(class_word=concept.class_word))
            else:
                preservation.append(pool[rng.integers(len(pool))])
        return TextBoostBatch(rows=rows, prompts=prompts, weights=torch.full((len(rows),), 1.0 / len(rows)),
                              views=np.array(view_index), preservation_prompts=preservation)

    def sample_timesteps(self, count: int, models: Components, generator: torch.Generator) -> torch.Tensor:
        p = timestep_distribution(models.noise_scheduler)
        return torch.multinomial(p.float(), count, replacement=True, generator=generator)

    def extra_losses(self, models: Components, batch: TextBoostBatch) -> dict[str, torch.Tensor]:
        if self.kpl_weight == 0:
            return {}
        encoders = [unwrapped(encoder) for encoder in models.text_encoders.values()]
        device = self.new_rows[0][0].device
        tuned = models.family.encode_prompts(models, batch.preservation_prompts, device)
        for encoder in encoders:
            encoder.disable_adapters()
        try:
            with torch.no_grad():
                frozen = models.family.encode_prompts(models, batch.preservation_prompts, device)
        finally:
            for encoder in encoders:
                encoder.enable_adapters()
        distances = [cosine_distance(t.float(), f.float()).mean() for t, f in zip(tuned.parts, frozen.parts)]
        return {"knowledge_preservation": self.kpl_weight * sum(distances) / len(distances)}

    def after_step(self, models: Components) -> None:
        with torch.no_grad():  # the new rows stay no longer than an average word of their encoder
            for embeddings, new_ids, max_norm in self.new_rows:
                rows = embeddings[new_ids]
                scale = (max_norm / rows.norm(dim=1, keepdim=True)).clamp(max=1)
                embeddings[new_ids] = rows * scale

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        placeholders = " ".join(placeholder_names(c.token, 1)[0] for c in style.concepts)
        return TRAIN_PROMPT.format(caption=content, placeholder=placeholders)

    def prompts_around(self, caption: str, style: StyleConfig, count_tokens: Callable[[str], int]) -> list[str]:
        """Each new token is one token of the tuned tokenizer ("x" stands for it): in training one concept's
        placeholder with both augmentation tokens, at evaluation every concept's. The placeholder is as long as the
        default init phrase, the descriptor (curation does not see train.method_options)."""
        vectors = " ".join(["x"] * count_tokens(style.descriptor))
        return [TRAIN_PROMPT.format(caption=caption, placeholder=vectors) + ", x" * len(AUGMENTATIONS),
                TRAIN_PROMPT.format(caption=caption, placeholder=" ".join([vectors] * len(style.concepts)))]

    def export(self, pipe: DiffusionPipeline, models: Components, out_dir: Path, cfg: TrainConfig) -> None:
        save_lora(out_dir, models.family, **models.text_encoders)
        (out_dir / "embeddings").mkdir()
        for token in self.style.tokens:
            names = self.placeholders[token]
            vectors = {name: encoder.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(names)]
                       .clone().cpu()
                       for (tokenizer, encoder), name in zip(models.encoder_pairs(), models.text_encoders)}
            save_file(models.family.embedding_state(names[0], vectors),
                      out_dir / "embeddings" / f"{token.strip('<>')}.safetensors")

    def load_for_sampling(self, family: Family, base_model: str, model_dir: str, device: str) -> DiffusionPipeline:
        pipe = family.load_pipeline(base_model, device)
        for path in sorted((Path(model_dir) / "embeddings").glob("*.safetensors")):
            family.load_embeddings(pipe, path)
        load_adapter(pipe, model_dir)
        return pipe
