"""Compare the same styles across evaluated run folders (an SD 1.5 run against an SDXL run, a new protocol against an
old one) in one table and one HTML page: `python -m jobs.compare RUN_DIR RUN_DIR ... [--out DIR]
[--allow-protocol-mismatch]`.

A run whose protocol differs from the first run's (prompts, sampling seeds, sampler, steps, guidance, KID seed,
metric backbones), or a style whose StyleRef set differs in size, is refused and the difference printed, unless
--allow-protocol-mismatch, which keeps its rows with the difference in `protocol_differs`. Reads finished run folders
only: no Ray, no run lock. Exit 0, 1 when rows were refused, 2 when no style is left in two runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from style_factory.files import write_parquet_atomic, write_text_atomic
from style_factory.report import BEST_FILENAME, CSS, NOISE_FLOOR, esc, is_finite, kid_display

PROTOCOL_FIELDS = ("prompts", "seeds", "sampler", "num_inference_steps", "guidance_scale", "kid_seed",
                   "backbone_sha256")
COLUMNS = ["run", "run_dir", "style", "method", "family", "base_model", "n_images", "n_reference", "kid",
           "kid_ci_low", "kid_ci_high", "kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high", "clip_t",
           "clip_t_ci_low", "clip_t_ci_high", "style_sim", "fid", "inception_backbone"]
TABLE_NAME, PAGE_NAME = "compare.parquet", "compare.html"


def read_run(run_dir: Path) -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """A run folder's results (without the noise floor), its protocol and its verdict (None without one)."""
    path = run_dir / "results.parquet"
    metadata = pq.read_schema(path).metadata or {}
    if b"style_factory_protocol" not in metadata:
        raise ValueError(f"{path} records no protocol (written before protocols were recorded): evaluate it again")
    results = pd.read_parquet(path)
    best = run_dir / BEST_FILENAME
    return (results[results["method"] != NOISE_FLOOR], json.loads(metadata[b"style_factory_protocol"]),
            pd.read_parquet(best) if best.is_file() else None)


def protocol_differences(reference: dict, other: dict) -> list[str]:
    """What differs between two runs' protocols, one phrase per field."""
    found = []
    for field in PROTOCOL_FIELDS:
        mine, theirs = reference.get(field), other.get(field)
        if mine == theirs:
            continue
        if field == "prompts" and isinstance(mine, list) and isinstance(theirs, list):
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            found.append(f"prompts: {len(mine)} vs {len(theirs)}, first difference at #{at}")
        elif field == "backbone_sha256" and isinstance(mine, dict) and isinstance(theirs, dict):
            names = sorted(set(mine) ^ set(theirs) | {n for n in set(mine) & set(theirs) if mine[n] != theirs[n]})
            found.append(f"backbones: {', '.join(names)}")
        else:
            found.append(f"{field}: {mine!r} vs {theirs!r}")
    return found


def compare(run_dirs: list[Path], allow_mismatch: bool) -> tuple[pd.DataFrame, list[str]]:
    """The rows of every style found in at least two runs whose protocols agree (or all, when allowed), and a line
    per run or style refused (or kept despite a difference)."""
    runs = [(run_dir, *read_run(run_dir)) for run_dir in run_dirs]
    labels = [run_dir.name if [d.name for d in run_dirs].count(run_dir.name) == 1 else f"{run_dir.name}#{i}"
              for i, run_dir in enumerate(run_dirs)]
    _, first, first_protocol, _ = runs[0]
    references = first.groupby("style")["n_reference"].first()
    tables, notes = [], []
    for label, (run_dir, results, protocol, best) in zip(labels, runs):
        differs = protocol_differences(first_protocol, protocol)
        results = results.assign(protocol_differs="; ".join(differs))
        sizes = results.groupby("style")["n_reference"].first()
        other_refs = [s for s in sizes.index if s in references.index and sizes[s] != references[s]]
        for style in other_refs:
            results.loc[results["style"] == style, "protocol_differs"] += (
                f"{'; ' if differs else ''}{style}: {sizes[style]} vs {references[style]} StyleRef images")
        if (differs or other_refs) and not allow_mismatch:
            if differs:
                notes.append(f"refused {label} ({run_dir}): its protocol differs from {labels[0]}'s: "
                             + "; ".join(differs))
                continue
            notes.append(f"refused {label}'s {', '.join(other_refs)}: the StyleRef set differs in size from "
                         f"{labels[0]}'s")
            results = results[~results["style"].isin(other_refs)]
        elif differs or other_refs:
            notes.append(f"kept {label} despite protocol differences: {results['protocol_differs'].iloc[0]}")
        chosen = set() if best is None else set(zip(best["style"], best["method"], best["model_dir"].fillna("")))
        results = results.assign(run=label, run_dir=str(run_dir), family=protocol.get("family", ""),
                                 verdict=[(s, m, d) in chosen for s, m, d in
                                          zip(results["style"], results["method"], results["model_dir"])])
        tables.append(results[[*COLUMNS, "verdict", "protocol_differs"]])
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[*COLUMNS, "verdict"])
    shared = table.groupby("style")["run"].nunique()
    return table[table["style"].isin(shared[shared >= 2].index)].reset_index(drop=True), notes


def page(table: pd.DataFrame, notes: list[str]) -> str:
    """One HTML table per style: a row per run and model."""
    scale, unit = kid_display(table)

    def interval(row: pd.Series, column: str, sign: str = "") -> str:
        value, low, high = row[column], row[f"{column}_ci_low"], row[f"{column}_ci_high"]
        if not is_finite(value):
            return "n/a"
        return f"{value * scale:{sign}.1f} [{low * scale:{sign}.1f}, {high * scale:{sign}.1f}]"

    headers = ["Run", "Base model (family)", "Model", f"KID {unit} [95%]", "vs base [95%]", "CLIP-T", "Style sim.",
               "Verdict", "Protocol differs"]
    sections = []
    for style, rows in table.groupby("style", sort=False):
        body = "".join(
            "<tr>" + "".join(f"<td>{cell}</td>" for cell in (
                esc(row["run"]), f"<code>{esc(row['base_model'])}</code> ({esc(row['family'])})", esc(row["method"]),
                esc(interval(row, "kid")), esc(interval(row, "kid_vs_base", "+")),
                esc(f"{row['clip_t']:.3f}") if is_finite(row["clip_t"]) else "n/a",
                esc(f"{row['style_sim']:.3f}") if is_finite(row["style_sim"]) else "n/a",
                "✓ use" if row["verdict"] else "", esc(row["protocol_differs"]))) + "</tr>"
            for _, row in rows.iterrows())
        sections.append(f"<h2>{esc(style)}</h2>"
                        '<table class="metrics"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in headers)
                        + f"</tr></thead><tbody>{body}</tbody></table>")
    note_list = "".join(f"<li>{esc(note)}</li>" for note in notes)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Style Factory: runs compared</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>Runs compared: {esc(', '.join(pd.unique(table['run'])))}</h1>"
            '<p class="muted">The same styles across runs, on one protocol (prompts, seeds, sampler, backbones). '
            "“✓ use”: the run’s own verdict (best.parquet).</p>"
            + (f"<ul>{note_list}</ul>" if notes else "") + "".join(sections) + "\n</body>\n</html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="results/<run> folders")
    parser.add_argument("--out", type=Path, help="where compare.parquet and compare.html go "
                                                 "(default: compare/ beside the first run folder)")
    parser.add_argument("--allow-protocol-mismatch", action="store_true",
                        help="keep runs whose protocol differs, the difference named in each row")
    args = parser.parse_args(argv)
    if len(args.run_dirs) < 2:
        parser.error("name at least two run folders")
    try:
        table, notes = compare(args.run_dirs, args.allow_protocol_mismatch)
    except (OSError, ValueError, pa.ArrowException) as err:
        print(f"[compare] {err}")
        return 2
    for note in notes:
        print(f"[compare] {note}")
    if table.empty:
        print("[compare] no style is left in two runs: nothing to compare")
        return 2
    out = args.out or args.run_dirs[0].parent / "compare"
    write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), out / TABLE_NAME)
    write_text_atomic(out / PAGE_NAME, page(table, notes))
    print(f"  {TABLE_NAME:16s} {out / TABLE_NAME}\n  {PAGE_NAME:16s} {out / PAGE_NAME}")
    return 1 if any(note.startswith("refused") for note in notes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
