"""The prepared GPU check (`python -m bench.gpu`): its dry run exercises the GPU run's code on CPU at tiny shapes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import gpu
from tests.helpers import REPO

EAGER = ["tiny-sd1-64px full eager", "tiny-sdxl-64px full eager", "tiny-sd1-64px lora eager",
         "tiny-sdxl-64px lora eager"]


@pytest.mark.ray
@pytest.mark.slow
def test_dry_run_measures_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    # a budget that a loaded machine does not spend: every part must run
    subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--peak-tflops", "0.5", "--budget-s", "1800",
                    "--out", str(out)], cwd=REPO, check=True, timeout=1800)
    results = json.loads(out.read_text())
    assert results["dry_run"] and results["git_commit"] != "unknown" and results["diffusers"]
    assert results["peak_bf16_tflops"] == 0.5

    training = {t["what"]: t for t in results["training"]}
    assert sorted(training) == sorted(EAGER)
    for t in training.values():
        assert "error" not in t, t
        assert t["step_tflop_per_image"] > 0 and t["trained_parameters"] > 0
        assert [row["batch"] for row in t["batches"]] == list(gpu.DRY_PLAN.batches)
        for row in t["batches"]:
            for loop in ("ours", "reference"):
                assert row[loop]["images_per_s"] > 0 and row[loop]["peak_memory_gb"] > 0, row
            assert row["ratio"] > 0 and row["achieved_tflops"] > 0 and 0 < row["mfu"], row
    for shape in ("tiny-sd1-64px", "tiny-sdxl-64px"):  # a LoRA trains a small part of the full fine-tune's weights
        assert training[f"{shape} lora eager"]["trained_parameters"] < \
            training[f"{shape} full eager"]["trained_parameters"] / 5

    generation = {g["shape"]: g for g in results["generation"]}
    assert sorted(generation) == ["tiny-sd1-64px", "tiny-sdxl-64px"]
    for g in generation.values():
        assert [row["batch"] for row in g["batches"]] == list(gpu.DRY_PLAN.generation_batches)
        assert all(row["images_per_s"] > 0 for row in g["batches"]), g

    group = results["warm_group"]
    assert "error" not in group, group
    # the dry run trains the group beside the parts, on the Ray started in the background as the check began
    assert group["beside_parts"] and group["ray_start_s"] > 0 and group["group_wall_s"] > 0
    assert len(group["styles"]) == gpu.DRY_PLAN.group_styles and group["group_wall_over_compute"] > 0
    for style in group["styles"]:
        assert style["wall_s"] > 0 and style["compute_s"] > 0 and style["wall_over_compute"] > 0, style

    # the compiled configurations are the only ones left out, and the output says why
    assert {s["what"] for s in results["skipped"]} == {w for _, w, cost in gpu.parts(gpu.DRY_PLAN)
                                                       if cost == "compiled"}
    assert all("dry run" in s["reason"] for s in results["skipped"])


def test_a_spent_budget_skips_every_part_and_says_so(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    results, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert not (results["training"] or results["generation"] or results["warm_group"])
    assert len(results["skipped"]) == len(gpu.parts(gpu.DRY_PLAN))
    for part, what, _ in gpu.parts(gpu.DRY_PLAN):
        assert f"skipped: {part} {what}" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real check")
def test_without_cuda_the_gpu_check_says_so_and_exits_0(capsys):
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_an_out_of_memory_ends_the_batch_sweep_and_is_recorded():
    tried = []

    def step(batch: int) -> None:
        tried.append(batch)
        if batch >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    results = gpu.time_batches(step, (1, 4, 8, 16), gpu.DRY_PLAN, torch.device("cpu"), gpu.Budget(600))
    assert results[1]["images_per_s"] > 0
    assert results[4]["error"].startswith("out of memory")
    assert results[8]["error"] == results[16]["error"] == "not tried: batch 4 ran out of memory"
    assert max(tried) == 4
