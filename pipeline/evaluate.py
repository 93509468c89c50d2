"""Evaluate: sample every model (base + each trained method) on one protocol, score it, write results.parquet.

Per style and model: FID and KID (clean-fid's functions on Inception features) against the style's
StyleRef images, CLIP-T (image vs. the content prompt without style words) and CLIP style similarity
(image vs. the StyleRef images), with open_clip. The backbones used, and whether they are real
weights or the tiny stand-ins, are written into every row.
"""
from __future__ import annotations

import io
import json
import platform
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from pipeline import metrics
from pipeline.files import code_version, replace_dir_atomic, sha256_of, write_json_atomic, write_parquet_atomic
from pipeline.generate import DEFAULT_PROMPTS, SampleJob, generate_all, sample_name
from pipeline.methods import get_method
from pipeline.models import resolve_base_model
from pipeline.run import Run

RESULTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("style", pa.string()), ("display_name", pa.string()), ("method", pa.string()),
    ("tokens", pa.string()), ("base_model", pa.string()), ("prompt", pa.string()),
    ("n_images", pa.int32()), ("n_reference", pa.int32()), ("seeds", pa.list_(pa.int64())),
    ("fid", pa.float64()), ("kid", pa.float64()), ("kid_std", pa.float64()),
    ("clip_t", pa.float64()), ("style_sim", pa.float64()),
    ("inception_backbone", pa.string()), ("clip_backbone", pa.string()), ("backbones_real", pa.bool_()),
    ("samples_dir", pa.string()), ("model_dir", pa.string()), ("config_hash", pa.string()),
    ("versions", pa.string()), ("created_at", pa.timestamp("s", tz="UTC")),
])
PACKAGES = ("torch", "diffusers", "transformers", "ray", "clean-fid", "open_clip_torch", "pyarrow", "scipy")


def content_prompts(run: Run) -> list[str]:
    return run.config.evaluate.prompts or DEFAULT_PROMPTS


def base_prompt(content: str, descriptor: str) -> str:
    """The untuned model is asked for the style in words: the fair zero-effort baseline."""
    return f"{content}, {descriptor}"


def plan_samples(run: Run, trained: dict[tuple[str, str], str]) -> list[SampleJob]:
    """One job per style for the base model and one per trained (style, method) -> model folder."""
    cfg = run.config.evaluate
    contents = content_prompts(run)
    base = resolve_base_model(run.config.model.base, run.base_models_dir)
    protocol = [contents, cfg.seeds, cfg.num_inference_steps, cfg.guidance_scale, run.config.model.resolution]
    jobs = []
    for style in run.live_styles():
        models = {"base": ("", [base_prompt(c, style.config.descriptor) for c in contents], base)}
        for (name, method), model_dir in trained.items():
            if name == style.name:
                card = json.loads((Path(model_dir) / "model_card.json").read_text())
                prompts = [get_method(method).eval_prompt(c, style.config) for c in contents]
                models[method] = (model_dir, prompts, card["key"])
        for method, (model_dir, prompts, model_key) in models.items():
            jobs.append(SampleJob(
                style=style.name, method=method, base_model=base, model_dir=model_dir, prompts=prompts,
                seeds=cfg.seeds,
                out_dir=str(run.samples_dir(style.name, method)),
                key=sha256_of(model_key, prompts, protocol, code_version("generate.py", "models.py")),
                resolution=run.config.model.resolution, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale))
    return jobs


def reference_images(run: Run, style: str) -> list[Image.Image]:
    """The curated StyleRef images (the metric reference), also written as PNGs for the report."""
    table = pq.read_table(run.curated(style), columns=["role", "image"]).to_pydict()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for r, b in zip(table["role"], table["image"]) if r == "ref"]
    out = run.samples_dir(style, "ref")  # replaced whole: no half-written or stale PNG from an earlier run
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    for i, image in enumerate(images):
        image.save(tmp / f"ref_{i:03d}.png")
    replace_dir_atomic(tmp, out)
    return images


@ray.remote(num_cpus=1)
def score_models(entries: list[dict], evaluate_cfg: dict, models_dir: str | None) -> list[dict]:
    """Load the backbones once and score every (style, model) entry."""
    import torch

    from pipeline.backbones import load_clip, load_inception

    torch.set_num_threads(1)
    inception = load_inception(evaluate_cfg["inception"], models_dir)
    clip = load_clip(evaluate_cfg["clip"], models_dir)
    reference_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    for entry in entries:
        try:
            if entry["style"] not in reference_cache:
                refs = [Image.open(p).convert("RGB") for p in entry["reference"]]
                reference_cache[entry["style"]] = (inception.embed(refs), clip.embed_images(refs))
            ref_feats, ref_clip = reference_cache[entry["style"]]
            images = [Image.open(p).convert("RGB") for p in entry["images"]]
            feats, gen_clip = inception.embed(images), clip.embed_images(images)
            rows.append({
                "style": entry["style"], "method": entry["method"],
                "fid": metrics.fid(feats, ref_feats),
                "kid": metrics.kid(feats, ref_feats, seed=evaluate_cfg["kid_seed"]),
                "clip_t": metrics.clip_text_alignment(gen_clip, clip.embed_texts(entry["texts"])),
                "style_sim": metrics.style_similarity(gen_clip, ref_clip),
                "inception_backbone": inception.info.name, "clip_backbone": clip.info.name,
                "backbones_real": inception.info.real and clip.info.real,
            })
        except (OSError, ValueError) as err:  # one unscorable model must not lose the others' rows
            rows.append({"style": entry["style"], "method": entry["method"], "error": f"{type(err).__name__}: {err}"})
    return rows


def record_metrics_in_card(model_dir: Path, row: dict) -> None:
    """The model card travels with the model: it carries the latest evaluation of it."""
    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = {k: row[k] for k in ("run_id", "fid", "kid", "clip_t", "style_sim", "n_images",
                                           "inception_backbone", "clip_backbone", "backbones_real")}
    write_json_atomic(card_path, card)


def evaluate(run: Run, trained: dict[tuple[str, str], str]) -> Path | None:
    """Generate and score; returns the results table path, or None when no style is left to score."""
    cfg = run.config.evaluate
    jobs = plan_samples(run, trained)
    for (style, method), error in generate_all(jobs, cfg.gpus_per_task).items():
        run.record(style, f"generate:{method}", error)
    contents = content_prompts(run)
    write_json_atomic(run.dir / "samples" / "prompts.json", [{"index": i, "content": c} for i, c in enumerate(contents)])
    entries, by_key = [], {}
    references: dict[str, list[str]] = {}
    for job in jobs:
        if run.failed(job.style):
            continue
        if job.style not in references:
            count = len(reference_images(run, job.style))
            references[job.style] = [str(run.samples_dir(job.style, "ref") / f"ref_{i:03d}.png") for i in range(count)]
        images = [str(Path(job.out_dir) / sample_name(i, s)) for i in range(len(contents)) for s in job.seeds]
        texts = [c for c in contents for _ in job.seeds]
        entries.append({"style": job.style, "method": job.method, "images": images, "texts": texts,
                        "reference": references[job.style]})
        by_key[(job.style, job.method)] = job
    if not entries:
        return None
    scores = ray.get(score_models.remote(entries, cfg.model_dump(), run.config.model.models_dir))
    versions = json.dumps({"python": platform.python_version(), **{p: version(p) for p in PACKAGES}})
    created = datetime.now(timezone.utc)
    styles = {s.name: s for s in run.styles}
    rows = []
    for score in scores:
        job = by_key[(score["style"], score["method"])]
        if "error" in score:
            run.record(job.style, f"evaluate:{job.method}", score["error"])
            continue
        style = styles[score["style"]]
        rows.append({
            **score, "run_id": run.config.name, "display_name": style.config.display_name,
            "tokens": "" if job.method == "base" else " ".join(style.config.tokens),
            "base_model": run.config.model.base, "prompt": job.prompts[0],
            "n_images": len(contents) * len(job.seeds), "n_reference": len(references[job.style]),
            "seeds": list(job.seeds), "kid_std": float("nan"),
            "samples_dir": str(Path(job.out_dir).relative_to(run.dir)),
            "model_dir": str(Path(job.model_dir).relative_to(run.dir)) if job.model_dir else "",
            "config_hash": run.config.digest()[:16], "versions": versions, "created_at": created,
        })
        run.record(job.style, f"evaluate:{job.method}", "ok")
        if job.model_dir:
            record_metrics_in_card(Path(job.model_dir), rows[-1])
    if not rows:
        return None
    if not all(row["backbones_real"] for row in rows):
        print(f"[evaluate] WARNING: metrics use tiny stand-in backbones ({rows[0]['inception_backbone']}, "
              f"{rows[0]['clip_backbone']}): compare them only within this setup, not with published numbers. "
              "Put real weights in model.models_dir (see README).", flush=True)
    path = run.dir / "results.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), path)
    return path
