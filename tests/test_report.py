"""The HTML report renders from a small fake run folder, with working relative image links."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from style_factory.control import CONTROL_MAP
from style_factory.evaluate import RESULTS_SCHEMA
from style_factory.report import TOY_BACKBONE_WARNING, display_metrics, model_labels, write_report

PROMPTS = ["a red circle on a blue background", "a small house by a lake"]
SEEDS = [0, 1]
DISPLAY_NAMES = {
    "pixel-art": "Pixel Art & <Sprites>",
    "watercolor": "Watercolor",
    "ink": "Ink Wash",
}


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    """A 64 px image: a 4 px checkerboard of `color` and white, so upscaling blur would show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checker = ((np.indices((64, 64)) // 4).sum(axis=0) % 2).astype(bool)
    pixels = np.where(checker[..., None], np.array(color, dtype=np.uint8), np.uint8(255))
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def make_run(
    run_dir: Path,
    methods_by_style: dict[str, list[str]],
    backbones_real: bool = True,
    display_names: dict[str, str] = DISPLAY_NAMES,
) -> Path:
    """A run folder as the evaluate stage leaves it: samples, references, prompts, results, one log."""
    write_png(run_dir / "samples" / "dummy.png", (0, 0, 0))  # the report must not pick up stray files
    (run_dir / "samples" / "prompts.json").write_text(
        json.dumps([{"index": i, "content": content} for i, content in enumerate(PROMPTS)])
    )
    rows = []
    for style_index, (style, methods) in enumerate(methods_by_style.items()):
        for ref_index in range(3):
            write_png(run_dir / "samples" / style / "ref" / f"ref_{ref_index}.png", (200, 40 * ref_index, 0))
        for method_index, method in enumerate(methods):
            samples_dir = f"samples/{style}/{method}"
            is_noise_floor = method == "noise-floor"  # the StyleRef halves: no samples of its own
            for prompt_index in range(0 if is_noise_floor else len(PROMPTS)):
                for seed in SEEDS:
                    write_png(run_dir / samples_dir / f"p{prompt_index:03d}_s{seed}.png", (0, 100 * method_index, 50 * seed))
            is_base = method == "base"
            rows.append({
                "run_id": "test-run",
                "style": style,
                "display_name": display_names[style],
                "method": method,
                "tokens": "" if is_base else f"<{style}>",
                "base_model": "tiny-sd",
                "prompt": "{content}" if is_base else f"{{content}} in <{style}> style",
                "n_images": len(PROMPTS) * len(SEEDS),
                "n_reference": 3,
                "seeds": SEEDS,
                # Tuned models get lower KID and higher style similarity, so they win those columns.
                "fid": math.nan if style_index == 1 else 100.0 - 10 * method_index,
                "kid": 0.05 - 0.02 * method_index + 0.01 * style_index,
                "kid_std": math.nan if is_base else 0.004,
                "kid_ci_low": math.nan if is_base else 0.025,
                "kid_ci_high": math.nan if is_base else 0.036,
                "clip_t": 0.30 - 0.01 * method_index + 0.005 * style_index,
                "style_sim": 0.50 + 0.2 * method_index - 0.05 * style_index,
                "inception_backbone": "tiny-inception",
                "clip_backbone": "tiny-clip",
                "dino_backbone": "tiny-dino",
                "backbones_real": backbones_real,
                "samples_dir": samples_dir,
                "model_dir": "" if is_base else f"models/{style}/{method}",
                "config_hash": "abc123",
                "versions": json.dumps({"torch": "2.4.0"}),
                "created_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
            })
            if is_noise_floor:
                rows[-1].update({"tokens": "", "prompt": "", "seeds": [], "n_images": 2, "n_reference": 1,
                                 "kid": 0.001, "kid_std": 0.0005, "kid_ci_low": 0.0, "kid_ci_high": 0.002,
                                 "clip_t": math.nan, "style_sim": 0.99, "samples_dir": f"samples/{style}/ref",
                                 "model_dir": ""})
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), run_dir / "results.parquet")

    first_style = next(iter(methods_by_style))
    log_path = run_dir / "logs" / first_style / "styleboost" / "train_log.jsonl"
    log_path.parent.mkdir(parents=True)
    log_path.write_text("".join(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n" for step in range(50)))
    return run_dir


class ReportParser(HTMLParser):
    """Collects image sources, start tags, visible text and the body rows of every table with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.img_srcs: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.table_rows: dict[str, list[list[tuple[str, str]]]] = {}  # table id -> per row: (class, text) per cell
        self.table_ids: list[str | None] = []
        self.in_tbody = False
        self.cell_class: str | None = None

    @property
    def leaderboard_rows(self) -> list[list[tuple[str, str]]]:
        return self.table_rows.get("leaderboard", [])

    def current_rows(self) -> list[list[tuple[str, str]]] | None:
        """The rows of the table whose body we are in, when it has an id."""
        if not (self.in_tbody and self.table_ids and self.table_ids[-1]):
            return None
        return self.table_rows.setdefault(self.table_ids[-1], [])

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.img_srcs.append(attributes["src"])
        elif tag == "table":
            self.table_ids.append(attributes.get("id"))
        elif tag == "tbody":
            self.in_tbody = True
        elif tag == "tr" and self.current_rows() is not None:
            self.current_rows().append([])
        elif tag == "td" and self.current_rows() is not None:
            self.cell_class = attributes.get("class") or ""
            self.current_rows()[-1].append((self.cell_class, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.table_ids.pop()
        elif tag == "tbody":
            self.in_tbody = False
        elif tag == "td":
            self.cell_class = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        rows = self.current_rows()
        if self.cell_class is not None and rows is not None:
            css_class, text = rows[-1][-1]
            rows[-1][-1] = (css_class, text + data)


def parse(report: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(report.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_report_links_resolve_and_leaderboard_is_complete(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"], "watercolor": ["base", "styleboost"]})
    report = write_report(run_dir)
    assert report == run_dir / "report.html"
    parsed = parse(report)

    file_srcs = [src for src in parsed.img_srcs if not src.startswith("data:")]
    assert file_srcs
    for src in file_srcs:
        assert not src.startswith(("/", "file:")) and not Path(unquote(src)).is_absolute(), src
        assert (report.parent / unquote(src)).is_file(), src

    # Every sample and StyleRef image is shown, plus the scatter, KID and loss plots.
    for style in ["pixel-art", "watercolor"]:
        for method in ["base", "styleboost"]:
            for prompt_index in range(len(PROMPTS)):
                for seed in SEEDS:
                    assert f"samples/{style}/{method}/p{prompt_index:03d}_s{seed}.png" in file_srcs
        assert sum(src.startswith(f"samples/{style}/ref/") for src in file_srcs) == 3
    assert "samples/dummy.png" not in file_srcs
    assert sum(src.startswith("report_assets/") for src in file_srcs) == 3

    # Base grid comes before the tuned grid, so the same prompts and seeds line up for comparison.
    assert file_srcs.index("samples/pixel-art/base/p000_s0.png") < file_srcs.index("samples/pixel-art/styleboost/p000_s0.png")

    assert len(parsed.leaderboard_rows) == 4
    assert [row[0][1] for row in parsed.leaderboard_rows] == ["pixel-art", "pixel-art", "watercolor", "watercolor"]
    assert [row[1][1] for row in parsed.leaderboard_rows] == ["base", "styleboost", "base", "styleboost"]

    html_text = report.read_text(encoding="utf-8")
    assert "Pixel Art &amp; &lt;Sprites&gt;" in html_text
    assert "<Sprites>" not in html_text
    assert "Watercolor" in html_text
    assert TOY_BACKBONE_WARNING not in html_text
    for prompt in PROMPTS:
        assert prompt in html_text


def test_leaderboard_highlights_best_per_style_and_survives_nan(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"], "watercolor": ["base", "styleboost"]})
    rows = parse(write_report(run_dir)).leaderboard_rows
    # Columns: style, method, KID, FID, CLIP-T, style sim, images.
    pixel_base, pixel_boost, water_base, water_boost = rows
    assert "best" in pixel_boost[2][0] and "best" not in pixel_base[2][0]  # lower KID wins
    assert "best" in pixel_boost[3][0] and "best" not in pixel_base[3][0]  # lower FID wins
    assert "best" in pixel_base[4][0] and "best" not in pixel_boost[4][0]  # higher CLIP-T wins
    assert "best" in pixel_boost[5][0] and "best" not in pixel_base[5][0]  # higher style sim wins
    assert pixel_boost[2][1] == "30.00 ± 4.00"
    assert pixel_base[2][1] == "50.00"  # NaN kid_std: no error shown
    # watercolor has NaN FID everywhere: shown as n/a, nothing highlighted.
    assert water_base[3] == ("num", "n/a") and water_boost[3] == ("num", "n/a")


def test_tiny_backbone_banner_and_every_backbone_named(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"]}, backbones_real=False)
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert TOY_BACKBONE_WARNING in html
    assert all(f"<code>{name}</code>" in html for name in ("tiny-inception", "tiny-clip", "tiny-dino"))


def test_style_with_only_base_row_renders(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"], "ink": ["base"]})
    report = write_report(run_dir)
    parsed = parse(report)
    assert len(parsed.leaderboard_rows) == 3
    assert [row[0][1] for row in parsed.leaderboard_rows][-1] == "ink"
    assert "Ink Wash" in report.read_text(encoding="utf-8")
    for seed in SEEDS:
        assert f"samples/ink/base/p001_s{seed}.png" in parsed.img_srcs
    # A single row has nothing to beat: no highlight.
    assert all("best" not in css_class for css_class, _ in parsed.leaderboard_rows[-1])


def test_text_from_data_is_escaped(tmp_path: Path) -> None:
    names = {"pixel-art": "<script>alert('x')</script>"}
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"]}, display_names=names)
    report = write_report(run_dir)
    html_text = report.read_text(encoding="utf-8")
    assert "<script>" not in html_text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text
    parsed = parse(report)
    assert "script" not in parsed.tags
    assert "<script>alert('x')</script>" in "".join(parsed.text)


def test_noise_floor_row_comes_last_unhighlighted_and_without_a_grid(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["noise-floor", "base", "styleboost"]})
    report = write_report(run_dir)
    parsed = parse(report)
    assert [row[1][1] for row in parsed.leaderboard_rows] == ["base", "styleboost", "noise-floor"]
    floor = parsed.leaderboard_rows[-1]
    assert all("best" not in css_class for css_class, _ in floor)  # lowest KID, but not a model
    assert floor[2][1] == "1.00 ± 0.50" and floor[4][1] == "n/a"
    assert "best" in parsed.leaderboard_rows[1][2][0]  # styleboost still wins KID among the models
    html_text = report.read_text(encoding="utf-8")
    assert 'title="95% CI [25.00, 36.00]"' in html_text
    assert "<h3>noise-floor</h3>" not in html_text and "images per model</li>" in html_text


def test_learning_table_marks_where_kid_fell_against_the_base(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost", "dreambooth"],
                                           "watercolor": ["base", "styleboost", "dreambooth"]})
    results = pq.read_table(run_dir / "results.parquet").to_pandas()
    changes = {  # (style, method) -> KID change and its paired interval
        ("pixel-art", "styleboost"): (-0.02, -0.025, -0.015), ("watercolor", "styleboost"): (-0.02, -0.03, -0.01),
        ("pixel-art", "dreambooth"): (0.01, 0.005, 0.015), ("watercolor", "dreambooth"): (-0.001, -0.004, 0.002),
    }
    for (style, method), values in changes.items():
        at = (results["style"] == style) & (results["method"] == method)
        results.loc[at, ["kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high"]] = values
    # pixel-art's base interval lies above styleboost's [0.025, 0.036]: the stricter test passes there only.
    pixel_art = results["style"] == "pixel-art"
    results.loc[pixel_art & (results["method"] == "base"), ["kid_ci_low", "kid_ci_high"]] = (0.04, 0.06)
    results.loc[pixel_art & (results["method"] == "dreambooth"), ["kid_ci_low", "kid_ci_high"]] = (0.045, 0.07)
    pq.write_table(pa.Table.from_pandas(results, schema=RESULTS_SCHEMA, preserve_index=False),
                   run_dir / "results.parquet")

    rows = parse(write_report(run_dir)).table_rows["learning"]
    styleboost, dreambooth = rows
    assert styleboost == [("", "styleboost"), ("num learned", "-20.0* [-25.0, -15.0]"),
                          ("num learned", "-20.0 [-30.0, -10.0]"), ("num", "2 of 2 (1*)")]
    assert dreambooth == [("", "dreambooth"), ("num worse", "+10.0 [+5.0, +15.0]"),
                          ("num", "-1.0 [-4.0, +2.0]"), ("num", "0 of 2 (0*)")]


def test_learning_table_is_left_out_for_results_without_the_kid_change(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"]})
    results = pq.read_table(run_dir / "results.parquet")
    pq.write_table(results.drop_columns(["kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high"]),
                   run_dir / "results.parquet")
    parsed = parse(write_report(run_dir))
    assert "learning" not in parsed.table_rows and len(parsed.leaderboard_rows) == 2


def test_verdict_comes_first_with_the_winner_beside_the_base(tmp_path: Path) -> None:
    from style_factory.decide import BEST_SCHEMA

    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"], "watercolor": ["base", "styleboost"]})
    common = {"run_id": "test-run", "primary": "kid", "rule": "lowest kid among ...", "base_model": "tiny-sd",
              "base_clip_t": 0.3, "clip_t": 0.29, "embeddings": [], "tied": [], "diffusers_file": "",
              "webui_file": "", "inception_backbone": "tiny-inception", "backbones_real": True}
    best = [
        {**common, "style": "pixel-art", "method": "styleboost", "label": "styleboost",
         "model_dir": "models/pixel-art/styleboost", "value": 0.03, "value_ci_low": 0.025, "value_ci_high": 0.036,
         "vs_base": -0.02, "vs_base_ci_low": -0.025, "vs_base_ci_high": -0.015,
         "diffusers_load": 'StableDiffusionPipeline.from_pretrained("models/pixel-art/styleboost")',
         "runner_up": "base", "runner_up_diff": 0.02, "runner_up_diff_ci_low": 0.015, "runner_up_diff_ci_high": 0.025,
         "why": "lowest KID", "samples_dir": "samples/pixel-art/styleboost", "base_samples_dir": "samples/pixel-art/base"},
        {**common, "style": "watercolor", "method": "base", "label": "base", "model_dir": "", "value": 0.06,
         "value_ci_low": 0.05, "value_ci_high": 0.07, "diffusers_load": 'StableDiffusionPipeline.from_pretrained("x")',
         "runner_up": "styleboost", "why": "keep the base: ...", "samples_dir": "samples/watercolor/base",
         "base_samples_dir": "samples/watercolor/base"},
    ]
    pq.write_table(pa.Table.from_pylist(best, schema=BEST_SCHEMA), run_dir / "best.parquet")
    report = write_report(run_dir)
    html_text = report.read_text(encoding="utf-8")
    assert html_text.index('id="verdict"') < html_text.index('id="leaderboard"')
    rows = parse(report).table_rows["verdict"]
    assert [row[0][1] for row in rows] == ["pixel-art", "watercolor"]
    assert rows[0][1][1] == "styleboost" and rows[1][1][1] == "keep the base"
    assert rows[0][4][1] == "30.0 [25.0, 36.0]" and rows[0][5][1] == "-20.0 [-25.0, -15.0]"
    assert rows[0][8][1] == "base: +20.0 [+15.0, +25.0]"
    srcs = parse(report).img_srcs
    # before the leaderboard's plots: the winner's strip, base first, same prompt and seed
    strip = srcs[:srcs.index("report_assets/clip_t_vs_style_sim.png")]
    assert strip.index("samples/pixel-art/base/p000_s0.png") < strip.index("samples/pixel-art/styleboost/p000_s0.png")
    assert "samples/watercolor/styleboost/p000_s0.png" not in strip  # the base is kept: only its row


def test_sample_grids_are_side_by_side_a_row_per_prompt_a_column_per_model(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost", "dreambooth"]})
    html_text = write_report(run_dir).read_text(encoding="utf-8")
    grids = html_text.split('<table class="grid">')[1:]
    assert len(grids) == 1  # one grid per style, every model in it
    rows = grids[0].split("</table>")[0].split("<tr>")[1:]
    assert len(rows) == 2 + len(PROMPTS)  # model names, seeds, then a row per prompt
    assert [m in rows[0] for m in ("base", "styleboost", "dreambooth")] == [True] * 3
    first_prompt = rows[2]
    assert first_prompt.count("<img") == 3 * len(SEEDS)
    assert (first_prompt.index("base/p000_s0.png") < first_prompt.index("styleboost/p000_s0.png")
            < first_prompt.index("dreambooth/p000_s0.png"))


def test_toy_kid_is_shown_unscaled_and_says_so(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost"]}, backbones_real=False)
    results = pq.read_table(run_dir / "results.parquet").to_pandas()
    results["inception_backbone"] = "toy-clip image embedding (NOT REAL: trained on the toy world)"
    results["kid"], results["kid_std"] = results["kid"] * 1000, results["kid_std"] * 1000  # toy-sized KIDs
    pq.write_table(pa.Table.from_pandas(results, schema=RESULTS_SCHEMA, preserve_index=False),
                   run_dir / "results.parquet")
    report = write_report(run_dir)
    parsed = parse(report)
    assert parsed.leaderboard_rows[1][2][1] == "30.00 ± 4.00"  # not 30000.00 ± 4000.00
    html_text = report.read_text(encoding="utf-8")
    assert "<th>KID (toy)</th>" in html_text and "<th>KID ×10³</th>" not in html_text
    assert "reads on the scale of Inception KID ×10³" in html_text


def test_a_noise_floor_whose_interval_says_nothing_is_left_out_and_said_so(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"pixel-art": ["base", "styleboost", "noise-floor"],
                                           "watercolor": ["base", "styleboost", "noise-floor"]})
    results = pq.read_table(run_dir / "results.parquet").to_pandas()
    wide = (results["style"] == "pixel-art") & (results["method"] == "noise-floor")
    results.loc[wide, ["kid_ci_low", "kid_ci_high"]] = (-0.1, 0.041)  # 141 wide against a base at 50
    pq.write_table(pa.Table.from_pandas(results, schema=RESULTS_SCHEMA, preserve_index=False),
                   run_dir / "results.parquet")
    report = write_report(run_dir)
    rows = parse(report).leaderboard_rows
    assert [(row[0][1], row[1][1]) for row in rows if row[1][1] == "noise-floor"] == [("watercolor", "noise-floor")]
    assert "pixel-art (2 against 1 images, interval [-100.0, 41.0])" in report.read_text(encoding="utf-8")


def test_models_of_one_method_are_labelled_apart_and_optional_metrics_show_when_scored(tmp_path):
    """Training seeds of one method get their own leaderboard and grid labels; CSD appears once a row has it."""
    results = pd.DataFrame({"method": ["base", "styleboost", "styleboost"], "train_seed": [None, 1337, 1338],
                            "step": [None, 4, 4], "sweep.learning_rate": [None, 1e-4, 1e-4]})
    assert list(model_labels(results)) == ["base", "styleboost seed=1337", "styleboost seed=1338"]
    results["kid"], results["inception_backbone"] = 0.01, "inception-2015-12-05"
    results["style_sim_csd"] = math.nan
    assert "style_sim_csd" not in [m.column for m in display_metrics(results)]
    results.loc[1, "style_sim_csd"] = 0.4
    assert [m.label for m in display_metrics(results)][-1] == "CSD style sim."


def test_a_controlled_set_shows_its_structure_map_and_edge_alignment(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"watercolor": ["base", "stylealigned"]})
    table = pq.read_table(run_dir / "results.parquet").to_pandas()
    table["edge_alignment"] = [math.nan, 0.8]
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), run_dir / "results.parquet")
    write_png(run_dir / "models" / "watercolor" / "stylealigned" / CONTROL_MAP, (0, 0, 0))
    parsed = parse(write_report(run_dir))
    assert "models/watercolor/stylealigned/control.png" in parsed.img_srcs
    assert "Edge align." in parsed.text and "Structure maps" in parsed.text
    assert [cell for _, cell in parsed.leaderboard_rows[1]].count("0.800") == 1  # the controlled row's value
    assert "0.800" not in [cell for _, cell in parsed.leaderboard_rows[0]]


def test_the_learning_table_has_a_row_per_model_of_one_method(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", {"watercolor": ["base", "styleboost", "styleboost"]})
    results = pq.read_table(run_dir / "results.parquet").to_pandas()
    results["train_seed"] = [None, 1337, 1338]
    results[["kid_vs_base", "kid_vs_base_ci_low", "kid_vs_base_ci_high"]] = [[math.nan] * 3, [-0.02, -0.03, -0.01],
                                                                            [0.01, 0.005, 0.015]]
    pq.write_table(pa.Table.from_pandas(results, preserve_index=False), run_dir / "results.parquet")
    rows = parse(write_report(run_dir)).table_rows["learning"]
    assert [row[0][1] for row in rows] == ["styleboost seed=1337", "styleboost seed=1338"]
    assert [row[1][0] for row in rows] == ["num learned", "num worse"]
