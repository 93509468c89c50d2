"""Decide: per style, the model to use, chosen by a declared rule (`evaluate.selection`), with the models tied with
it and the evidence, written to `results/<run>/best.parquet`.

The default rule: the lowest KID to the StyleRef images among the models whose paired interval of the KID change
against the untuned base lies wholly below 0 and whose CLIP-T is at most a margin below the base's; with none,
keep the base. Models are compared on the same bootstrap resamples of (prompt, seed) pairs that `kid_vs_base` uses,
drawn from the features evaluate stored, so every difference is paired. Rows of one model configuration (a method,
plus a `step` or swept settings where the table has them) trained with several `train_seed`s are averaged over
their seeds first, resample by resample, with the spread between seeds in view: a configuration beats another (or
the base) only when the paired interval of the difference excludes 0 and the difference is larger than the seed
spread (`seed_noise`); otherwise it is tied with it, or not eligible against the base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from style_factory import metrics
from style_factory.config import SelectionConfig
from style_factory.evaluate import RESULTS_SCHEMA
from style_factory.families import FAMILIES
from style_factory.files import read_json, write_parquet_atomic
from style_factory.lora import DIFFUSERS_FILE, KOHYA_FILE
from style_factory.report import BASE_METHOD, BEST_FILENAME, NOISE_FLOOR, is_composition, kid_display
from style_factory.train import SEED_COLUMN  # one model per training seed: averaged over, never a setting
from style_factory.train_job import MODEL_CARD

REFERENCES = {"kid": "ref", "kid_heldout": "heldout"}  # primary metric -> the features' reference images
NAMES = {"kid": "KID", "kid_heldout": "held-out KID"}  # as the verdict's sentences name them

BEST_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("style", pa.string()), ("display_name", pa.string()), ("rule", pa.string()),
    ("primary", pa.string()), ("method", pa.string()), ("label", pa.string()), ("settings", pa.string()),
    ("train_seed", pa.int64()), ("n_train_seeds", pa.int32()),
    ("model_dir", pa.string()), ("base_model", pa.string()), ("diffusers_load", pa.string()),
    ("diffusers_file", pa.string()), ("webui_file", pa.string()), ("embeddings", pa.list_(pa.string())),
    ("value", pa.float64()), ("value_ci_low", pa.float64()), ("value_ci_high", pa.float64()),
    ("value_seed_std", pa.float64()),
    ("vs_base", pa.float64()), ("vs_base_ci_low", pa.float64()), ("vs_base_ci_high", pa.float64()),
    ("base_value", pa.float64()), ("base_clip_t", pa.float64()),
    ("kid", pa.float64()), ("kid_ci_low", pa.float64()), ("kid_ci_high", pa.float64()),
    ("clip_t", pa.float64()), ("clip_t_ci_low", pa.float64()), ("clip_t_ci_high", pa.float64()),
    ("style_sim", pa.float64()), ("style_sim_ci_low", pa.float64()), ("style_sim_ci_high", pa.float64()),
    ("why", pa.string()), ("tied", pa.list_(pa.string())),
    ("runner_up", pa.string()), ("runner_up_diff", pa.float64()), ("runner_up_diff_ci_low", pa.float64()),
    ("runner_up_diff_ci_high", pa.float64()), ("candidates", pa.string()),
    ("samples_dir", pa.string()), ("base_samples_dir", pa.string()),
    ("inception_backbone", pa.string()), ("backbones_real", pa.bool_()),
])


@dataclass
class Candidate:
    """One model configuration of a style: its rows (one per training seed) and its seed-averaged primary metric,
    resample by resample."""

    label: str
    method: str
    settings: dict
    rows: pd.DataFrame
    values: np.ndarray  # (resamples,) the primary metric on each bootstrap resample, averaged over seeds
    value: float  # the primary metric, averaged over seeds
    seed_std: float  # its standard deviation between training seeds (NaN with one)
    clip_t: float  # CLIP-T, averaged over seeds


def setting_columns(results: pd.DataFrame) -> list[str]:
    """The columns that tell two models of one method apart (a checkpoint's `step`, a sweep's values): those the
    results schema does not define, but the training seed, where `results` holds more than one value."""
    return [c for c in results.columns if c not in RESULTS_SCHEMA.names and c != SEED_COLUMN
            and results[c].dropna().nunique() > 1]


def model_features(features: pd.DataFrame, row: pd.Series) -> tuple[list, np.ndarray]:
    """A result row's images' (prompt, seed) pairs and Inception features, in pair order."""
    own = features[features["image"].str.startswith(row["samples_dir"] + "/")].sort_values(["prompt_index", "seed"])
    if own.empty:
        raise ValueError(f"features.parquet has no features of {row['samples_dir']}")
    return list(zip(own["prompt_index"], own["seed"])), np.stack(own["feature"].to_numpy())


def candidate(label: str, method: str, settings: dict, rows: pd.DataFrame, primary: str, features: pd.DataFrame,
              reference: np.ndarray, pairs: list, kid_seed: int) -> Candidate:
    resamples = metrics.bootstrap_indices(len(pairs), kid_seed)
    values = []
    for _, row in rows.iterrows():
        own_pairs, feats = model_features(features, row)
        if own_pairs != pairs:
            raise ValueError(f"{row['samples_dir']} was not sampled on the base's prompts and seeds: not paired")
        values.append(metrics.kid_bootstrap(feats, reference, resamples))
    by_seed = rows[primary].to_numpy(dtype=float)
    return Candidate(label=label, method=method, settings=settings, rows=rows, values=np.mean(values, axis=0),
                     value=float(by_seed.mean()), seed_std=float(np.std(by_seed, ddof=1)) if len(rows) > 1 else np.nan,
                     clip_t=float(rows["clip_t"].mean()))


def paired(a: Candidate, b: Candidate, level: float) -> tuple[float, float, float]:
    """a's primary metric minus b's, and the interval of the difference over their shared resamples."""
    return (a.value - b.value, *metrics.percentile_interval(a.values - b.values, level))


def seed_noise(a: Candidate, b: Candidate) -> float:
    """The larger of the two configurations' standard deviations between training seeds (0 with one seed each):
    a lead no larger than this is seed noise, not a win."""
    return float(np.nanmax([a.seed_std, b.seed_std, 0.0]))


def plain(value: object) -> object:
    """A setting as JSON writes it: a numpy scalar as Python's, a whole float (an int column with nulls) as an int."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def model_label(method: str, settings: dict) -> str:
    return " ".join([method, *(f"{k}={v}" for k, v in settings.items())])


def style_candidates(style_rows: pd.DataFrame, settings: list[str], primary: str, features: pd.DataFrame,
                     kid_seed: int) -> tuple[Candidate, list[Candidate]]:
    """The base and every model configuration of one style, on the base's (prompt, seed) pairs."""
    bases = style_rows[style_rows["method"] == BASE_METHOD]
    if len(bases) != 1:
        raise ValueError(f"expected one {BASE_METHOD} row, found {len(bases)}")
    base_row = bases.iloc[0]
    if not np.isfinite(base_row[primary]):
        raise ValueError(f"the base has no {primary}"
                         + (" (the style has no held-out StyleRef images)" if primary == "kid_heldout" else ""))
    features = features[(features["style"] == base_row["style"])
                        & (features["backbone"] == base_row["inception_backbone"])]
    reference = features[features["method"] == REFERENCES[primary]].sort_values("image")
    reference = np.stack(reference["feature"].to_numpy()) if len(reference) else np.empty((0, 0))
    pairs, _ = model_features(features, base_row)
    base = candidate(BASE_METHOD, BASE_METHOD, {}, bases, primary, features, reference, pairs, kid_seed)
    models = style_rows[~style_rows["method"].isin([BASE_METHOD, NOISE_FLOOR])]
    keys = ["method", *settings]
    candidates = []
    for key, rows in models.groupby(keys, sort=False, dropna=False):
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        method = values.pop("method")
        chosen = {k: plain(v) for k, v in values.items() if not pd.isna(v)}
        candidates.append(candidate(model_label(method, chosen), method, chosen, rows, primary, features, reference,
                                    pairs, kid_seed))
    return base, candidates


def exported_files(run_dir: Path, folder: str) -> tuple[dict, set[str]]:
    """A model folder's card and the files its export wrote (the card's manifest). A LoRA extracted from a full
    fine-tune (`<model folder>/lora-r<rank>/`) has no card of its own: its files are those under it in the fine-tune's
    manifest."""
    card = read_json(run_dir / folder / MODEL_CARD)
    if card is not None:
        return card, set(card.get("files", {}))
    source = read_json(run_dir / Path(folder).parent / MODEL_CARD) or {}
    name = Path(folder).name
    if (source.get("extracted_lora") or {}).get("folder") != name:
        return {}, set()
    return {}, {path.removeprefix(f"{name}/") for path in source.get("files", {}) if path.startswith(f"{name}/")}


def load_files(run_dir: Path, row: pd.Series, family: str) -> dict:
    """What to load the model with, from the files its export wrote (the model card's manifest), relative to the run
    folder: the diffusers call, the file for diffusers, the file for ComfyUI and AUTOMATIC1111, token embeddings."""
    pipeline_class = FAMILIES[family].pipeline_class_name
    if row["method"] == BASE_METHOD:
        return {"diffusers_load": f'{pipeline_class}.from_pretrained("{row["base_model"]}")', "diffusers_file": "",
                "webui_file": "", "embeddings": []}
    folder = row["model_dir"]
    card, files = exported_files(run_dir, folder)
    embeddings = sorted(f"{folder}/{name}" for name in files if name.startswith("embeddings/"))
    if "model_index.json" in files:  # a full fine-tune: a diffusers folder, and its single-file checkpoint
        single_file = (card.get("single_file") or {}).get("file")
        return {"diffusers_load": f'{pipeline_class}.from_pretrained("{folder}")', "diffusers_file": folder,
                "webui_file": f"{folder}/{single_file}" if single_file in files else "", "embeddings": embeddings}
    if DIFFUSERS_FILE in files:
        return {"diffusers_load": f'pipe.load_lora_weights("{folder}")', "diffusers_file": f"{folder}/{DIFFUSERS_FILE}",
                "webui_file": f"{folder}/{KOHYA_FILE}" if KOHYA_FILE in files else "", "embeddings": embeddings}
    return {"diffusers_load": "", "diffusers_file": "", "webui_file": "", "embeddings": embeddings}  # zero-shot


def rule_text(selection: SelectionConfig) -> str:
    level = f"{selection.tie_level:.0%}"
    ties = ("none" if selection.tie_test == "none"
            else f"models whose paired {level} interval against the winner holds 0")
    return (f"lowest {selection.primary} among the models whose paired {level} interval of the change against the "
            f"base lies below 0 and whose CLIP-T is at most {selection.content_margin:g} below the base's; else the "
            f"base. Ties: {ties}")


def verdict(style_rows: pd.DataFrame, features: pd.DataFrame, selection: SelectionConfig, kid_seed: int,
            scale: float) -> dict:
    """One style's verdict: the fields of best.parquet but the run's and the files."""
    primary, level, shown = selection.primary, selection.tie_level, NAMES[selection.primary]
    base, candidates = style_candidates(style_rows, setting_columns(style_rows), primary, features, kid_seed)
    floor = base.clip_t - selection.content_margin
    evidence, eligible = [], []
    for c in candidates:
        change = paired(c, base, level)
        keeps_content = c.clip_t >= floor
        if change[2] >= 0:
            reason = f"its {shown} did not fall against the base's (paired interval reaches {change[2] * scale:+.1f})"
        elif -change[0] <= seed_noise(c, base):
            reason = (f"its {shown} fell by {-change[0] * scale:.1f}, no more than its spread between training seeds "
                      f"({c.seed_std * scale:.1f})")
        elif not keeps_content:
            reason = f"CLIP-T {c.clip_t:.3f} is more than {selection.content_margin:g} below the base's {base.clip_t:.3f}"
        else:
            reason = "eligible"
            eligible.append(c)
        evidence.append({"label": c.label, "value": c.value, "n_train_seeds": len(c.rows),
                         "seed_std": None if np.isnan(c.seed_std) else c.seed_std,  # strict JSON has no NaN
                         "vs_base": change[0], "vs_base_ci_low": change[1], "vs_base_ci_high": change[2],
                         "clip_t": c.clip_t, "keeps_content": keeps_content, "verdict": reason})
    pool = sorted(eligible, key=lambda c: c.value) + [base]  # an eligible model's KID is below the base's
    winner = pool[0]
    others = [c for c in candidates if c is not winner]
    runner_up = pool[1] if len(pool) > 1 else min(others, key=lambda c: c.value, default=None)
    tied = []
    if selection.tie_test == "paired_bootstrap":
        for c in [*others, base] if winner is not base else others:
            diff, low, high = paired(c, winner, level)
            if c.clip_t >= floor and (low <= 0 <= high or abs(diff) <= seed_noise(c, winner)):
                tied.append(c.label)
    vs_base = paired(winner, base, level) if winner is not base else (np.nan, np.nan, np.nan)
    if winner is base:
        best = min(candidates, key=lambda c: c.value, default=None)
        why = (f"keep the base: none of {len(candidates)} models both lowered {shown} (paired {level:.0%} interval "
               f"below 0) and kept CLIP-T within {selection.content_margin:g} of the base's {base.clip_t:.3f}")
        if best is not None:
            why += f"; closest, {best.label}: {next(e['verdict'] for e in evidence if e['label'] == best.label)}"
    else:
        why = (f"lowest {shown} ({winner.value * scale:.1f}) among the {len(eligible)} of {len(candidates)} models whose "
               f"{shown} fell against the base's ({vs_base[0] * scale:+.1f} [{vs_base[1] * scale:+.1f}, "
               f"{vs_base[2] * scale:+.1f}]) and kept the content: CLIP-T {winner.clip_t:.3f} (base "
               f"{base.clip_t:.3f}, floor {floor:.3f})")
        if len(winner.rows) > 1:
            why += f", averaged over {len(winner.rows)} training seeds (± {winner.seed_std * scale:.1f} between them)"
    if tied:
        why += f"; statistically tied with {', '.join(tied)}"
    # the configuration's file: its training seed with the best primary metric
    row = winner.rows.loc[winner.rows[primary].astype(float).idxmin()]
    diff = paired(runner_up, winner, level) if runner_up is not None else (np.nan, np.nan, np.nan)
    return {
        "primary": primary, "method": winner.method, "label": winner.label, "settings": json.dumps(winner.settings),
        "train_seed": int(row[SEED_COLUMN]) if SEED_COLUMN in row and not pd.isna(row[SEED_COLUMN]) else None,
        "n_train_seeds": len(winner.rows), "value": winner.value,
        "value_ci_low": metrics.percentile_interval(winner.values, level)[0],
        "value_ci_high": metrics.percentile_interval(winner.values, level)[1], "value_seed_std": winner.seed_std,
        "vs_base": vs_base[0], "vs_base_ci_low": vs_base[1], "vs_base_ci_high": vs_base[2],
        "base_value": base.value, "base_clip_t": base.clip_t,
        **{k: row[k] for k in ("kid", "kid_ci_low", "kid_ci_high", "clip_t", "clip_t_ci_low", "clip_t_ci_high",
                               "style_sim", "style_sim_ci_low", "style_sim_ci_high")},
        "why": why, "tied": tied, "runner_up": runner_up.label if runner_up is not None else "",
        "runner_up_diff": diff[0], "runner_up_diff_ci_low": diff[1], "runner_up_diff_ci_high": diff[2],
        "candidates": json.dumps(evidence), "samples_dir": row["samples_dir"],
        "base_samples_dir": base.rows.iloc[0]["samples_dir"], "_row": row,
    }


def decide(run_dir: str | Path, selection: SelectionConfig) -> Path | None:
    """Write best.parquet for an evaluated run folder; None when it has no results or no features (written before
    features were stored: evaluate it again). A style whose verdict cannot be reached (no base row, unpaired samples)
    gets a row that says why, and no model."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.parquet"
    if not (results_path.is_file() and (run_dir / "features.parquet").is_file()):
        print(f"[decide] {run_dir}: no results.parquet and features.parquet to decide from", flush=True)
        return None
    results = pd.read_parquet(results_path)
    results = results[~is_composition(results)]  # a composition answers other prompts: never the style's model
    protocol = json.loads((pq.read_schema(results_path).metadata or {}).get(b"style_factory_protocol", b"{}"))
    kid_seed = int(protocol.get("kid_seed", 0))
    features = pd.read_parquet(run_dir / "features.parquet",
                               columns=["style", "method", "image", "prompt_index", "seed", "backbone", "feature"])
    scale, _ = kid_display(results)
    rows = []
    for style, style_rows in results.groupby("style", sort=False):
        first = style_rows.iloc[0]
        common = {"run_id": first["run_id"], "style": style, "display_name": first["display_name"],
                  "rule": rule_text(selection), "base_model": first["base_model"],
                  "inception_backbone": first["inception_backbone"], "backbones_real": bool(first["backbones_real"])}
        try:
            found = verdict(style_rows, features, selection, kid_seed, scale)
        except ValueError as err:
            print(f"[decide] {style}: no verdict: {err}", flush=True)
            rows.append({**common, "primary": selection.primary, "method": "", "why": f"no verdict: {err}"})
            continue
        row = found.pop("_row")
        rows.append({**common, **found, "model_dir": row["model_dir"], **load_files(run_dir, row, protocol["family"])})
        print(f"[decide] {style}: {found['label']} ({found['why']})", flush=True)
    path = run_dir / BEST_FILENAME
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=BEST_SCHEMA), path)
    return path
