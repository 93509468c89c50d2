"""What the stages write gets the modes any file a user writes gets: 0666 / 0777 less the umask, not the owner-only
0600 / 0700 of tempfile's temporary files, which the rename into place would keep."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from style_factory.config import Concept, StyleConfig, TrainConfig
from style_factory.export import load_method, write_model
from style_factory.families import get_family
from style_factory.files import PACKAGE_DIR, write_json_atomic, write_parquet_atomic
from style_factory.lora import add_lora, save_lora
from style_factory.report import write_report
from style_factory.train_job import TrainJob
from tests.test_report import make_run  # its fake run folder, as the evaluate stage leaves one

STYLE = StyleConfig(display_name="Water", descriptor="watercolor", concepts=[Concept(token="zwx", class_word="style")])


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every path under `root`, with its permission bits."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in root.rglob("*")}


def expected(root: Path, umask: int) -> dict[str, int]:
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~umask for name in modes(root)}


def test_results_files_follow_the_umask(tmp_path, umask):
    run_dir = tmp_path / "results"
    write_parquet_atomic(pa.table({"kid": [0.1]}), run_dir / "run" / "results.parquet")  # and features.parquet
    write_json_atomic(run_dir / "run" / "summary.json", {"ok": True})  # and samples.json, model cards
    assert modes(run_dir) == expected(run_dir, umask)
    assert modes(run_dir)["run/results.parquet"] == 0o666 & ~umask and modes(run_dir)["run"] == 0o777 & ~umask


def test_a_model_folder_follows_the_umask(tmp_path, tiny_model, umask):
    family = get_family("sd1")
    models = family.load_components(tiny_model)
    add_lora(models.unet, 4, 4.0, ["to_q"])
    job = TrainJob(style="water", method="styledrop", family="sd1", key="k" * 64, base_model=tiny_model,
                   curated_path=str(tmp_path / "curated.parquet"), model_dir=str(tmp_path / "models" / "styledrop"),
                   log_path=str(tmp_path / "log.jsonl"), storage_path=str(tmp_path), style_config=STYLE.model_dump(),
                   train=TrainConfig().model_dump())
    write_model(job, load_method(job), lambda out: save_lora(out, family, unet=models.unet), steps=0, final_loss=None)
    folder = tmp_path / "models"
    assert modes(folder) == expected(folder, umask)
    assert modes(folder)["styledrop"] == 0o777 & ~umask and "styledrop/pytorch_lora_weights.safetensors" in modes(folder)


def test_the_report_follows_the_umask(tmp_path, umask):
    run_dir = make_run(tmp_path / "run", {"ink": ["base", "styleboost"]})
    write_report(run_dir)
    written = {name: mode for name, mode in modes(run_dir).items() if name.startswith(("report", "report_assets"))}
    assert written["report.html"] == 0o666 & ~umask and written["report_assets"] == 0o777 & ~umask
    assert written == {name: mode for name, mode in expected(run_dir, umask).items() if name in written}


def test_no_stage_makes_owner_only_temporary_files():
    """tempfile.mkstemp / mkdtemp make 0600 / 0700; the writers use style_factory/files.py's instead."""
    offenders = [str(path.relative_to(PACKAGE_DIR)) for path in PACKAGE_DIR.rglob("*.py")
                 if re.search(r"\b(mkstemp|mkdtemp)\(", path.read_text(encoding="utf-8"))]
    assert offenders == []
