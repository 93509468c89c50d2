"""Comparing runs: one table and page over the same styles, refusing runs scored on another protocol."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import compare
from tests.test_report import make_run

PROTOCOL = {"prompts": ["a red circle on a blue background", "a small house by a lake"], "seeds": [0, 1],
            "sampler": "DDIM", "num_inference_steps": 20, "guidance_scale": 5.0, "kid_seed": 0, "family": "sd1",
            "backbone_sha256": {"tiny-inception": "aa", "tiny-clip": "bb", "tiny-dino": "cc"}}


def run_with_protocol(run_dir: Path, styles: dict[str, list[str]], **changes) -> Path:
    make_run(run_dir, styles)
    table = pq.read_table(run_dir / "results.parquet")
    protocol = {**PROTOCOL, **changes}
    pq.write_table(table.replace_schema_metadata({"style_factory_protocol": json.dumps(protocol)}),
                   run_dir / "results.parquet")
    return run_dir


def test_runs_on_one_protocol_give_one_table_and_page_over_their_shared_styles(tmp_path):
    a = run_with_protocol(tmp_path / "sd15", {"pixel-art": ["base", "styleboost"], "ink": ["base"]})
    b = run_with_protocol(tmp_path / "sdxl", {"pixel-art": ["base", "styleboost", "noise-floor"]}, family="sdxl")
    out = tmp_path / "out"
    assert compare.main([str(a), str(b), "--out", str(out)]) == 0
    table = pd.read_parquet(out / "compare.parquet")
    assert sorted(zip(table["run"], table["method"])) == [("sd15", "base"), ("sd15", "styleboost"),
                                                          ("sdxl", "base"), ("sdxl", "styleboost")]
    assert set(table["style"]) == {"pixel-art"}  # ink is in one run only; the noise floor is no model
    assert set(zip(table["run"], table["family"])) == {("sd15", "sd1"), ("sdxl", "sdxl")}
    assert (table["protocol_differs"] == "").all()
    page = (out / "compare.html").read_text(encoding="utf-8")
    assert "<h2>pixel-art</h2>" in page and "sdxl" in page


def test_a_run_on_another_protocol_is_refused_with_the_difference_named(tmp_path, capsys):
    a = run_with_protocol(tmp_path / "old", {"pixel-art": ["base", "styleboost"]})
    b = run_with_protocol(tmp_path / "new", {"pixel-art": ["base", "styleboost"]}, seeds=[0, 1, 2],
                          backbone_sha256={**PROTOCOL["backbone_sha256"], "tiny-clip": "other"})
    c = run_with_protocol(tmp_path / "same", {"pixel-art": ["base", "styleboost"]})
    out = tmp_path / "out"
    assert compare.main([str(a), str(b), str(c), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "refused new" in printed and "seeds: [0, 1] vs [0, 1, 2]" in printed and "backbones: tiny-clip" in printed
    assert set(pd.read_parquet(out / "compare.parquet")["run"]) == {"old", "same"}

    assert compare.main([str(a), str(b), "--out", str(out), "--allow-protocol-mismatch"]) == 0
    table = pd.read_parquet(out / "compare.parquet")
    assert set(table["run"]) == {"old", "new"}
    assert table[table["run"] == "new"]["protocol_differs"].str.contains("seeds: \\[0, 1\\] vs \\[0, 1, 2\\]").all()


def test_a_style_scored_against_another_styleref_set_is_refused(tmp_path, capsys):
    a = run_with_protocol(tmp_path / "a", {"pixel-art": ["base", "styleboost"], "watercolor": ["base"]})
    b = run_with_protocol(tmp_path / "b", {"pixel-art": ["base", "styleboost"], "watercolor": ["base"]})
    table = pq.read_table(b / "results.parquet")
    results = table.to_pandas()
    results.loc[results["style"] == "watercolor", "n_reference"] = 5
    pq.write_table(pa.Table.from_pandas(results, schema=table.schema, preserve_index=False), b / "results.parquet")
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 1
    assert "refused b's watercolor" in capsys.readouterr().out
    assert set(pd.read_parquet(tmp_path / "out" / "compare.parquet")["style"]) == {"pixel-art"}


def test_nothing_left_to_compare_is_an_error(tmp_path, capsys):
    a = run_with_protocol(tmp_path / "a", {"pixel-art": ["base", "styleboost"]})
    b = run_with_protocol(tmp_path / "b", {"pixel-art": ["base", "styleboost"]}, sampler="Euler")
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "sampler: 'DDIM' vs 'Euler'" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
