"""Evaluate: sample every model (base + each trained method) on one protocol, score it, write results.parquet.

Per style and model: FID and KID (clean-fid's functions on Inception features) against the style's
StyleRef images, CLIP-T (image vs. the content prompt without style words) and CLIP style similarity
(image vs. the StyleRef images), with open_clip, and DINO style consistency (pairwise cosine within
each generated set, one set per seed, as StyleAligned reports it); CSD style similarity (Somepalli et al. 2024) when
its weights are here, and the Inception Score from the Inception features and the network's output layer. The
backbones used, and whether they are real weights or the toy backbone (CSD: or not available), are written into
every row.

Uncertainty: one seeded bootstrap over each model's images gives kid_std and 95% intervals of KID,
CLIP-T and style similarity. Every model is sampled on the base's contents and seeds, so the same
resamples, drawn over (prompt, seed) pairs, also give a paired interval of the KID change against the
untuned base: the content each pair draws cancels out of it. A `noise-floor` row per style scores half
the StyleRef images against the other half. Every image is embedded once per backbone; the features go
to features.parquet.
"""
from __future__ import annotations

import io
import json
import platform
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from style_factory import metrics
from style_factory.config import STYLE_ADAPTER_METHOD, SUBJECT_METHOD, ComposeConfig, Style
from style_factory.control import CONTROL_EDGES, edge_alignment
from style_factory.files import (code_version, make_temp_dir, read_json, replace_dir_atomic, sha256_of, write_json_atomic,
                            write_parquet_atomic)
from style_factory.families import FAMILIES
from style_factory.generate import DEFAULT_PROMPTS, TOY_PROMPTS, generate_all, partial_dir
from style_factory.methods import METHODS, get_method
from style_factory.models import PRESETS, base_model_identity
from style_factory.progress import report
from style_factory.report import BASE_METHOD, NOISE_FLOOR  # the row names the report reads
from style_factory.run import Run
from style_factory.sampling import SAMPLES_MARKER, SampleJob, sample_name
from style_factory.tracking import log_evaluation
from style_factory.train_job import MODEL_CARD

RESULTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("style", pa.string()), ("display_name", pa.string()), ("method", pa.string()),
    ("tokens", pa.string()), ("base_model", pa.string()), ("family", pa.string()), ("prompt", pa.string()),
    ("n_images", pa.int32()), ("n_reference", pa.int32()), ("seeds", pa.list_(pa.int64())),
    ("fid", pa.float64()), ("kid", pa.float64()), ("kid_std", pa.float64()),
    ("kid_ci_low", pa.float64()), ("kid_ci_high", pa.float64()),
    ("kid_vs_base", pa.float64()), ("kid_vs_base_ci_low", pa.float64()), ("kid_vs_base_ci_high", pa.float64()),
    ("clip_t", pa.float64()), ("clip_t_ci_low", pa.float64()), ("clip_t_ci_high", pa.float64()),
    ("style_sim", pa.float64()), ("style_sim_ci_low", pa.float64()), ("style_sim_ci_high", pa.float64()),
    ("style_consistency", pa.float64()), ("style_consistency_ci_low", pa.float64()),
    ("style_consistency_ci_high", pa.float64()),
    ("n_heldout", pa.int32()), ("kid_heldout", pa.float64()), ("kid_heldout_ci_low", pa.float64()),
    ("kid_heldout_ci_high", pa.float64()), ("style_sim_heldout", pa.float64()),
    ("style_sim_heldout_ci_low", pa.float64()), ("style_sim_heldout_ci_high", pa.float64()),
    ("style_sim_csd", pa.float64()), ("style_sim_csd_ci_low", pa.float64()), ("style_sim_csd_ci_high", pa.float64()),
    ("style_sim_csd_heldout", pa.float64()), ("style_sim_csd_heldout_ci_low", pa.float64()),
    ("style_sim_csd_heldout_ci_high", pa.float64()),
    ("inception_score", pa.float64()), ("inception_score_ci_low", pa.float64()),
    ("inception_score_ci_high", pa.float64()),
    ("subject", pa.string()), ("gamma", pa.float64()), ("content_clip_i", pa.float64()),
    ("content_clip_i_ci_low", pa.float64()), ("content_clip_i_ci_high", pa.float64()), ("content_dino", pa.float64()),
    ("content_dino_ci_low", pa.float64()), ("content_dino_ci_high", pa.float64()),
    ("edge_alignment", pa.float64()), ("edge_alignment_ci_low", pa.float64()),
    ("edge_alignment_ci_high", pa.float64()),
    ("inception_backbone", pa.string()), ("clip_backbone", pa.string()), ("dino_backbone", pa.string()),
    ("csd_backbone", pa.string()),
    ("backbones_real", pa.bool_()), ("backbone_sha256", pa.string()),
    ("samples_dir", pa.string()), ("model_dir", pa.string()), ("config_hash", pa.string()),
    ("versions", pa.string()), ("created_at", pa.timestamp("s", tz="UTC")),
])
# One row per image per backbone: every metric can be recomputed from it without a GPU.
FEATURES_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("style", pa.string()), ("method", pa.string()), ("image", pa.string()),
    ("prompt_index", pa.int32()), ("seed", pa.int64()), ("backbone", pa.string()),
    ("feature", pa.list_(pa.float32())),
])
# a composition's similarity to its subject's images (NaN for every other model)
CONTENT_COLUMNS = [f"{name}{part}" for name in ("content_clip_i", "content_dino") for part in ("", "_ci_low", "_ci_high")]
# a controlled set's agreement with its content's edges (NaN for every model without a structure map)
EDGE_COLUMNS = ["edge_alignment", "edge_alignment_ci_low", "edge_alignment_ci_high"]
SCORES_DIR = "scores"  # per style: the rows and features that results.parquet and features.parquet gather
STEP_COLUMN = "step"  # results' column of the training step a model's weights are from
PACKAGES = ("torch", "diffusers", "transformers", "ray", "clean-fid", "open_clip_torch", "pyarrow", "scipy")


def content_prompts(run: Run) -> list[str]:
    if run.config.evaluate.prompts:
        return run.config.evaluate.prompts
    return TOY_PROMPTS if run.config.model.base in PRESETS else DEFAULT_PROMPTS


def base_prompt(content: str, descriptor: str) -> str:
    """The untuned model is asked for the style in words: the fair zero-effort baseline."""
    return f"{content}, {descriptor}"


def plan_samples(run: Run, trained: dict[tuple[str, str], str]) -> list[SampleJob]:
    """One job per style for the base model and one per trained (style, model name) -> model folder, then those of
    the LoRAs extracted from them and of the compositions; a job's out_dir is `samples/<style>/<model name>`."""
    cfg = run.config.evaluate
    contents = content_prompts(run)
    base, family = run.base_model, run.family
    protocol = [contents, cfg.seeds, cfg.num_inference_steps, cfg.guidance_scale, run.resolution]
    jobs = []
    for style in run.live_styles():
        if style.subject:  # a subject is scored only in the compositions that name it
            continue
        base_prompts = [base_prompt(c, style.config.descriptor) for c in contents]
        models = {BASE_METHOD: (BASE_METHOD, "", base_prompts, base_model_identity(base))}
        for (style_name, name), model_dir in trained.items():
            if style_name == style.name:
                card = read_json(Path(model_dir) / MODEL_CARD)
                method = card["method"]
                prompts = [get_method(method).eval_prompt(c, style.config) for c in contents]
                models[name] = (method, model_dir, prompts, card["key"])
        for name, (method, model_dir, prompts, model_key) in models.items():
            # the code that draws the images: the stage, the family's pipeline, the method's sampler if any
            code = code_version("style_factory.generate", FAMILIES[family].__module__,
                                *([METHODS[method].__module__] if model_dir else []))
            jobs.append(SampleJob(
                style=style.name, method=method, family=family, base_model=base, model_dir=model_dir,
                prompts=prompts, seeds=cfg.seeds, out_dir=str(run.samples_dir(style.name, name)),
                key=sha256_of(model_key, prompts, protocol, code),
                resolution=run.resolution, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale))
        jobs += plan_extracted_loras(run, style, trained, contents, protocol)
        jobs += plan_compositions(run, style, trained, contents, protocol)
    return jobs


def extracted_lora_name(name: str, rank: int) -> str:
    """The model name of the LoRA extracted from model `name` (a method, or its samples folder's name):
    `styleboost-lora16`."""
    return f"{name}-lora{rank}"


def plan_extracted_loras(run: Run, style: Style, trained: dict[tuple[str, str], str], contents: list[str],
                         protocol: list) -> list[SampleJob]:
    """One job per trained model of `style` whose card has an `extracted_lora` (train.export.extract_lora_rank): the
    base with that LoRA's file alone (its folder inside the fine-tune's), asked the fine-tune's prompts, keyed by the
    fine-tune's key and the rank; scored as a model of its own, `<method>-lora<rank>`."""
    cfg, jobs = run.config.evaluate, []
    code = code_version("style_factory.generate", FAMILIES[run.family].__module__)  # generate loads the file
    for (style_name, name), model_dir in trained.items():
        card = read_json(Path(model_dir) / MODEL_CARD) if style_name == style.name else None
        lora = (card or {}).get("extracted_lora")
        if lora is None:
            continue
        prompts = [get_method(card["method"]).eval_prompt(c, style.config) for c in contents]
        jobs.append(SampleJob(
            style=style.name, method=extracted_lora_name(card["method"], lora["rank"]), family=run.family,
            base_model=run.base_model, model_dir=str(Path(model_dir) / lora["folder"]), extracted_from=model_dir,
            prompts=prompts, seeds=cfg.seeds, out_dir=str(run.samples_dir(style.name,
                                                                          extracted_lora_name(name, lora["rank"]))),
            key=sha256_of(card["key"], "extracted_lora", lora["rank"], prompts, protocol, code),
            resolution=run.resolution, num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale))
    return jobs


def composition_name(entry: ComposeConfig) -> str:
    """A composition's model name (its samples folder and `method` in results): what it mixes, and how."""
    return f"compose-{entry.style}-{entry.content}-g{entry.gamma:g}"


def plan_compositions(run: Run, style: Style, trained: dict[tuple[str, str], str], contents: list[str],
                      protocol: list) -> list[SampleJob]:
    """One job per evaluate.compose entry of `style` whose two adapters are trained: the style's StyleDrop model
    and the subject's content model, asked for each content prompt with the subject's words and the style's."""
    cfg, jobs = run.config.evaluate, []
    subjects = {s.name: s for s in run.live_styles() if s.subject}
    for entry in cfg.compose:
        if entry.style != style.name:
            continue
        style_dir, content_dir = trained.get((style.name, STYLE_ADAPTER_METHOD)), trained.get((entry.content,
                                                                                                SUBJECT_METHOD))
        if style_dir is None or content_dir is None or entry.content not in subjects:
            print(f"[evaluate] {composition_name(entry)}: not sampled, its {STYLE_ADAPTER_METHOD} or "
                  f"{SUBJECT_METHOD} model is not trained", flush=True)
            continue
        subject = subjects[entry.content].config
        prompts = [get_method(STYLE_ADAPTER_METHOD).eval_prompt(get_method(SUBJECT_METHOD).eval_prompt(c, subject),
                                                                 style.config) for c in contents]
        keys = [read_json(Path(folder) / MODEL_CARD)["key"] for folder in (style_dir, content_dir)]
        code = code_version("style_factory.generate", FAMILIES[run.family].__module__,
                            METHODS[STYLE_ADAPTER_METHOD].__module__, METHODS[SUBJECT_METHOD].__module__)
        jobs.append(SampleJob(
            style=style.name, method=STYLE_ADAPTER_METHOD, family=run.family, base_model=run.base_model,
            model_dir=style_dir, content_dir=content_dir, gamma=entry.gamma, prompts=prompts, seeds=cfg.seeds,
            out_dir=str(run.samples_dir(style.name, composition_name(entry))),
            key=sha256_of(keys, entry.gamma, prompts, protocol, code), resolution=run.resolution,
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale))
    return jobs


def composition_entry(run: Run, job: SampleJob) -> dict:
    """A composition's extra fields for scoring: its subject, gamma and the subject's curated images."""
    if not job.content_dir:
        return {}
    subject = Path(job.content_dir).parent.name  # models/<subject>/content
    return {"subject": subject, "gamma": job.gamma, "subject_images": reference_images(run, subject)}


def control_entry(job: SampleJob) -> dict:
    """A controlled model's extra field for scoring: the edges its set follows, where its folder has them."""
    edges = Path(job.model_dir) / CONTROL_EDGES if job.model_dir else None
    return {"control_edges": str(edges)} if edges is not None and edges.is_file() else {}


def content_scores(gen_clip: np.ndarray, gen_dino: np.ndarray, subject_clip: np.ndarray, subject_dino: np.ndarray,
                   seed: int) -> dict:
    """DreamBooth's subject fidelity: per image, its mean CLIP (CLIP-I) and DINO cosine to the subject's images,
    averaged, with 95% intervals from the same seeded bootstrap over the images as the other metrics."""
    resamples = metrics.bootstrap_indices(len(gen_clip), seed)
    scores = {}
    for name, gen, subject in (("content_clip_i", gen_clip, subject_clip), ("content_dino", gen_dino, subject_dino)):
        per_image = metrics.style_cosines(gen, subject)
        scores[name] = float(per_image.mean())
        scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = metrics.percentile_interval(
            per_image[resamples].mean(axis=1))
    return scores


def edge_scores(paths: list[str], edges_path: str, seed: int) -> dict:
    """How closely a controlled set follows its structure: per image, the share of its Canny edges near the content's
    (control.edge_alignment), averaged, with a 95% interval from the same seeded bootstrap over the images."""
    edges = Image.open(edges_path)
    per_image = np.array([edge_alignment(Image.open(path).convert("RGB"), edges) for path in paths])
    low, high = metrics.percentile_interval(per_image[metrics.bootstrap_indices(len(paths), seed)].mean(axis=1))
    return dict(zip(EDGE_COLUMNS, (float(per_image.mean()), low, high)))


def reference_images(run: Run, style: str, role: str = "ref") -> list[str]:
    """The curated StyleRef (or held-out StyleRef) images, written as PNGs for the metrics and the report."""
    table = pq.read_table(run.curated(style), columns=["role", "image"]).to_pydict()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for r, b in zip(table["role"], table["image"]) if r == role]
    out = run.samples_dir(style, role)  # replaced whole: no half-written or stale PNG from an earlier run
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    for i, image in enumerate(images):
        image.save(tmp / f"{role}_{i:03d}.png")
    replace_dir_atomic(tmp, out)
    return [str(out / f"{role}_{i:03d}.png") for i in range(len(images))]


def stored_features(features: np.ndarray) -> np.ndarray:
    """Features as features.parquet keeps them (float32): metrics use exactly these, so they recompute exactly."""
    return features.astype(np.float32)


def image_scores(feats: np.ndarray, gen_clip: np.ndarray, gen_dino: np.ndarray, sets: list[int],
                 text_emb: np.ndarray | None, ref_feats: np.ndarray, ref_clip: np.ndarray, seed: int) -> dict:
    """FID, KID, CLIP and DINO scores of one image set against a reference set, with bootstrap spreads.

    One seeded bootstrap over the scored images (the reference set stays fixed) gives kid_std and the
    95% percentile intervals; without texts (the noise floor) clip_t and its interval are NaN. Style
    consistency is the mean DINO cosine between images of one generated set (`sets`: one per seed).
    """
    resamples = metrics.bootstrap_indices(len(feats), seed)
    kid_values = metrics.kid_bootstrap(feats, ref_feats, resamples)
    style_per_image = metrics.style_cosines(gen_clip, ref_clip)
    consistency_per_image = metrics.set_consistency(gen_dino, np.asarray(sets))
    scores = {
        "fid": metrics.fid(feats, ref_feats),
        "kid": metrics.kid(feats, ref_feats, seed=seed),
        "kid_std": float(np.nanstd(kid_values, ddof=1)),
        "style_sim": float(style_per_image.mean()),
        "clip_t": float("nan"), "clip_t_ci_low": float("nan"), "clip_t_ci_high": float("nan"),
    }
    scores["kid_ci_low"], scores["kid_ci_high"] = metrics.percentile_interval(kid_values)
    scores["style_sim_ci_low"], scores["style_sim_ci_high"] = metrics.percentile_interval(
        style_per_image[resamples].mean(axis=1))
    scores["style_consistency"] = float(np.nanmean(consistency_per_image))
    scores["style_consistency_ci_low"], scores["style_consistency_ci_high"] = metrics.percentile_interval(
        np.nanmean(consistency_per_image[resamples], axis=1))
    if text_emb is not None:
        text_per_image = metrics.image_text_cosines(gen_clip, text_emb)
        scores["clip_t"] = float(text_per_image.mean())
        scores["clip_t_ci_low"], scores["clip_t_ci_high"] = metrics.percentile_interval(
            text_per_image[resamples].mean(axis=1))
    return scores


def kid_change_scores(feats: np.ndarray, base_feats: np.ndarray, ref_feats: np.ndarray, seed: int) -> dict:
    """KID of a model minus the base's, with a paired 95% bootstrap interval.

    Row i of both sets is the same (prompt, seed) pair, so one set of resampled rows serves both KIDs:
    the interval holds the change alone, not the spread of the content drawn.
    """
    if len(feats) != len(base_feats):
        raise ValueError(f"paired KID change needs the base's {len(base_feats)} images, got {len(feats)}")
    resamples = metrics.bootstrap_indices(len(feats), seed)
    changes = (metrics.kid_bootstrap(feats, ref_feats, resamples)
               - metrics.kid_bootstrap(base_feats, ref_feats, resamples))
    low, high = metrics.percentile_interval(changes)
    return {"kid_vs_base": metrics.kid(feats, ref_feats, seed=seed) - metrics.kid(base_feats, ref_feats, seed=seed),
            "kid_vs_base_ci_low": low, "kid_vs_base_ci_high": high}


def heldout_scores(feats: np.ndarray, gen_clip: np.ndarray, heldout_feats: np.ndarray | None,
                   heldout_clip: np.ndarray | None, seed: int) -> dict:
    """KID and style similarity against the held-out StyleRef images (never trained on); NaN without them."""
    if heldout_feats is None or len(heldout_feats) < 2:
        names = ("kid_heldout", "kid_heldout_ci_low", "kid_heldout_ci_high",
                 "style_sim_heldout", "style_sim_heldout_ci_low", "style_sim_heldout_ci_high")
        return {"n_heldout": 0 if heldout_feats is None else len(heldout_feats), **dict.fromkeys(names, float("nan"))}
    resamples = metrics.bootstrap_indices(len(feats), seed)
    kid_values = metrics.kid_bootstrap(feats, heldout_feats, resamples)
    style_per_image = metrics.style_cosines(gen_clip, heldout_clip)
    scores = {"n_heldout": len(heldout_feats), "kid_heldout": metrics.kid(feats, heldout_feats, seed=seed),
              "style_sim_heldout": float(style_per_image.mean())}
    scores["kid_heldout_ci_low"], scores["kid_heldout_ci_high"] = metrics.percentile_interval(kid_values)
    scores["style_sim_heldout_ci_low"], scores["style_sim_heldout_ci_high"] = metrics.percentile_interval(
        style_per_image[resamples].mean(axis=1))
    return scores


def csd_scores(gen_csd: np.ndarray | None, ref_csd: np.ndarray | None, heldout_csd: np.ndarray | None,
               seed: int) -> dict:
    """CSD style similarity (mean cosine of each image's CSD style embedding to the StyleRef images'), and against
    the held-out StyleRef images (at least 2), with intervals over the same resamples as style_sim; NaN without CSD
    weights or those images."""
    scores = {f"style_sim_csd{part}{bound}": float("nan") for part in ("", "_heldout")
              for bound in ("", "_ci_low", "_ci_high")}
    if gen_csd is None:
        return scores
    resamples = metrics.bootstrap_indices(len(gen_csd), seed)
    for part, reference, at_least in (("", ref_csd, 1), ("_heldout", heldout_csd, 2)):
        if reference is None or len(reference) < at_least:
            continue
        per_image = metrics.style_cosines(gen_csd, reference)
        scores[f"style_sim_csd{part}"] = float(per_image.mean())
        scores[f"style_sim_csd{part}_ci_low"], scores[f"style_sim_csd{part}_ci_high"] = metrics.percentile_interval(
            per_image[resamples].mean(axis=1))
    return scores


def inception_scores(feats: np.ndarray, class_weight: np.ndarray | None, seed: int) -> dict:
    """The Inception Score of a model's images, from their stored Inception features and the network's output
    layer (metrics.inception_score: one split), with its interval over the same resamples as KID; NaN without the
    real Inception (the toy backbone has no ImageNet classes)."""
    if class_weight is None:
        return dict.fromkeys(("inception_score", "inception_score_ci_low", "inception_score_ci_high"), float("nan"))
    logits = feats.astype(np.float64) @ class_weight.T
    low, high = metrics.percentile_interval(
        metrics.inception_score_bootstrap(logits, metrics.bootstrap_indices(len(feats), seed)))
    return {"inception_score": metrics.inception_score(logits), "inception_score_ci_low": low,
            "inception_score_ci_high": high}


def feature_rows(run_id: str, run_dir: Path, style: str, method: str, paths: list[str],
                 prompt_indices: list[int | None], seeds: list[int | None], backbone: str,
                 features: np.ndarray) -> list[dict]:
    return [{"run_id": run_id, "style": style, "method": method, "image": str(Path(path).relative_to(run_dir)),
             "prompt_index": prompt_index, "seed": seed, "backbone": backbone, "feature": feature}
            for path, prompt_index, seed, feature in zip(paths, prompt_indices, seeds, features)]


def score_entries(entries: list[dict], inception, clip, dino, seed: int, run_id: str,
                  run_dir: Path, csd=None) -> tuple[list[dict], list[dict]]:
    """Embed every image once per backbone and score each (style, model) entry, plus a noise floor per style.

    A style's base entry comes before its models (as `plan_samples` orders them): their KID change against
    it is scored when they share its (prompt, seed) pairs, else left NaN. `csd`: the CSD embedder, or None
    (backbones.load_csd found no weights): its columns are NaN then, its backbone CSD_NOT_AVAILABLE.

    Returns the score rows and the per-image feature rows (the content of features.parquet).
    """
    from style_factory.backbones import CSD_NOT_AVAILABLE

    loaded = [b for b in (inception, clip, dino, csd) if b is not None]
    backbone_names = {"inception_backbone": inception.info.name, "clip_backbone": clip.info.name,
                      "dino_backbone": dino.info.name,
                      "csd_backbone": csd.info.name if csd is not None else CSD_NOT_AVAILABLE,
                      "backbones_real": inception.info.real and clip.info.real and dino.info.real,
                      "backbone_sha256": json.dumps({b.info.name: b.info.sha256 for b in loaded})}
    csd_embeddings: dict[tuple[str, str], np.ndarray] = {}  # (style, method or "ref"/"heldout") -> CSD embeddings
    references: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    heldout: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    base_images: dict[str, tuple[list, np.ndarray]] = {}  # style -> its base's (prompt, seed) pairs, features
    subjects: dict[tuple[str, str], tuple] = {}  # (style, subject) -> the subject images' features
    rows, features = [], []

    def embed(style: str, method: str, paths: list[str], prompt_indices: list, seeds: list):
        if not paths:
            return None, None, None
        images = [Image.open(p).convert("RGB") for p in paths]
        feats, gen_clip = stored_features(inception.embed(images)), stored_features(clip.embed_images(images))
        embedded = {inception.info.name: feats, clip.info.name: gen_clip}
        if dino.info.name not in embedded:  # the toy fallback is the same network as the toy Inception slot
            embedded[dino.info.name] = stored_features(dino.embed(images))
        if csd is not None:
            embedded[csd.info.name] = csd_embeddings[style, method] = stored_features(csd.embed_images(images))
        for backbone, values in embedded.items():
            features.extend(feature_rows(run_id, run_dir, style, method, paths, prompt_indices, seeds,
                                         backbone, values))
        return feats, gen_clip, embedded[dino.info.name]

    for entry in entries:
        style, method = entry["style"], entry["method"]
        try:
            if style not in references:
                no_index = [None] * len(entry["reference"])
                references[style] = embed(style, "ref", entry["reference"], no_index, no_index)
                rows.append(noise_floor_row(style, *references[style], seed, backbone_names,
                                            csd_embeddings.get((style, "ref"))))
            if style not in heldout:
                no_index = [None] * len(entry["heldout"])
                heldout[style] = embed(style, "heldout", entry["heldout"], no_index, no_index)
            ref_feats, ref_clip, _ = references[style]
            feats, gen_clip, gen_dino = embed(style, method, entry["images"], entry["prompt_indices"],
                                              entry["seeds"])
            composition = {"subject": "", "gamma": float("nan"), **dict.fromkeys(CONTENT_COLUMNS, float("nan"))}
            if "subject" in entry:  # stored with the style, as its own StyleRef images are
                key = (style, entry["subject"])
                if key not in subjects:
                    no_index = [None] * len(entry["subject_images"])
                    subjects[key] = embed(style, f"subject-{entry['subject']}", entry["subject_images"], no_index,
                                          no_index)
                composition = {"subject": entry["subject"], "gamma": entry["gamma"],
                               **content_scores(gen_clip, gen_dino, *subjects[key][1:], seed)}
            edges = (edge_scores(entry["images"], entry["control_edges"], seed) if "control_edges" in entry
                     else dict.fromkeys(EDGE_COLUMNS, float("nan")))
            text_emb = clip.embed_texts(entry["texts"])
            scores = image_scores(feats, gen_clip, gen_dino, entry["seeds"], text_emb, ref_feats, ref_clip, seed)
            pairs = list(zip(entry["prompt_indices"], entry["seeds"]))
            if method == BASE_METHOD:
                base_images[style] = (pairs, feats)
            change = dict.fromkeys(("kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high"), float("nan"))
            if method != BASE_METHOD and style in base_images and base_images[style][0] == pairs:
                change = kid_change_scores(feats, base_images[style][1], ref_feats, seed)
            rows.append({"style": style, "method": method, "n_images": len(feats), "n_reference": len(ref_feats),
                         **scores, **change, **heldout_scores(feats, gen_clip, *heldout[style][:2], seed),
                         **csd_scores(csd_embeddings.get((style, method)), csd_embeddings.get((style, "ref")),
                                      csd_embeddings.get((style, "heldout")), seed),
                         **inception_scores(feats, inception.class_weight, seed), **composition, **edges,
                         **backbone_names})
        except (OSError, ValueError) as err:  # one unscorable model must not lose the others' rows
            rows.append({"style": style, "method": method, "error": f"{type(err).__name__}: {err}"})
    return rows, features


def noise_floor_row(style: str, ref_feats: np.ndarray, ref_clip: np.ndarray, ref_dino: np.ndarray, seed: int,
                    backbone_names: dict, ref_csd: np.ndarray | None) -> dict:
    """The StyleRef set scored against itself, split even/odd: what "as good as the references" looks like.
    Its style consistency is that of one half, taken as one set; its CSD style similarity that of one half to the
    other (NaN without CSD)."""
    half_a, half_b = slice(0, None, 2), slice(1, None, 2)
    try:
        one_set = [0] * len(ref_feats[half_a])
        scores = image_scores(ref_feats[half_a], ref_clip[half_a], ref_dino[half_a], one_set, None,
                              ref_feats[half_b], ref_clip[half_b], seed)
    except ValueError as err:  # e.g. too few StyleRef images for two halves of two
        return {"style": style, "method": NOISE_FLOOR, "error": f"{type(err).__name__}: {err}"}
    halves = (None, None) if ref_csd is None else (ref_csd[half_a], ref_csd[half_b])
    return {"style": style, "method": NOISE_FLOOR, "n_images": len(ref_feats[half_a]),
            "n_reference": len(ref_feats[half_b]), **scores, **csd_scores(*halves, None, seed), **backbone_names}


@ray.remote(num_cpus=1)
def score_models(entries: list[dict], evaluate_cfg: dict, models_dir: str | None, run_id: str,
                 run_dir: str) -> tuple[list[dict], list[dict]]:
    """Load the backbones once and score every (style, model) entry: see score_entries."""
    import torch

    from style_factory.backbones import load_clip, load_csd, load_dino, load_inception

    torch.set_num_threads(1)
    inception = load_inception(evaluate_cfg["inception"], models_dir)
    clip = load_clip(evaluate_cfg["clip"], models_dir)
    dino = load_dino(evaluate_cfg["dino"], models_dir)
    csd = load_csd(evaluate_cfg["csd"], models_dir)
    return score_entries(entries, inception, clip, dino, evaluate_cfg["kid_seed"], run_id, Path(run_dir), csd)


def expected_images(jobs: list[SampleJob]) -> dict[str, tuple[int, int]]:
    """The progress view's parts of sampling: every image of every job, (1, 1) when it is already there."""
    parts = {}
    for job in jobs:
        done = job.is_done()
        for index in range(len(job.prompts)):
            for seed in job.seeds:
                name = sample_name(index, seed)
                parts[str(Path(job.out_dir) / name)] = (int(done or (partial_dir(job) / name).is_file()), 1)
    return parts


def record_metrics_in_card(job: SampleJob, row: dict) -> None:
    """The model card travels with the model: it carries the latest evaluation of it. An extracted LoRA's folder has
    no card: its figures go into its fine-tune's card, in `extracted_lora` beside the extraction's error."""
    card_path = Path(job.extracted_from or job.model_dir) / MODEL_CARD
    card = read_json(card_path)
    (card["extracted_lora"] if job.extracted_from else card)["metrics"] = {k: row[k] for k in (
        "run_id", "n_images", "n_reference", "fid", "kid", "kid_std", "kid_ci_low", "kid_ci_high",
        "kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high",
        "clip_t", "clip_t_ci_low", "clip_t_ci_high", "style_sim", "style_sim_ci_low", "style_sim_ci_high",
        "style_consistency", "style_consistency_ci_low", "style_consistency_ci_high",
        "style_sim_csd", "style_sim_csd_ci_low", "style_sim_csd_ci_high",
        "inception_score", "inception_score_ci_low", "inception_score_ci_high",
        "inception_backbone", "clip_backbone", "dino_backbone", "csd_backbone", "backbones_real")}
    write_json_atomic(card_path, card)


def evaluate(run: Run, trained: dict[tuple[str, str], str]) -> Path | None:
    """Generate and score; returns the results table path, or None when no style is left to score."""
    cfg = run.config.evaluate
    jobs = plan_samples(run, trained)
    report("sample", expected_images(jobs))
    with run.timed("sample"):  # one Ray Data pass: actor start-up, model loads, sampling, PNG writes
        failures = generate_all(jobs, cfg.gpus_per_task, cfg.batch_size)
    for (style, method), error in failures.items():
        run.record(style, f"generate:{method}", error)
    contents = content_prompts(run)
    write_json_atomic(run.dir / "samples" / "prompts.json",
                      [{"index": i, "content": c} for i, c in enumerate(contents)])
    entries, by_key = [], {}
    references: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    for job in jobs:
        if run.failed(job.style):
            continue
        if job.style not in references:
            with run.timed("reference PNGs"):
                references[job.style] = reference_images(run, job.style)
                heldout[job.style] = reference_images(run, job.style, "heldout")
        pairs = [(i, seed) for i in range(len(contents)) for seed in job.seeds]
        entries.append({"style": job.style, "method": Path(job.out_dir).name,  # the model's name
                        "images": [str(Path(job.out_dir) / sample_name(i, seed)) for i, seed in pairs],
                        "prompt_indices": [i for i, _ in pairs], "seeds": [seed for _, seed in pairs],
                        "texts": [contents[i] for i, _ in pairs], "reference": references[job.style],
                        "heldout": heldout[job.style], **composition_entry(run, job), **control_entry(job)})
        by_key[(job.style, Path(job.out_dir).name)] = job
    if not entries:
        return None
    with run.timed("score"):  # a Ray task: its start-up, the backbones' load, every image's features, the metrics
        scores, features = ray.get(score_models.remote(entries, cfg.model_dump(), run.config.model.models_dir,
                                                       run.config.name, str(run.dir)))
    versions = json.dumps({"python": platform.python_version(), **{p: version(p) for p in PACKAGES}})
    run_fields = {"run_id": run.config.name, "base_model": run.config.model.base, "family": run.family,
                  "config_hash": run.config.digest()[:16], "versions": versions,
                  "created_at": datetime.now(timezone.utc)}
    styles = {s.name: s for s in run.styles}
    rows = []
    for score in scores:
        style = styles[score["style"]]
        if score["method"] == NOISE_FLOOR:  # a reference point, not a model: not a stage of the summary
            if "error" in score:
                print(f"[evaluate] no noise floor for {style.name}: {score['error']}", flush=True)
                continue
            rows.append({
                **score, **run_fields, "display_name": style.config.display_name, "tokens": "", "prompt": "",
                "seeds": [], "samples_dir": str(run.samples_dir(style.name, "ref").relative_to(run.dir)),
                "model_dir": "",
            })
            continue
        job, name = by_key[(score["style"], score["method"])], score["method"]
        if "error" in score:
            run.record(job.style, f"evaluate:{name}", score["error"])
            continue
        card = read_json(Path(job.extracted_from or job.model_dir) / MODEL_CARD) if job.model_dir else None
        rows.append({
            **score, **run_fields, **model_columns(card), "method": name if job.content_dir else job.method,
            "display_name": style.config.display_name,
            "tokens": "" if job.method == BASE_METHOD else " ".join(style.config.tokens),
            "prompt": job.prompts[0], "seeds": list(job.seeds),
            "samples_dir": str(Path(job.out_dir).relative_to(run.dir)),
            "model_dir": str(Path(job.model_dir).relative_to(run.dir)) if job.model_dir else "",
        })
        run.record(job.style, f"evaluate:{name}", "ok")
        if run.config.train.report_to:
            log_evaluation(run.tensorboard_dir(job.style, name), f"{job.style}/{name}",
                           run.config.train.report_to, rows[-1], (card or {}).get("steps", 0))
        if job.model_dir and not job.content_dir:  # a composition's figures are not its style model's
            record_metrics_in_card(job, rows[-1])
    write_style_scores(run, rows, features, by_key)
    table, features_table = assemble_scores(run)
    if table is None or all(method == NOISE_FLOOR for method in table.column("method").to_pylist()):
        return None
    if not all(row["backbones_real"] for row in rows):
        print(f"[evaluate] WARNING: metrics use the toy backbone ({rows[0]['inception_backbone']}, "
              f"{rows[0]['clip_backbone']}): compare them only within this setup, not with published numbers. "
              "Put real weights in model.models_dir (see README).", flush=True)
    # The whole protocol, beside the rows: what any reader needs to reproduce or compare the numbers.
    protocol = {"prompts": contents, "seeds": cfg.seeds, "sampler": "DDIM",
                "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
                "resolution": run.resolution, "family": run.family, "base_model": run.config.model.base,
                "kid_seed": cfg.kid_seed,
                "backbone_sha256": json.loads(rows[0]["backbone_sha256"]), "versions": json.loads(versions)}
    table = table.replace_schema_metadata({"style_factory_protocol": json.dumps(protocol)})
    write_parquet_atomic(features_table, run.dir / "features.parquet")
    path = run.dir / "results.parquet"
    write_parquet_atomic(table, path)
    return path


def model_columns(card: dict | None) -> dict:
    """A model's columns beyond RESULTS_SCHEMA, from its card: the step its weights are from, and what tells it
    from its method's other models (`train_seed`, a sweep's `sweep.<setting>`); null for the base."""
    if card is None:
        return {STEP_COLUMN: None}
    return {STEP_COLUMN: card["steps"] if METHODS[card["method"]].trains else None, **card.get("columns", {})}


def results_table(rows: list[dict]) -> pa.Table:
    """Rows as RESULTS_SCHEMA types them, then the model columns they carry (`model_columns`): `step` first."""
    table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    extra = sorted({c for row in rows for c in row} - set(RESULTS_SCHEMA.names) - {"error"},
                   key=lambda c: (c != STEP_COLUMN, c))
    for column in extra:
        values = [row.get(column) for row in rows]
        table = table.append_column(column, pa.array(values, type=pa.int64() if column == STEP_COLUMN else None))
    return table


def write_style_scores(run: Run, rows: list[dict], features: list[dict],
                       jobs: dict[tuple[str, str], SampleJob]) -> None:
    """Each scored style's rows and features in `scores/<style>.parquet` and `scores/<style>.features.parquet`,
    with the keys of the samples they were scored on: a later command narrowed to other styles keeps them."""
    for style in dict.fromkeys(row["style"] for row in rows):
        keys = {name: job.key for (style_name, name), job in jobs.items() if style_name == style}
        table = results_table([r for r in rows if r["style"] == style])
        write_parquet_atomic(table.replace_schema_metadata({"sample_keys": json.dumps(keys)}),
                             run.dir / SCORES_DIR / f"{style}.parquet")
        write_parquet_atomic(pa.Table.from_pylist([f for f in features if f["style"] == style],
                                                  schema=FEATURES_SCHEMA),
                             run.dir / SCORES_DIR / f"{style}.features.parquet")


def assemble_scores(run: Run) -> tuple[pa.Table | None, pa.Table | None]:
    """Every style's scores that are still current (its samples are those it was scored on), in style order:
    the run folder's results and features tables, whichever commands scored them."""
    tables, features = [], []
    for path in sorted((run.dir / SCORES_DIR).glob("*.parquet")):
        if path.name.endswith(".features.parquet"):
            continue
        style = path.stem
        try:
            table = pq.read_table(path)
            keys = json.loads(table.schema.metadata[b"sample_keys"])
            style_features = pq.read_table(path.with_name(f"{style}.features.parquet"))
        except (OSError, KeyError, ValueError, pa.ArrowException) as err:
            print(f"[evaluate] {style}: scores {path} cannot be read ({type(err).__name__}: {err}); left out until "
                  "the style is evaluated again", flush=True)
            continue
        changed = [method for method, key in keys.items()
                   if (read_json(run.samples_dir(style, method) / SAMPLES_MARKER) or {}).get("key") != key]
        if changed:
            print(f"[evaluate] {style}: scores left out, the samples of {changed} changed since they were scored; "
                  "evaluate the style again", flush=True)
            continue
        tables.append(table.replace_schema_metadata(None))
        features.append(style_features.replace_schema_metadata(None))
    if not tables:
        return None, None
    return pa.concat_tables(tables, promote_options="default"), pa.concat_tables(features)
