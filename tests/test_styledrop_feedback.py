"""StyleDrop's human feedback (feedback: human): the names a person lists are round 2's data, exactly; a name that is
not a candidate fails at config load (its form) or before round 2 trains (once round 1 has drawn the candidates)."""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from style_factory.config import ConfigError, RunConfig, TrainConfig, load_run_config, load_styles
from style_factory.export import load_method
from style_factory.report import write_report
from style_factory.run import REGISTRY, Run
from style_factory.train import plan_training
from style_factory.train_job import MODEL_CARD
from tests.helpers import make_style
from tests.test_report import make_run, write_png
from tests.test_styledrop import CAPTIONS, STYLE
from tests.test_textboost import make_job, train_in_process

OPTIONS = {"feedback_candidates": 2, "feedback_inference_steps": 2, "clip": "toy"}


def write_config(folder: Path, styledrop: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"method_options": {"styledrop": styledrop}}}))
    return path


def test_feedback_file_and_clip_paths_are_read_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "picked.txt").write_text("# round 1 of watercolor\np000_s1.png\n\np002_s0.png\n")
    config = write_config(folder, {"feedback": "human", "feedback_file": "picked.txt", "clip": "ViT-B-32:clip.pt",
                                   **{k: v for k, v in OPTIONS.items() if k != "clip"}})
    monkeypatch.chdir(tmp_path)  # another current folder than the config's
    options = load_run_config(config, REGISTRY).train.method_options["styledrop"]
    assert options["feedback_images"] == ["p000_s1.png", "p002_s0.png"] and "feedback_file" not in options
    assert options["clip"] == f"ViT-B-32:{folder / 'clip.pt'}"


@pytest.mark.parametrize("styledrop, expected", [
    ({"feedback": "human", "feedback_images": ["house.png"]}, "'house.png' is not a round-1 candidate name"),
    ({"feedback": "human", "feedback_images": ["p000_s5.png"], "feedback_candidates": 2}, "'p000_s5.png' is not drawn"),
    ({"feedback": "human", "feedback_images": ["p000_s0.png", "p000_s0.png"]}, "more than once"),
    ({"feedback": "clip", "feedback_images": ["p000_s0.png"]}, "for feedback: human"),
    ({"feedback": "human", "feedback_file": "missing.txt"}, "cannot read"),
])
def test_a_bad_selection_fails_at_config_load_naming_the_file_and_the_name(tmp_path, styledrop, expected):
    config = write_config(tmp_path, styledrop)
    with pytest.raises(ConfigError, match="train.method_options.*styledrop") as err:
        load_run_config(config, REGISTRY)
    assert str(config) in str(err.value) and expected in str(err.value)


def test_a_name_in_a_feedback_file_is_checked_like_a_listed_one(tmp_path):
    (tmp_path / "picked.txt").write_text("p000_s0.png\nbest one.png\n")
    with pytest.raises(ConfigError, match=r"picked.txt.*'best one.png' is not a round-1 candidate name"):
        load_run_config(write_config(tmp_path, {"feedback": "human", "feedback_file": "picked.txt"}), REGISTRY)


def test_the_selection_keys_round_two_but_not_round_one(tmp_path):
    """Round 1 and its candidates are keyed without the selection: the rerun with the names reuses them."""
    make_style(tmp_path / "styles", "alpha", "zwx")

    def job(**chosen):
        config = RunConfig(styles_dir=str(tmp_path / "styles"), results_dir=str(tmp_path / "results"),
                           model={"base": "tiny"}, methods=["styledrop"], baselines=[],
                           train={"method_options": {"styledrop": {**OPTIONS, **chosen}}})
        [planned] = plan_training(Run(config=config, styles=load_styles(config, REGISTRY)))
        return planned

    jobs = [job(), job(feedback="human"), job(feedback="human", feedback_images=["p000_s1.png"]),
            job(feedback="human", feedback_images=["p000_s0.png"]), job(feedback_candidates=3)]
    assert len({j.key for j in jobs}) == len(jobs)  # each selection is its own round 2
    assert len({j.first_round_key for j in jobs[:4]}) == 1 and jobs[4].first_round_key != jobs[0].first_round_key


@pytest.mark.slow
def test_round_two_trains_on_exactly_the_listed_candidates(tmp_path, tiny_model):
    chosen = ["p002_s1.png", "p000_s0.png", "p001_s1.png"]
    train = {"batch_size": 2, "learning_rate": 1e-2, "max_steps": 1,
             "method_options": {"styledrop": {**OPTIONS, "feedback": "human", "feedback_images": chosen}}}
    job = make_job(tmp_path, tiny_model, "styledrop", STYLE, train, CAPTIONS)
    rounds = load_method(job).rounds(job)
    first = next(rounds)
    train_in_process(first, steps=1, export=True)
    second = next(rounds)
    candidates = Path(first.model_dir) / "feedback" / "candidates"
    rows = pq.read_table(second.curated_path).to_pylist()
    assert [r["image"] for r in rows] == [(candidates / name).read_bytes() for name in chosen]
    assert [r["caption"] for r in rows] == [CAPTIONS[2], CAPTIONS[0], CAPTIONS[1]]  # each its prompt's content
    data = second.load_data()  # what round 2's loop trains on
    listed = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    np.testing.assert_array_equal(np.stack(data.images), listed)
    train_in_process(second, steps=1, export=True)
    card = json.loads((Path(second.model_dir) / MODEL_CARD).read_text())  # the choice, in the model card
    assert card["train"]["method_options"]["styledrop"]["feedback_images"] == chosen

    # a name round 1 did not draw (a prompt past the captions), and no names at all: stopped before round 2
    for names, expected in ((["p000_s0.png", "p007_s1.png"], r"\['p007_s1.png'\] of style 'water' are not round-1"),
                            (None, "no images chosen for round 2")):
        options = {**OPTIONS, "feedback": "human", "feedback_images": names}
        again = replace(job, train=TrainConfig(**{**train, "method_options": {"styledrop": options}}).model_dump())
        rounds = load_method(again).rounds(again)
        assert next(rounds).is_done()  # round 1 is keyed without the selection: reused
        with pytest.raises(ValueError, match=expected) as err:
            next(rounds)
        assert str(candidates) in str(err.value)


def test_the_report_shows_each_round_one_candidate_with_its_name(tmp_path):
    run_dir = make_run(tmp_path / "run", {"watercolor": ["base", "styledrop"]})
    candidates = run_dir / "models" / "watercolor" / "styledrop-round1" / "feedback" / "candidates"
    for name in ("p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"):
        write_png(candidates / name, (10, 20, 30))
    (candidates / "samples.json").write_text(json.dumps({"prompts": ["a cat in ink style", "a ship in ink style"],
                                                         "seeds": [0, 1]}))
    (candidates.parent / "selection.json").write_text(json.dumps({"feedback": "human", "images": ["p001_s0.png"]}))
    page = write_report(run_dir).read_text(encoding="utf-8")
    grid = page.split("StyleDrop round-1 candidates")[1].split("</table>")[0]
    rows = grid.split("<tr>")[1:]
    assert [row.count("<img") for row in rows] == [2, 2] and "a ship in ink style" in rows[1]
    for name in ("p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"):
        assert f"<code>{name}</code>" in grid and (candidates / name).is_file()
        assert f'src="models/watercolor/styledrop-round1/feedback/candidates/{name}"' in grid
    outlined = [cell for cell in grid.split("<td")[1:] if "outline" in cell.split(">")[0]]
    assert len(outlined) == 1 and "p001_s0.png" in outlined[0]
