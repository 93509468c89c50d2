"""StyleDrop (Sohn et al., arXiv 2306.00983) on a diffusion UNet: a small adapter, descriptive prompts, CLIP feedback.

Muse's adapters sit after the attention and after the MLP of every transformer layer; on the UNet they become a
peft LoRA (rank 4) on every transformer block's attention projections (to_q, to_k, to_v, to_out.0), its MLP
(ff.net.0.proj, ff.net.2) and its projections in and out: 1.70 M weights = 0.20% of SD1.5's UNet (the PyTorch port's
adapters: 2.06 M), 77,312 = 2.8% of the tiny one; everything else frozen (where it sits, and why: docs/methods.md).
Prompts describe the style in words, "<content> in <descriptor> style", rather than binding it to a rare token.

Two rounds, the paper's feedback rules (the PyTorch port has no round 2):
1. train on the StyleRef images; the adapter is exported beside the model, in `<model>-round1/`;
2. the round-1 model draws K candidates for each feedback prompt (`<model>-round1/feedback/candidates/`, named
   p<prompt>_s<seed>.png), round 2's images are chosen from them, and a fresh adapter is trained on just those
   (`feedback/curated.parquet`, in curate.py's schema). Round 2 is the model that is evaluated. `feedback`:
   - `clip`: CLIP keeps the candidate closest to its whole prompt (content and descriptor, as the paper scores
     them), one per prompt (`feedback/scores.json`);
   - `human` (the paper's HF): the candidates a person listed in `feedback_images` (or a `feedback_file`, read when
     the config loads). With none listed the job stops after sampling the candidates, saying where they are and
     what to set; round 1 and its candidates are keyed without the selection (`first_round_settings`), so the
     rerun with the names reuses them and trains round 2 alone.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from style_factory.config import ConfigPath, StyleConfig, TrainConfig
from style_factory.data import StyleData, curated_table
from style_factory.families import get_family
from style_factory.families.base import Components, Family
from style_factory.files import sha256_of, write_json_atomic, write_parquet_atomic
from style_factory.lora import add_lora, load_adapter, save_lora
from style_factory.methods.base import Batch, Method
from style_factory.sampling import SampleJob, batch_size_for, generate_images, sample_name
from style_factory.train_job import TrainJob

PROMPT = "{content} in {descriptor} style"
CANDIDATE = re.compile(r"p(?P<prompt>\d{3,})_s(?P<seed>\d+)\.png")  # style_factory.sampling.sample_name's names
SELECTION_ONLY = ("feedback", "feedback_images", "feedback_file", "clip")  # options that decide round 2 alone


class StyleDropOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    adapter: Literal["lora", "dora", "lokr"] = "lora"  # peft's kind (style_factory/lora.py: which tool loads which)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2", "proj_in", "proj_out"])
    # round 2's images: "clip" (CLIP's top-1 per prompt), "human" (feedback_images), false (round 1 only)
    feedback: Literal["clip", "human", False] = "clip"
    # human: round-1 candidate names (p<prompt>_s<seed>.png, as the report's candidate grid shows them)
    feedback_images: list[str] | None = Field(None, min_length=1)
    feedback_file: Annotated[str | None, ConfigPath(lines_into="feedback_images")] = None  # the names, one a line
    feedback_prompts: list[str] | None = None  # content prompts; None: the StyleRef captions
    feedback_candidates: int = Field(4, ge=1)  # images per prompt from the round-1 model (the paper: 64)
    feedback_inference_steps: int = Field(20, ge=1)
    feedback_guidance_scale: float = Field(5.0, ge=0)
    # the scorer, as evaluate.clip: "auto" | "toy" | [ARCH:]path (relative: to the config file that sets it)
    clip: Annotated[str, ConfigPath(spec=True)] = "auto"

    @model_validator(mode="after")
    def _selection_fits(self) -> StyleDropOptions:
        """The form of a human selection: candidate names, each once, of seeds (and prompts) the round draws."""
        if self.feedback_images is not None and self.feedback_file is not None:
            raise ValueError("set feedback_images or feedback_file, not both")
        if self.feedback != "human" and (self.feedback_images is not None or self.feedback_file is not None):
            raise ValueError(f"feedback_images / feedback_file are for feedback: human (feedback is "
                             f"{self.feedback!r})")
        names = self.feedback_images or []
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"feedback_images lists {repeated} more than once")
        prompts = len(self.feedback_prompts) if self.feedback_prompts else None
        for name in names:
            match = CANDIDATE.fullmatch(name)
            if match is None:
                raise ValueError(f"feedback_images: {name!r} is not a round-1 candidate name (p<prompt>_s<seed>.png, "
                                 "e.g. p000_s1.png)")
            seed, prompt = int(match["seed"]), int(match["prompt"])
            if seed >= self.feedback_candidates or (prompts is not None and prompt >= prompts):
                raise ValueError(f"feedback_images: {name!r} is not drawn: round 1 draws seeds 0-"
                                 f"{self.feedback_candidates - 1}" + (f" for prompts 000-{prompts - 1:03d}" if prompts
                                                                      else ""))
        return self


class StyleDrop(Method):
    name = "styledrop"
    Options = StyleDropOptions

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        opts = self.options(cfg)
        models.vae.requires_grad_(False)
        for encoder in models.text_encoders.values():
            encoder.requires_grad_(False)
        return [{"params": add_lora(models.unet, opts.rank, opts.alpha, opts.target_modules,
                                       opts.adapter), "lr": cfg.learning_rate}]

    def trained_modules(self, models: Components, cfg: TrainConfig) -> list[str]:
        return ["unet"]

    def sample_batch(self, data: StyleData, cfg: TrainConfig, rng: np.random.Generator) -> Batch:
        ref = data.indices("ref")
        rows = rng.choice(ref, cfg.batch_size, replace=len(ref) < cfg.batch_size)
        prompts = [self.eval_prompt(data.captions[i], self.style) for i in rows]
        return Batch(rows=rows, prompts=prompts, weights=torch.full((len(rows),), 1.0 / len(rows)))

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        return PROMPT.format(content=content, descriptor=style.descriptor)

    def first_round_settings(self, settings: dict) -> dict:
        own = settings["method_options"].get(self.name, {})
        return {**settings, "method_options": {self.name: {k: v for k, v in own.items() if k not in SELECTION_ONLY}}}

    def rounds(self, job: TrainJob) -> Iterator[TrainJob]:
        opts = self.options(TrainConfig.model_validate(job.train))
        if opts.feedback is False:
            yield job
            return
        first = replace(job, key=sha256_of(job.first_round_key or job.key, "round 1"),
                        model_dir=f"{job.model_dir}-round1", keep_steps=[],
                        log_path=str(Path(job.log_path).with_name("train_log_round1.jsonl")))
        yield first
        candidates = self.draw_candidates(first)
        selected = self.select_by_clip(first, candidates) if opts.feedback == "clip" else \
            self.select_by_name(first, candidates, opts.feedback_images)
        yield replace(job, curated_path=str(selected))

    def draw_candidates(self, first: TrainJob) -> SampleJob:
        """The round-1 model's K candidates per feedback prompt (sampled unless already there)."""
        opts = self.options(TrainConfig.model_validate(first.train))
        data = first.load_data()  # its resolution
        prompts = [self.eval_prompt(c, self.style) for c in self.contents(first)]
        seeds = list(range(opts.feedback_candidates))
        candidates = SampleJob(
            style=first.style, method=self.name, family=first.family, base_model=first.base_model,
            model_dir=first.model_dir, prompts=prompts, seeds=seeds,
            out_dir=str(Path(first.model_dir) / "feedback" / "candidates"),
            key=sha256_of(first.key, prompts, seeds, opts.feedback_inference_steps, opts.feedback_guidance_scale),
            resolution=data.resolution, num_inference_steps=opts.feedback_inference_steps,
            guidance_scale=opts.feedback_guidance_scale)
        if not candidates.is_done():
            device = "cuda" if torch.cuda.is_available() else "cpu"
            generate_images(candidates, self.load_for_sampling(get_family(first.family), first.base_model,
                                                               first.model_dir, device),
                            batch_size_for(first.sample_batch_size, device))
        return candidates

    def select_by_clip(self, first: TrainJob, candidates: SampleJob) -> Path:
        """The CLIP top-1 of each prompt's candidates, as round 2's data."""
        from style_factory.backbones import load_clip  # imported here, as in evaluate.py: heavy, and only needed now

        clip = load_clip(self.options(TrainConfig.model_validate(first.train)).clip)
        texts = clip.embed_texts(candidates.prompts)  # the whole prompt: the content and the style's words
        chosen, scores = [], []
        for index, content in enumerate(self.contents(first)):
            paths = [Path(candidates.out_dir) / sample_name(index, seed) for seed in candidates.seeds]
            similarity = clip.embed_images([Image.open(path).convert("RGB") for path in paths]) @ texts[index]
            best = paths[int(np.argmax(similarity))]
            chosen.append(best)
            scores.append({"prompt": content, "clip_scores": similarity.tolist(),
                           "selected": best.name})
        write_json_atomic(Path(candidates.out_dir).parent / "scores.json", {"clip": clip.info.name, "prompts": scores})
        return self.write_selection(first, candidates, chosen)

    def select_by_name(self, first: TrainJob, candidates: SampleJob, names: list[str] | None) -> Path:
        """The candidates a person listed (feedback: human), as round 2's data; with none listed, or a name that is
        not a candidate, the job stops before round 2 trains, saying where the candidates are."""
        folder = Path(candidates.out_dir)
        drawn = sorted(path.name for path in folder.glob("*.png"))
        where = (f"round 1's {len(drawn)} candidates are in {folder} (and in the report's StyleDrop round-1 grid, "
                 "with their names)")
        if not names:
            raise ValueError(
                f"feedback: human: no images chosen for round 2 of style {first.style!r}: {where}; list the ones to "
                "train round 2 on (the paper picks about 10) under train.method_options.styledrop.feedback_images "
                "(or one a line in a feedback_file) of the run config, or of the style's style.yaml `train` section, "
                "and rerun: round 1 and its candidates are reused")
        if unknown := [name for name in names if name not in drawn]:
            raise ValueError(f"train.method_options.styledrop.feedback_images: {unknown} of style {first.style!r} "
                             f"are not round-1 candidates: {where}")
        write_json_atomic(folder.parent / "selection.json", {"feedback": "human", "images": names})
        return self.write_selection(first, candidates, [folder / name for name in names])

    def contents(self, first: TrainJob) -> list[str]:
        """The feedback prompts' contents, in order."""
        opts = self.options(TrainConfig.model_validate(first.train))
        data = first.load_data()
        ref = np.flatnonzero(data.roles == "ref")
        return opts.feedback_prompts or list(dict.fromkeys(data.captions[i] for i in ref))

    def write_selection(self, first: TrainJob, candidates: SampleJob, chosen: list[Path]) -> Path:
        """`feedback/curated.parquet`: the chosen candidates, each captioned with its prompt's content."""
        data = first.load_data()
        ref = np.flatnonzero(data.roles == "ref")
        contents, folder = self.contents(first), Path(candidates.out_dir).parent
        rows = []
        for path in chosen:
            image = Image.open(path).convert("RGB")
            width, height = image.size
            rows.append({"style": first.style, "role": "ref", "concept": 0, "token": data.tokens[ref[0]],
                         "class_word": data.class_words[ref[0]],
                         "caption": contents[int(CANDIDATE.fullmatch(path.name)["prompt"])],
                         "caption_source": "round 1", "image": path.read_bytes(), "width": width, "height": height,
                         "original_width": width, "original_height": height, "crop_left": 0, "crop_top": 0,
                         "source_path": str(path.relative_to(folder)),
                         "content_hash": hashlib.sha256(image.tobytes()).hexdigest()})
        curated = folder / "curated.parquet"
        write_parquet_atomic(curated_table(rows, data.resolution), curated)
        return curated

    def export(self, pipe: DiffusionPipeline, models: Components, out_dir: Path, cfg: TrainConfig) -> None:
        save_lora(out_dir, models.family, unet=models.unet)

    def load_for_sampling(self, family: Family, base_model: str, model_dir: str, device: str) -> DiffusionPipeline:
        pipe = family.load_pipeline(base_model, device)
        load_adapter(pipe, model_dir)
        return pipe
