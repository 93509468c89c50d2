"""StyleDrop (Sohn et al., arXiv 2306.00983) on a diffusion UNet: a small adapter, descriptive prompts, CLIP feedback.

Muse's adapters sit after the attention and after the MLP of every transformer layer; on the UNet they become a
peft LoRA (rank 4) on every transformer block's attention projections (to_q, to_k, to_v, to_out.0), its MLP
(ff.net.0.proj, ff.net.2) and its projections in and out: 1.70 M weights = 0.20% of SD1.5's UNet (the PyTorch port's
adapters: 2.06 M), 77,312 = 2.8% of the tiny one; everything else frozen (where it sits, and why: docs/methods.md).
Prompts describe the style in words, "<content> in <descriptor> style", rather than binding it to a rare token.

Two rounds, the paper's CLIP-feedback rule (the PyTorch port has no round 2):
1. train on the StyleRef images; the adapter is exported beside the model, in `<model>-round1/`;
2. the round-1 model draws K candidates for each feedback prompt, CLIP keeps the one closest to its whole prompt
   (content and descriptor, as the paper scores them), and a fresh adapter is trained on just those images
   (`<model>-round1/feedback/`: the candidates, `scores.json` and `curated.parquet`, in curate.py's schema).
   Round 2 is the model that is evaluated.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import CURATED_SCHEMA, StyleData
from style_factory.families import get_family
from style_factory.families.base import Components, Family
from style_factory.files import sha256_of, write_json_atomic, write_parquet_atomic
from style_factory.lora import add_lora, save_lora
from style_factory.methods.base import Batch, Method
from style_factory.sampling import SampleJob, batch_size_for, generate_images, sample_name
from style_factory.train_job import TrainJob

PROMPT = "{content} in {descriptor} style"


class StyleDropOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2", "proj_in", "proj_out"])
    feedback: bool = True  # False: round 1 only
    feedback_prompts: list[str] | None = None  # content prompts; None: the StyleRef captions
    feedback_candidates: int = Field(4, ge=1)  # images per prompt from the round-1 model (the paper: 64)
    feedback_inference_steps: int = Field(20, ge=1)
    feedback_guidance_scale: float = Field(5.0, ge=0)
    clip: str = "auto"  # the scorer, as evaluate.clip: "auto" | "toy" | [ARCH:]path


class StyleDrop(Method):
    name = "styledrop"
    Options = StyleDropOptions

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        opts = self.options(cfg)
        models.vae.requires_grad_(False)
        for encoder in models.text_encoders.values():
            encoder.requires_grad_(False)
        return [{"params": add_lora(models.unet, opts.rank, opts.alpha, opts.target_modules), "lr": cfg.learning_rate}]

    def trained_modules(self, models: Components, cfg: TrainConfig) -> list[str]:
        return ["unet"]

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        ref = np.flatnonzero(data.roles == "ref")
        rows = rng.choice(ref, cfg.batch_size, replace=len(ref) < cfg.batch_size)
        prompts = [self.eval_prompt(data.captions[i], self.style) for i in rows]
        return Batch(rows=rows, prompts=prompts, weights=torch.full((len(rows),), 1.0 / len(rows)))

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        return PROMPT.format(content=content, descriptor=style.descriptor)

    def rounds(self, job: TrainJob) -> Iterator[TrainJob]:
        if not self.options(TrainConfig.model_validate(job.train)).feedback:
            yield job
            return
        first = replace(job, key=sha256_of(job.key, "round 1"), model_dir=f"{job.model_dir}-round1",
                        log_path=str(Path(job.log_path).with_name("train_log_round1.jsonl")))
        yield first
        yield replace(job, curated_path=str(self.select_by_clip(first)))

    def select_by_clip(self, first: TrainJob) -> Path:
        """Sample K candidates per prompt with the round-1 model; the CLIP top-1 of each is round 2's data."""
        from style_factory.backbones import load_clip  # imported here, as in evaluate.py: heavy, and only needed now

        opts = self.options(TrainConfig.model_validate(first.train))
        data = first.load_data()
        ref = np.flatnonzero(data.roles == "ref")
        contents = opts.feedback_prompts or list(dict.fromkeys(data.captions[i] for i in ref))
        folder = Path(first.model_dir) / "feedback"
        candidates = SampleJob(
            style=first.style, method=self.name, family=first.family, base_model=first.base_model,
            model_dir=first.model_dir,
            prompts=[self.eval_prompt(c, self.style) for c in contents], seeds=list(range(opts.feedback_candidates)),
            out_dir=str(folder / "candidates"), key=first.key, resolution=data.pixels.shape[-1],
            num_inference_steps=opts.feedback_inference_steps, guidance_scale=opts.feedback_guidance_scale)
        if not candidates.is_done():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            generate_images(candidates, self.load_for_sampling(get_family(first.family), first.base_model,
                                                               first.model_dir, device),
                            batch_size_for(first.sample_batch_size, device))
        clip = load_clip(opts.clip)
        texts = clip.embed_texts(candidates.prompts)  # the whole prompt: the content and the style's words
        rows, scores = [], []
        for index, content in enumerate(contents):
            paths = [Path(candidates.out_dir) / sample_name(index, seed) for seed in candidates.seeds]
            images = [Image.open(path).convert("RGB") for path in paths]
            similarity = clip.embed_images(images) @ texts[index]
            best = int(np.argmax(similarity))
            width, height = images[best].size
            rows.append({"style": first.style, "role": "ref", "concept": 0, "token": data.tokens[ref[0]],
                         "class_word": data.class_words[ref[0]], "caption": content, "caption_source": "round 1",
                         "image": paths[best].read_bytes(), "width": width, "height": height,
                         "original_width": width, "original_height": height, "crop_left": 0, "crop_top": 0,
                         "source_path": str(paths[best].relative_to(folder)),
                         "content_hash": hashlib.sha256(images[best].tobytes()).hexdigest()})
            scores.append({"prompt": content, "clip_scores": similarity.tolist(), "selected": paths[best].name})
        write_json_atomic(folder / "scores.json", {"clip": clip.info.name, "prompts": scores})
        curated = folder / "curated.parquet"
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), curated)
        return curated

    def export(self, pipe: DiffusionPipeline, models: Components, out_dir: Path, cfg: TrainConfig) -> None:
        save_lora(out_dir, models.family, unet=models.unet)

    def load_for_sampling(self, family: Family, base_model: str, model_dir: str, device: str) -> DiffusionPipeline:
        pipe = family.load_pipeline(base_model, device)
        pipe.load_lora_weights(model_dir)
        return pipe
