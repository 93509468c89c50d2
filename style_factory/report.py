"""Static HTML report for one evaluated run: the verdict, leaderboard, plots and sample grids.

Reads what the evaluate and decide stages leave in `results/<run>/` and writes `report.html` there,
with plot PNGs in `report_assets/`. Every image is referenced by a path relative to the
report, so the run folder can be opened straight from disk, or copied elsewhere whole.

    python -m style_factory.report results/<run>
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # renders without a display (cluster nodes, CI)
import matplotlib.pyplot as plt
import pandas as pd

from style_factory.control import CONTROL_MAP
from style_factory.files import make_temp_dir, read_json, replace_dir_atomic, write_text_atomic

BASE_METHOD = "base"  # the untuned base model's rows
NOISE_FLOOR = "noise-floor"  # StyleRef split-half row: a reference point, not a model
REPORT_FILENAME = "report.html"
BEST_FILENAME = "best.parquet"  # the verdict per style, written by style_factory/decide.py
TOY_MARKER = "NOT REAL"  # in the name of every toy backbone
ASSETS_DIRNAME = "report_assets"
TOY_BACKBONE_WARNING = ("metrics computed with the toy backbone (trained on the toy world): "
                        "not comparable to published numbers")


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    higher_is_better: bool
    scale: float  # shown value = stored value * scale
    decimals: int


METRICS = (
    Metric("kid", "KID ×10³", higher_is_better=False, scale=1000.0, decimals=2),
    Metric("fid", "FID", higher_is_better=False, scale=1.0, decimals=2),
    Metric("clip_t", "CLIP-T", higher_is_better=True, scale=1.0, decimals=3),
    Metric("style_sim", "Style sim.", higher_is_better=True, scale=1.0, decimals=3),
    Metric("style_consistency", "Consistency", higher_is_better=True, scale=1.0, decimals=3),
    Metric("kid_heldout", "KID held-out ×10³", higher_is_better=False, scale=1000.0, decimals=2),
)
# shown only where some model has a value: CSD and Inception Score need their real weights, edge alignment a
# structure map (StyleAligned's control)
OPTIONAL_METRICS = (
    Metric("style_sim_csd", "CSD style sim.", higher_is_better=True, scale=1.0, decimals=3),
    Metric("inception_score", "IS", higher_is_better=True, scale=1.0, decimals=2),
    Metric("edge_alignment", "Edge align.", higher_is_better=True, scale=1.0, decimals=3),
)
# the columns that tell two models of one method apart, as the report labels them
VARIANT_COLUMNS = {"train_seed": "seed", "step": "step"}
COMPOSITION_STYLE_MODEL = "styledrop"  # the model whose adapter gives a composition its style, shown beside it
# a composition's similarity to its subject's images (evaluate.content_scores)
CONTENT_METRICS = (
    Metric("content_clip_i", "CLIP-I to subject", higher_is_better=True, scale=1.0, decimals=3),
    Metric("content_dino", "DINO to subject", higher_is_better=True, scale=1.0, decimals=3),
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1400px; margin: 1.5rem auto; padding: 0 1rem; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; }
h2 { margin-top: 2.5rem; border-bottom: 2px solid #ddd; padding-bottom: 0.2rem; }
h3 { margin: 0.5rem 0 0.2rem; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
.muted { color: #666; }
.banner { background: #b00020; color: #fff; font-weight: bold; font-size: 1.1rem;
          padding: 0.8rem 1rem; border-radius: 4px; margin: 1rem 0; }
table.metrics { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
table.metrics th { background: #f5f5f5; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.best { background: #d4f4dc; font-weight: bold; }
table.metrics tr.first-of-style td { border-top: 2px solid #999; }
table.metrics tr.noise-floor td { color: #666; font-style: italic; }
table.metrics td.learned { background: #d4f4dc; }
table.metrics td.worse { background: #f8d7da; }
table.metrics td.why { font-size: 0.8rem; min-width: 24em; }
table#verdict code { word-break: break-all; font-size: 0.75rem; }
table#verdict td.use { font-weight: bold; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.refs { display: flex; flex-wrap: wrap; gap: 4px; }
.strips { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
table.grid { border-collapse: collapse; }
table.grid td { padding: 1px; }
table.grid th { font-weight: normal; font-size: 0.8rem; color: #555; }
table.grid th.prompt { text-align: left; max-width: 14em; padding-right: 0.5rem; }
table.grid td.first-of-model, table.grid th.first-of-model { padding-left: 8px; }
img.thumb, .missing { width: 128px; height: 128px; display: block; }
img.cell, table.grid .missing { width: 64px; height: 64px; }
img.thumb, img.cell { image-rendering: pixelated; }
.missing { background: #eee; color: #999; font-size: 0.8rem;
           display: flex; align-items: center; justify-content: center; }
pre { white-space: pre-wrap; font-size: 0.8rem; background: #f7f7f7; padding: 0.5rem; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write `report.html` (and plots in `report_assets/`) into a run folder; return its path."""
    run_dir = Path(run_dir)
    results = pd.read_parquet(run_dir / "results.parquet")
    if results.empty:
        raise ValueError(f"{run_dir / 'results.parquet'} has no rows: nothing to report")
    results = order_rows(results)
    results["model"] = model_labels(results)
    composed, results = results[is_composition(results)], results[~is_composition(results)]
    prompts = json.loads((run_dir / "samples" / "prompts.json").read_text())
    best_path = run_dir / BEST_FILENAME
    best = pd.read_parquet(best_path) if best_path.is_file() else None
    metrics = display_metrics(results)
    hidden_floors = unsupported_floors(results)
    results = results.drop(index=[i for i, _ in hidden_floors.values()])

    # Plots are drawn into a hidden folder that replaces report_assets/ whole, just before the page itself.
    assets_dir = run_dir / ASSETS_DIRNAME
    staging = make_temp_dir(run_dir, f".{ASSETS_DIRNAME}.")
    colors = method_colors(results)
    plots = [
        plot_alignment_scatter(results, colors, staging / "clip_t_vs_style_sim.png"),
        plot_kid_bars(results, colors, metrics[0], staging / "kid_by_style.png"),
        plot_loss_curves(run_dir, results, colors, staging / "loss.png"),
        plot_metrics_by_step(results, colors, metrics, staging / "metrics_by_step.png"),
    ]
    plot_tags = [img_tag(relative_src(run_dir, assets_dir / path.name), path.stem, "plot")
                 for path in plots if path is not None]

    styles = list(pd.unique(results["style"]))
    anchors = {style: f"style-{i}" for i, style in enumerate(styles)}
    body = [
        title_html(results),
        verdict_section(run_dir, best, prompts, min(int(s) for seeds in results["seeds"] for s in seeds),
                        metrics[0]) if best is not None else "",
        "<h2>Leaderboard</h2>",
        '<p class="muted">Lower is better for KID and FID, higher for CLIP-T and style similarity; '
        f"the best value per style is highlighted. {esc(kid_units_note(metrics[0]))} KID ± its bootstrap standard "
        "deviation; hover a cell for its 95% bootstrap interval.</p>",
        noise_floor_note(hidden_floors, metrics[0]),
        metrics_table(results, metrics, style_anchors=anchors, table_id="leaderboard"),
        learning_section(results, metrics[0]),
        "<h2>Plots</h2>",
        '<div class="plots">' + "".join(plot_tags) + "</div>",
        protocol_html(results, prompts),
        compositions_section(run_dir, composed, results, prompts, metrics),
        "<h2>Styles</h2>",
        "<ul>"
        + "".join(f'<li><a href="#{anchors[style]}">{esc(style)}</a></li>' for style in styles)
        + "</ul>",
    ]
    for style in styles:
        body.append(style_section(run_dir, results[results["style"] == style], prompts, metrics,
                                  anchor=anchors[style]))

    run_id = distinct_text(results["run_id"])
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Style Factory report: {esc(run_id)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    replace_dir_atomic(staging, assets_dir)
    report_path = run_dir / REPORT_FILENAME
    write_text_atomic(report_path, page)
    return report_path


# ---------------------------------------------------------------------------------------
# Data helpers


def order_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Styles in order of first appearance; within a style, base first, then methods as they appear,
    then the noise floor."""
    style_rank = {style: i for i, style in enumerate(pd.unique(results["style"]))}
    method_rank = {method: i for i, method in enumerate(pd.unique(results["method"]))}
    method_rank[BASE_METHOD] = -1
    method_rank[NOISE_FLOOR] = len(method_rank)
    order = sorted(
        range(len(results)),
        key=lambda i: (style_rank[results["style"].iat[i]], method_rank[results["method"].iat[i]]),
    )
    return results.iloc[order].reset_index(drop=True)


def kid_display(results: pd.DataFrame) -> tuple[float, str]:
    """How KID is shown: ×10³ on the real Inception features, as the literature prints it; unscaled on the toy
    backbone, whose larger features give KIDs about 10³ times Inception's, so its raw values read on the same scale."""
    if results["inception_backbone"].astype(str).str.contains(TOY_MARKER).any():
        return 1.0, "(toy)"
    return 1000.0, "×10³"


def display_metrics(results: pd.DataFrame) -> tuple[Metric, ...]:
    """METRICS with the KIDs in the units `kid_display` chooses for this table, KID first; then those of
    OPTIONAL_METRICS some row has."""
    scale, unit = kid_display(results)
    optional = tuple(m for m in OPTIONAL_METRICS if m.column in results and results[m.column].map(is_finite).any())
    return tuple(dataclasses.replace(m, scale=scale, label=m.label.replace("×10³", unit))
                 if m.column.startswith("kid") else m for m in METRICS) + optional


def model_labels(results: pd.DataFrame) -> pd.Series:
    """Each row's model as a reader tells it apart: its method, then the sweep settings, training seed and step
    wherever the run has more than one of them ("styleboost learning_rate=0.0002 seed=1338 step=2")."""
    columns = {c: c[len("sweep."):] for c in results.columns if c.startswith("sweep.")}
    columns.update({c: name for c, name in VARIANT_COLUMNS.items() if c in results})
    varying = {c: name for c, name in columns.items() if results[c].dropna().nunique() > 1}

    def label(row: pd.Series) -> str:
        return " ".join([row["method"], *(f"{name}={plain(row[c])}" for c, name in varying.items()
                                          if not pd.isna(row[c]))])

    return results.apply(label, axis=1)


def plain(value: object) -> object:
    """A column's value as a person writes it: a whole float (an int column with nulls) as an int."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def kid_units_note(kid_metric: Metric) -> str:
    if kid_metric.scale == 1000.0:
        return "KID ×10³ (Inception features)."
    return ("KID (toy): the toy backbone's KID unscaled, which reads on the scale of Inception KID ×10³; it compares "
            "models of this setup only, never with published numbers.")


def unsupported_floors(results: pd.DataFrame) -> dict[str, tuple[int, pd.Series]]:
    """Style -> (row index, row) of each noise floor the split cannot support: its 95% KID interval is wider than its
    distance to the base's KID (or there is no base), so it is no yardstick for the gaps between models."""
    bases = results[results["method"] == BASE_METHOD].groupby("style")["kid"].first()
    hidden = {}
    for index, row in results[results["method"] == NOISE_FLOOR].iterrows():
        base_kid = bases.get(row["style"], math.nan)
        width = row["kid_ci_high"] - row["kid_ci_low"]
        if not (is_finite(width) and is_finite(base_kid) and width < base_kid - row["kid"]):
            hidden[row["style"]] = (index, row)
    return hidden


def noise_floor_note(hidden: dict[str, tuple[int, pd.Series]], kid_metric: Metric) -> str:
    scale = kid_metric.scale
    text = (f"The <code>{NOISE_FLOOR}</code> row scores one half of the StyleRef images against the other: what "
            "“as good as the references themselves” looks like. It is shown only where its 95% KID interval is "
            "narrower than its distance to the base’s KID; it is never a model, never highlighted, never ranked.")
    if hidden:
        text += " Not shown, as the split cannot support one: " + "; ".join(
            f"{esc(style)} ({int(row['n_images'])} against {int(row['n_reference'])} images, interval "
            f"[{float(row['kid_ci_low']) * scale:.1f}, {float(row['kid_ci_high']) * scale:.1f}])"
            for style, (_, row) in hidden.items()) + "."
    return f'<p class="muted">{text}</p>'


def is_finite(value: object) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def best_values(style_rows: pd.DataFrame, metrics: tuple[Metric, ...]) -> dict[str, float]:
    """Best value of each metric among one style's models; only where there is something to compare."""
    style_rows = style_rows[style_rows["method"] != NOISE_FLOOR]
    best = {}
    for metric in metrics:
        values = [float(v) for v in style_rows[metric.column] if is_finite(v)]
        if len(values) >= 2:
            best[metric.column] = max(values) if metric.higher_is_better else min(values)
    return best


def format_metric(row: pd.Series, metric: Metric) -> str:
    value = row[metric.column]
    if not is_finite(value):
        return "n/a"
    text = f"{float(value) * metric.scale:.{metric.decimals}f}"
    if metric.column == "kid" and is_finite(row["kid_std"]):
        text += f" ± {float(row['kid_std']) * metric.scale:.{metric.decimals}f}"
    return text


def interval_title(row: pd.Series, metric: Metric) -> str:
    """The metric's 95% bootstrap interval, for the cell's tooltip; empty when there is none."""
    low, high = row.get(f"{metric.column}_ci_low"), row.get(f"{metric.column}_ci_high")
    if not (is_finite(low) and is_finite(high)):
        return ""
    return f"95% CI [{float(low) * metric.scale:.{metric.decimals}f}, {float(high) * metric.scale:.{metric.decimals}f}]"


def distinct_text(series: pd.Series) -> str:
    return ", ".join(str(value) for value in pd.unique(series))


def read_loss_log(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank line, or the partial last line of an interrupted run
        if "step" in record and "loss" in record and is_finite(record["loss"]):
            steps.append(int(record["step"]))
            losses.append(float(record["loss"]))
    return steps, losses


# ---------------------------------------------------------------------------------------
# HTML pieces


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def relative_src(run_dir: Path, path: Path) -> str:
    """Path of `path` as seen from the report (which lives in `run_dir`), with forward slashes."""
    return Path(os.path.relpath(path, run_dir)).as_posix()


def img_tag(src: str, alt: str, css_class: str) -> str:
    return f'<img class="{css_class}" src="{esc(quote(src))}" alt="{esc(alt)}" title="{esc(alt)}">'


def title_html(results: pd.DataFrame) -> str:
    run_id = distinct_text(results["run_id"])
    families = results["family"].dropna() if "family" in results else pd.Series(dtype=str)  # older tables lack it
    family = f" (family {esc(distinct_text(families))})" if len(families) else ""
    lines = [
        f"<h1>Style Factory report: {esc(run_id)}</h1>",
        f'<p class="muted">Base model <code>{esc(distinct_text(results["base_model"]))}</code>{family}'
        f" · evaluated {esc(results['created_at'].max())}"
        f" · config <code>{esc(distinct_text(results['config_hash']))}</code></p>",
    ]
    # Unknown (null) counts as not real: the banner should err on the loud side.
    if not results["backbones_real"].fillna(False).astype(bool).all():
        lines.append(f'<div class="banner">⚠ {esc(TOY_BACKBONE_WARNING)}</div>')
    return "\n".join(lines)


def protocol_html(results: pd.DataFrame, prompts: list[dict]) -> str:
    seeds = sorted({int(seed) for row_seeds in results["seeds"] for seed in row_seeds})
    models = results[results["method"] != NOISE_FLOOR]
    lines = [
        "<h2>Protocol</h2>",
        "<ul>",
        f"<li>{len(prompts)} content prompts × {len(seeds)} seeds ({esc(', '.join(map(str, seeds)))})"
        f" → {esc(distinct_text(models['n_images']))} images per model</li>",
        f"<li>Reference: {esc(distinct_text(models['n_reference']))} StyleRef images per style</li>",
        f"<li>{len(pd.unique(results['style']))} styles, methods: {esc(distinct_text(models['method']))}</li>",
        f"<li>Backbones: Inception <code>{esc(distinct_text(results['inception_backbone']))}</code>,"
        f" CLIP <code>{esc(distinct_text(results['clip_backbone']))}</code>,"
        f" DINO <code>{esc(distinct_text(results['dino_backbone']))}</code></li>",
        "<li>CLIP-T: image-text cosine against the prompt without the style token;"
        " style similarity: CLIP image-image cosine to the StyleRef images</li>",
        "</ul>",
        "<details><summary>Package versions</summary>"
        f"<pre>{esc(distinct_text(results['versions']))}</pre></details>",
    ]
    return "\n".join(lines)


def metrics_table(rows: pd.DataFrame, metrics: tuple[Metric, ...], style_anchors: dict[str, str] | None = None,
                  table_id: str = "") -> str:
    """Metric table with one row per (style, model); the best value per style highlighted.

    With `style_anchors` (style -> section id) it gets a Style column linking to each style's section.
    """
    show_style = style_anchors is not None
    headers = (["Style"] if show_style else []) + ["Model"] + [m.label for m in metrics] + ["Images"]
    best_by_style = {style: best_values(style_rows, metrics) for style, style_rows in rows.groupby("style", sort=False)}

    body = []
    previous_style = None
    for _, row in rows.iterrows():
        best = best_by_style[row["style"]]
        cells = []
        if show_style:
            cells.append(f'<td><a href="#{style_anchors[row["style"]]}">{esc(row["style"])}</a></td>')
        cells.append(f"<td>{esc(row['model'])}</td>")
        for metric in metrics:
            is_best = metric.column in best and is_finite(row[metric.column]) and row[metric.column] == best[metric.column]
            css_class = "num best" if is_best else "num"
            title = interval_title(row, metric)
            title_attr = f' title="{esc(title)}"' if title else ""
            cells.append(f'<td class="{css_class}"{title_attr}>{esc(format_metric(row, metric))}</td>')
        cells.append(f'<td class="num">{esc(row["n_images"])}</td>')
        row_classes = (["first-of-style"] if show_style and row["style"] != previous_style else []) + (
            ["noise-floor"] if row["method"] == NOISE_FLOOR else [])
        row_class = f' class="{" ".join(row_classes)}"' if row_classes else ""
        body.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
        previous_style = row["style"]

    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    return (
        f'<table class="metrics"{id_attr}>'
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
        "<tbody>" + "".join(body) + "</tbody></table>"
    )


def learning_section(results: pd.DataFrame, kid_metric: Metric) -> str:
    """Did tuning learn the style? Per model (as the leaderboard labels it) and style, the KID change against the
    untuned base.

    A cell is green when the paired 95% interval of the change lies below 0 (red: above 0), and starred
    when the model's own KID interval also lies wholly below the base's, the stricter test. Empty for
    results written before the change was scored.
    """
    if "kid_vs_base" not in results.columns:
        return ""
    models = results[~results["method"].isin([BASE_METHOD, NOISE_FLOOR])]
    bases = results[results["method"] == BASE_METHOD].set_index("style")
    if models.empty or bases.empty:
        return ""
    styles, labels = list(pd.unique(models["style"])), list(pd.unique(models["model"]))
    scale = kid_metric.scale  # as the leaderboard shows KID
    body = []
    for label in labels:  # one row per model, so that seeds, sweep points and steps of one method stay apart
        cells, learned, apart, scored = [f"<td>{esc(label)}</td>"], 0, 0, 0
        for style in styles:
            row = models[(models["model"] == label) & (models["style"] == style)]
            change = row.iloc[0] if len(row) else None
            if change is None or not is_finite(change["kid_vs_base"]) or style not in bases.index:
                cells.append('<td class="num">n/a</td>')
                continue
            scored += 1
            low, high = float(change["kid_vs_base_ci_low"]), float(change["kid_vs_base_ci_high"])
            is_apart = is_finite(change["kid_ci_high"]) and float(change["kid_ci_high"]) < float(
                bases.loc[style, "kid_ci_low"])
            learned, apart = learned + (high < 0), apart + is_apart
            css_class = "num learned" if high < 0 else "num worse" if low > 0 else "num"
            cells.append(f'<td class="{css_class}">{float(change["kid_vs_base"]) * scale:+.1f}{"*" if is_apart else ""}'
                         f" [{low * scale:+.1f}, {high * scale:+.1f}]</td>")
        cells.append(f'<td class="num">{learned} of {scored} ({apart}*)</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    headers = ["Model"] + styles + ["KID falls"]
    return (
        "<h2>Did tuning learn the style?</h2>"
        f'<p class="muted">{esc(kid_metric.label)} of each model minus the untuned base’s, on the same prompts and '
        "seeds, with the "
        "95% paired bootstrap interval (one resampling of the (prompt, seed) pairs for both models). Green: the "
        "whole interval is below 0, KID fell; red: it rose. *: the model’s own KID interval also lies wholly below "
        "the base’s. Check CLIP-T in the leaderboard: a fall bought by losing the prompted content is no win.</p>"
        '<table class="metrics" id="learning">'
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
        "<tbody>" + "".join(body) + "</tbody></table>"
    )


def is_composition(results: pd.DataFrame) -> pd.Series:
    """The rows of evaluate.compose's compositions: shown in their own section, never candidates for the verdict."""
    if "subject" not in results:
        return pd.Series(False, index=results.index)
    return results["subject"].fillna("").astype(str) != ""


def compositions_section(run_dir: Path, composed: pd.DataFrame, results: pd.DataFrame, prompts: list[dict],
                         metrics: tuple[Metric, ...]) -> str:
    """Per style with compositions: the subject's images, then its StyleDrop model and each composition, figures
    and samples side by side on the same prompts and seeds."""
    if composed.empty:
        return ""
    shown = (*metrics[:1], *[m for m in metrics if m.column in ("clip_t", "style_sim")], *CONTENT_METRICS)
    parts = ["<h2>Compositions</h2>",
             '<p class="muted">StyleDrop\'s style + content sampling: the style\'s StyleDrop adapter and a subject\'s '
             "content adapter, eps = (1 - gamma) eps_style + gamma eps_content. CLIP-I and DINO are each image's "
             "mean cosine to the subject's images (higher: more of the subject); hover a cell for its 95% bootstrap "
             "interval. Compositions are not candidates for the verdict.</p>"]
    for style, rows in composed.groupby("style", sort=False):
        own = results[(results["style"] == style) & (results["method"] == COMPOSITION_STYLE_MODEL)]
        models = pd.concat([own, rows])
        header = "".join(f"<th>{esc(m.label)}</th>" for m in shown)
        body = "".join(
            f"<tr><td><code>{esc(row['method'])}</code></td>"
            + "".join(f'<td title="{esc(interval_title(row, m))}">{esc(format_metric(row, m))}</td>' for m in shown)
            + "</tr>" for _, row in models.iterrows())
        subject_refs = "".join(
            f"<h3>Subject <code>{esc(subject)}</code></h3><div class=\"refs\">"
            + "".join(img_tag(relative_src(run_dir, path), path.name, "thumb")
                      for path in sorted((run_dir / "samples" / subject / "ref").glob("*.png"))) + "</div>"
            for subject in pd.unique(rows["subject"]))
        parts += [f"<h3>{esc(rows.iloc[0]['display_name'])} <code>{esc(style)}</code></h3>",
                  f"<table><tr><th>model</th>{header}</tr>{body}</table>", subject_refs,
                  sample_grid(run_dir, models, prompts)]
    return "".join(parts)


def style_section(run_dir: Path, style_rows: pd.DataFrame, prompts: list[dict], metrics: tuple[Metric, ...],
                  anchor: str) -> str:
    first = style_rows.iloc[0]
    ref_paths = sorted((run_dir / "samples" / first["style"] / "ref").glob("*.png"))
    if ref_paths:
        refs = "".join(img_tag(relative_src(run_dir, path), path.name, "thumb") for path in ref_paths)
    else:
        refs = '<span class="muted">no StyleRef images found</span>'
    models = style_rows[style_rows["method"] != NOISE_FLOOR]  # the floor's images are the StyleRef ones, shown above
    templates = "".join(
        f"<li>{esc(row['method'])}: <code>{esc(row['prompt'])}</code>"
        + (f" · tokens <code>{esc(row['tokens'])}</code>" if row["tokens"] else "") + "</li>"
        for _, row in models.iterrows())
    return (
        f'<section id="{anchor}">'
        f"<h2>{esc(first['display_name'])} <code>{esc(first['style'])}</code></h2>"
        f"{metrics_table(style_rows, metrics)}"
        f"{bucket_line(run_dir, first['style'])}"
        f"<h3>StyleRef images ({len(ref_paths)})</h3>"
        f'<div class="refs">{refs}</div>'
        "<h3>Samples</h3>"
        '<p class="muted">A row per content prompt, a column per model and seed: every model drew each prompt from '
        "the same seeds. Click an image for its full size. Prompts:</p>"
        f'<ul class="muted">{templates}</ul>'
        f"{sample_grid(run_dir, models, prompts)}"
        f"{structure_maps(run_dir, models)}"
        f"{feedback_candidates(run_dir, first['style'])}"
        "</section>"
    )


def structure_maps(run_dir: Path, models: pd.DataFrame) -> str:
    """The structure map each controlled model's targets follow (StyleAligned's control), under the model's label."""
    maps = [(row["model"], run_dir / row["model_dir"] / CONTROL_MAP) for _, row in models.iterrows()
            if row["model_dir"] and (run_dir / row["model_dir"] / CONTROL_MAP).is_file()]
    if not maps:
        return ""
    cells = "".join(f"<figure>{img_tag(relative_src(run_dir, path), model, 'thumb')}"
                    f'<figcaption class="muted">{esc(model)}</figcaption></figure>' for model, path in maps)
    return ("<h3>Structure maps</h3>"
            '<p class="muted">What each controlled set follows; its Edge align. is the share of its images\' edges '
            "within 2 px of the content's Canny edges.</p>"
            f'<div class="refs">{cells}</div>')


def feedback_candidates(run_dir: Path, style: str) -> str:
    """Each StyleDrop model's round-1 candidates (style_factory/methods/styledrop.py), a row per feedback prompt, each
    with its file name, the name `feedback_images` takes; those round 2 trained on are outlined."""
    parts = []
    for folder in sorted((run_dir / "models" / style).glob("*-round1/feedback/candidates")):
        marker = read_json(folder / "samples.json") or {}
        feedback = folder.parent
        chosen = set((read_json(feedback / "selection.json") or {}).get("images", [])) | {
            entry["selected"] for entry in (read_json(feedback / "scores.json") or {}).get("prompts", [])}
        rows = []
        for index, prompt in enumerate(marker.get("prompts", [])):
            cells = []
            for seed in marker.get("seeds", []):
                path = folder / f"p{index:03d}_s{seed}.png"
                src = relative_src(run_dir, path)
                outline = ' style="outline: 3px solid #1a7f37"' if path.name in chosen else ""
                cells.append(f'<td{outline}><a href="{esc(quote(src))}">{img_tag(src, path.name, "cell")}</a>'
                             f"<br><code>{esc(path.name)}</code></td>")
            rows.append(f'<tr><th class="prompt">{esc(prompt)}</th>{"".join(cells)}</tr>')
        model = folder.parent.parent.name.removesuffix("-round1")
        parts.append(f"<h3>StyleDrop round-1 candidates <code>{esc(model)}</code></h3>"
                     '<p class="muted">Round 2 trains on the outlined ones. To choose them yourself, list names under '
                     "<code>train.method_options.styledrop.feedback_images</code> with <code>feedback: human</code> "
                     "(docs/methods.md).</p>"
                     f'<table class="grid">{"".join(rows)}</table>')
    return "".join(parts)


def bucket_line(run_dir: Path, style: str) -> str:
    """The curated images per size (aspect-ratio bucket), from curation's record; "" where it has none."""
    buckets = (read_json(run_dir / "curated" / f"{style}.json") or {}).get("buckets")
    if not buckets:
        return ""
    sizes = ", ".join(f"{esc(size)}: {int(n)}" for size, n in buckets.items())
    return f'<p class="muted">Curated images per size (width x height, curate.buckets): {sizes}</p>'


def sample_cell(run_dir: Path, samples_dir: str, prompt: dict, seed: int, method: str, css_class: str = "") -> str:
    """One sample as a table cell linking to the full-size image, or a grey box where it is missing."""
    path = run_dir / samples_dir / f"p{int(prompt['index']):03d}_s{seed}.png"
    class_attr = f' class="{css_class}"' if css_class else ""
    if not path.is_file():
        return f'<td{class_attr}><div class="missing">missing</div></td>'
    src = relative_src(run_dir, path)
    alt = f"{method}: {prompt['content']} (seed {seed})"
    return f'<td{class_attr}><a href="{esc(quote(src))}">{img_tag(src, alt, "cell")}</a></td>'


def sample_grid(run_dir: Path, models: pd.DataFrame, prompts: list[dict]) -> str:
    """Every model's samples side by side: a row per content prompt, a column per model and seed."""
    columns = [(row, [int(seed) for seed in row["seeds"]]) for _, row in models.iterrows()]
    header = ("<tr><th></th>" + "".join(f'<th class="first-of-model" colspan="{len(seeds)}">{esc(row["model"])}</th>'
                                       for row, seeds in columns) + "</tr>"
              "<tr><th></th>" + "".join(f'<th{" class=first-of-model" if j == 0 else ""}>seed {seed}</th>'
                                       for _, seeds in columns for j, seed in enumerate(seeds)) + "</tr>")
    body = []
    for prompt in prompts:
        cells = [sample_cell(run_dir, row["samples_dir"], prompt, seed, row["model"],
                             "first-of-model" if j == 0 else "")
                 for row, seeds in columns for j, seed in enumerate(seeds)]
        body.append(f'<tr><th class="prompt">{esc(prompt["content"])}</th>' + "".join(cells) + "</tr>")
    return f'<table class="grid">{header}{"".join(body)}</table>'


def verdict_section(run_dir: Path, best: pd.DataFrame, prompts: list[dict], seed: int, kid_metric: Metric,
                    strip_prompts: int = 6) -> str:
    """Which model to use per style (best.parquet), and each winner's samples beside the base's."""
    scale = kid_metric.scale

    def interval(value: float, low: float, high: float, sign: str = "") -> str:
        if not is_finite(value):
            return "n/a"
        return f"{value * scale:{sign}.1f} [{low * scale:{sign}.1f}, {high * scale:{sign}.1f}]"

    body, strips = [], []
    for _, row in best.iterrows():
        use = row["label"] if isinstance(row["label"], str) and row["label"] else "no verdict"
        if row["method"] == BASE_METHOD:
            use = "keep the base"
        files = [f"<code>{esc(row['diffusers_load'])}</code>" if row["diffusers_load"]
                 else f"zero-shot, no weights: <code>{esc(row['model_dir'])}</code>" if row["model_dir"] else ""]
        files += [f"<code>{esc(path)}</code>" for path in row["embeddings"]] if row["embeddings"] is not None else []
        runner = (f"{esc(row['runner_up'])}: {interval(row['runner_up_diff'], row['runner_up_diff_ci_low'], row['runner_up_diff_ci_high'], '+')}"
                  if row["runner_up"] else "")
        tied = ", ".join(row["tied"]) if row["tied"] is not None and len(row["tied"]) else "none"
        cells = [esc(row["style"]), esc(use), "<br>".join(f for f in files if f),
                 f"<code>{esc(row['webui_file'])}</code>" if row["webui_file"] else "",
                 esc(interval(row["value"], row["value_ci_low"], row["value_ci_high"])),
                 esc(interval(row["vs_base"], row["vs_base_ci_low"], row["vs_base_ci_high"], "+")),
                 esc(f"{row['clip_t']:.3f} ({row['base_clip_t']:.3f})") if is_finite(row["clip_t"]) else "n/a",
                 esc(tied), runner, esc(row["why"])]
        classes = ["", "use", "", "", "num", "num", "num", "", "", "why"]
        body.append("<tr>" + "".join(f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>"
                                     for c, cell in zip(classes, cells)) + "</tr>")
        if isinstance(row["samples_dir"], str) and row["samples_dir"]:
            shown = [BASE_METHOD] + ([row["label"]] if row["method"] != BASE_METHOD else [])
            dirs = [row["base_samples_dir"], row["samples_dir"]][:len(shown)]
            rows_html = "".join(
                f"<tr><th>{esc(name)}</th>"
                + "".join(sample_cell(run_dir, folder, prompt, seed, name) for prompt in prompts[:strip_prompts])
                + "</tr>" for name, folder in zip(shown, dirs))
            strips.append(f"<div><h3>{esc(row['style'])}: {esc(use)}</h3>"
                          f'<table class="grid">{rows_html}</table></div>')
    primary = distinct_text(best["primary"])
    label = kid_metric.label.replace("KID", "KID held-out") if primary == "kid_heldout" else kid_metric.label
    headers = ["Style", "Use", "Load in diffusers", "ComfyUI / A1111 file", label + " [95%]",
               "vs base [95%]", "CLIP-T (base)", "Tied with", "Runner-up: Δ [95%]", "Why"]
    return (
        "<h2>Which model should I use?</h2>"
        f'<p class="muted">Rule (<code>evaluate.selection</code>): {esc(distinct_text(best["rule"].dropna()))}. '
        f"{esc(kid_units_note(kid_metric))} Paths are relative to this folder; the evidence for every model is in "
        f"<code>{BEST_FILENAME}</code> (column <code>candidates</code>). Below: each winner beside the base on the "
        "same prompts and seed.</p>"
        '<table class="metrics" id="verdict">'
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
        "<tbody>" + "".join(body) + "</tbody></table>"
        f'<div class="strips">{"".join(strips)}</div>'
    )


# ---------------------------------------------------------------------------------------
# Plots


def method_colors(results: pd.DataFrame) -> dict[str, tuple]:
    """One colour per method, shared by every plot."""
    palette = plt.get_cmap("tab10").colors
    return {method: palette[i % len(palette)] for i, method in enumerate(pd.unique(results["method"]))}


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # a legend beside the axes is kept
    plt.close(fig)
    return path


def plot_alignment_scatter(results: pd.DataFrame, colors: dict[str, tuple], path: Path) -> Path | None:
    """Text alignment (CLIP-T) against style similarity: tuning should move points up without moving left."""
    points = results[results["clip_t"].map(is_finite) & results["style_sim"].map(is_finite)]
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, method_points in points.groupby("method", sort=False):
        ax.scatter(method_points["clip_t"], method_points["style_sim"], color=colors[method], label=method, s=40)
        for _, row in method_points.iterrows():
            ax.annotate(row["style"], (row["clip_t"], row["style_sim"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
    ax.xaxis.set_major_locator(plt.MaxNLocator(6))
    ax.set_xlabel("CLIP-T (text alignment) →")
    ax.set_ylabel("Style similarity →")
    ax.set_title("Text alignment vs style similarity")
    ax.legend(title="method")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_kid_bars(results: pd.DataFrame, colors: dict[str, tuple], kid_metric: Metric, path: Path) -> Path | None:
    """KID per style, one bar per model, with the KID standard deviation as error bar when known; a noise floor the
    table shows is a dashed line across its style, not a bar. The legend sits beside the axes, never on a bar."""
    if not results["kid"].map(is_finite).any():
        return None
    styles = list(pd.unique(results["style"]))
    methods = [method for method in colors if method != NOISE_FLOOR]
    bar_width = 0.8 / len(methods)
    scale = kid_metric.scale
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(styles) + 1.5), 4))
    for j, method in enumerate(methods):
        rows = results[(results["method"] == method) & results["kid"].map(is_finite)]
        x = [styles.index(style) + (j - (len(methods) - 1) / 2) * bar_width for style in rows["style"]]
        heights = rows["kid"] * scale
        errors = [std * scale if is_finite(std) else math.nan for std in rows["kid_std"]]  # NaN: no error bar
        ax.bar(x, heights, bar_width, yerr=errors, capsize=3, color=colors[method], label=method)
    floors = results[(results["method"] == NOISE_FLOOR) & results["kid"].map(is_finite)]
    for k, (_, row) in enumerate(floors.iterrows()):
        centre = styles.index(row["style"])
        ax.hlines(row["kid"] * scale, centre - 0.45, centre + 0.45, colors="black", linestyles="dashed",
                  label=NOISE_FLOOR if k == 0 else None)
    ax.set_xticks(range(len(styles)))
    ax.set_xticklabels(styles, rotation=30 if len(styles) > 4 else 0, ha="right" if len(styles) > 4 else "center")
    ax.set_ylabel(f"{kid_metric.label} (lower is better)")
    ax.set_title("KID to StyleRef images per style")
    ax.legend(title="model", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_loss_curves(run_dir: Path, results: pd.DataFrame, colors: dict[str, tuple], path: Path) -> Path | None:
    """Training loss per style (one panel each), raw and smoothed, for the runs that left a log."""
    curves: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for _, row in results.iterrows():
        name = Path(row["model_dir"]).name  # the model's name: its method, sweep point and training seed
        log_path = run_dir / "logs" / row["style"] / name / "train_log.jsonl"
        if name and log_path.is_file():
            steps, losses = read_loss_log(log_path)
            if steps:
                curves.setdefault(row["style"], []).append((row["method"], name, steps, losses))
    if not curves:
        return None
    n_cols = min(3, len(curves))
    n_rows = math.ceil(len(curves) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax, (style, style_curves) in zip(axes.flat, curves.items()):
        for method, name, steps, losses in style_curves:
            # Diffusion losses are very noisy: a rolling mean shows the trend.
            smoothed = pd.Series(losses).rolling(max(1, len(losses) // 20), min_periods=1).mean()
            ax.plot(steps, losses, color=colors[method], alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed, color=colors[method], label=name)
        ax.set_title(style)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    return save_figure(fig, path)


def plot_metrics_by_step(results: pd.DataFrame, colors: dict[str, tuple], metrics: tuple[Metric, ...],
                         path: Path) -> Path | None:
    """Each metric against the training step (evaluate.checkpoints), a row of panels per style, a line per model
    configuration (its method and sweep settings) averaged over its training seeds; None when no model was scored
    at more than one step."""
    if "step" not in results:
        return None
    models = results[results["step"].notna()]
    settings = [c for c in models.columns if c.startswith("sweep.")]
    keys = ["style", "method", *settings]
    lines = [(key, rows) for key, rows in models.groupby(keys, sort=False, dropna=False) if rows["step"].nunique() > 1]
    if not lines:
        return None
    styles = list(dict.fromkeys(key[0] for key, _ in lines))
    metrics = tuple(m for m in metrics if m.column in models and models[m.column].map(is_finite).any())
    fig, axes = plt.subplots(len(styles), len(metrics), figsize=(3.6 * len(metrics), 2.8 * len(styles)),
                             squeeze=False)
    for (style, method, *values), rows in lines:
        label = " ".join([method, *(f"{c[len('sweep.'):]}={v}" for c, v in zip(settings, values) if not pd.isna(v))])
        by_step = rows.groupby("step")[[m.column for m in metrics]].mean()  # the mean over training seeds
        for ax, metric in zip(axes[styles.index(style)], metrics):
            ax.plot(by_step.index, by_step[metric.column] * metric.scale, marker="o", color=colors[method],
                    linestyle=["-", "--", ":", "-."][len(ax.lines) % 4], label=label)
    for row, style in zip(axes, styles):
        for ax, metric in zip(row, metrics):
            ax.set_title(f"{style}: {metric.label}", fontsize=9)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        row[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write report.html for an evaluated run folder.")
    parser.add_argument("run_dir", type=Path, help="results/<run> folder holding results.parquet")
    print(write_report(parser.parse_args().run_dir))


if __name__ == "__main__":
    main()
