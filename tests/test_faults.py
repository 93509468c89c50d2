"""Nothing lost, nothing crashes: a killed worker, an interrupted job, half-written files, failing styles, OOM.

The interrupted job runs `python -m jobs.all_styles` twice; the killed worker runs the real curate_styles,
plan_training and train_all on the session's Ray. Both judge resumption from what Ray Train keeps in
`<run>/ray_train/<trainer>/checkpoint_manager_snapshot.json`:
`current_report_index` counts every checkpoint ever registered for the trainer, across restarts and reruns,
so it equals max_steps / checkpoint_every only if no checkpoint step was trained (and reported) twice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from style_factory.curate import curate_styles
from style_factory.report import write_report
from style_factory.train import explain, plan_training, train_all
from style_factory.train_job import TrainJob
from tests.helpers import REPO, make_style, opened
from tests.test_report import make_run

EVALUATE = {"prompts": ["a red circle on a blue background", "a yellow star above a green square"],
            "seeds": [0], "num_inference_steps": 2}


def write_config(root: Path, name: str, train: dict) -> Path:
    config = {"name": name, "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
              "baselines": [], "train": train, "evaluate": EVALUATE}  # the faults are in training
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trainer_dir(run_dir: Path, style: str) -> Path:
    """The Ray Train storage folder of a style's (only) trainer: <run>/ray_train/<style>-<method>-<key>."""
    found = sorted((run_dir / "ray_train").glob(f"{style}-styleboost-*"))
    assert len(found) == 1, found
    return found[0]


def checkpoint_snapshot(run_dir: Path, style: str) -> dict | None:
    """Ray Train's record of a trainer's registered checkpoints; None until the first one."""
    try:
        path = next((run_dir / "ray_train").glob(f"{style}-styleboost-*/checkpoint_manager_snapshot.json"))
        return json.loads(path.read_text())
    except (StopIteration, FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None


def latest_checkpoint_step(run_dir: Path, style: str) -> int | None:
    snapshot = checkpoint_snapshot(run_dir, style)
    latest = snapshot and snapshot["latest_checkpoint_result"]
    return latest["metrics"]["step"] if latest else None


def train_workers(root_pid: int) -> dict[str, set[int]]:
    """{trainer name: pids of its RayTrainWorker processes} among root_pid's descendants.

    Ray Train runs each worker in <ray session>/artifacts/<trainer name>, so its working directory names its run.
    """
    workers = defaultdict(set)
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers[Path(process.cwd()).name].add(process.pid)
        except psutil.Error:  # it exited meanwhile
            continue
    return workers


def loss_log(run_dir: Path, style: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / style / "styleboost" / "train_log.jsonl").read_text()
            .splitlines()]


def model_card(run_dir: Path, style: str) -> dict:
    return json.loads((run_dir / "models" / style / "styleboost" / "model_card.json").read_text())


# ---------------------------------------------------------------------------------------------
# The whole job killed (driver and local Ray) mid-training, then rerun; two of its styles fail
# ---------------------------------------------------------------------------------------------

def run_job(command: list[str], log: Path, stop_when=None, timeout: float = 600):
    """Run a job in its own process group; SIGKILL the group as soon as stop_when() returns a value.

    Returns (exit code, stop_when's value, the job's processes still alive 30 s after it ended). Ray's workers
    run in process groups of their own and should exit once their raylet is gone; any that do not are killed.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not this session's
    with log.open("a") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    started: dict[int, psutil.Process] = {}
    stopped, deadline, timed_out = None, time.monotonic() + timeout, False
    while job.poll() is None:
        try:
            started.update({p.pid: p for p in psutil.Process(job.pid).children(recursive=True)})
        except psutil.Error:  # the driver exited meanwhile
            pass
        if stop_when is not None and stopped is None:
            stopped = stop_when()
            if stopped is not None:
                os.killpg(job.pid, signal.SIGKILL)
        if not timed_out and time.monotonic() > deadline:
            timed_out = True
            os.killpg(job.pid, signal.SIGKILL)
        time.sleep(0.05)
    _, alive = psutil.wait_procs(list(started.values()), timeout=30)
    for process in alive:
        process.kill()
    if timed_out:
        pytest.fail(f"{' '.join(command)} ran over {timeout} s; log: {log}")
    return job.returncode, stopped, alive


@pytest.fixture(scope="module")
def interrupted_then_rerun(tmp_path_factory):
    """`python -m jobs.all_styles` killed once quick is trained and slow has a checkpoint, then run again.

    no-aux fails its method's data check (no prior images); too-few fails curation (2 StyleRef images).
    """
    root = tmp_path_factory.mktemp("interrupted")
    make_style(root / "styles", "quick", "zwx", train={"max_steps": 2, "checkpoint_every": 2})
    make_style(root / "styles", "slow", "ukj", seed=1, train={"max_steps": 120, "checkpoint_every": 10})
    make_style(root / "styles", "no-aux", "qpv", seed=2, n_aux=0)
    make_style(root / "styles", "too-few", "ykr", seed=3, n_ref=2)
    config = write_config(root, "interrupted", train={"max_steps": 2})
    run_dir, log = root / "results" / "interrupted", root / "job.log"
    command = [sys.executable, "-m", "jobs.all_styles", "--config", str(config)]
    quick_model = run_dir / "models" / "quick" / "styleboost" / "unet" / "diffusion_pytorch_model.safetensors"

    def quick_done_and_slow_checkpointed() -> int | None:
        return latest_checkpoint_step(run_dir, "slow") if quick_model.is_file() else None

    code, interrupted_at, _ = run_job(command, log, stop_when=quick_done_and_slow_checkpointed)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (run_dir / "summary.json").exists()  # the job never got to the end
    first = {"interrupted_at": interrupted_at, "quick_model_written": quick_model.stat().st_mtime_ns}
    code, _, stray = run_job(command, log)
    return run_dir, first, code, stray, log


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_rerun_reuses_what_the_interrupted_run_finished(interrupted_then_rerun):
    run_dir, first, _, _, _ = interrupted_then_rerun
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quick"] == {"curate": "reused", "train:styleboost": "reused",
                                "evaluate:base": "ok", "evaluate:styleboost": "ok"}
    quick_model = run_dir / "models" / "quick" / "styleboost" / "unet" / "diffusion_pytorch_model.safetensors"
    assert quick_model.stat().st_mtime_ns == first["quick_model_written"]  # not retrained


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_interrupted_style_resumes_from_its_last_checkpoint(interrupted_then_rerun):
    run_dir, first, _, _, _ = interrupted_then_rerun
    assert 10 <= first["interrupted_at"] < 120  # long enough that the kill always lands mid-training
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["slow"] == {"curate": "reused", "train:styleboost": "ok",
                               "evaluate:base": "ok", "evaluate:styleboost": "ok"}
    assert model_card(run_dir, "slow")["steps"] == 120
    assert [entry["step"] for entry in loss_log(run_dir, "slow")] == list(range(1, 121))
    # Checkpoints 10, 20, ..., 120, each registered once over both runs: the rerun started after the step
    # of its last checkpoint, not at 0.
    assert checkpoint_snapshot(run_dir, "slow")["current_report_index"] == 120 // 10


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_failing_styles_are_named_with_the_reason_and_the_others_finish(interrupted_then_rerun):
    run_dir, _, exit_code, _, log = interrupted_then_rerun
    assert exit_code == 1, log.read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "only 2 usable StyleRef image(s)" in summary["too-few"]["curate"]
    assert set(summary["too-few"]) == {"curate"}  # later stages skip a failed style
    assert summary["no-aux"]["curate"] in ("ok", "reused")
    assert "concept 0 has no Aux images" in summary["no-aux"]["train:styleboost"]
    assert "prior_loss_weight: 0" in summary["no-aux"]["train:styleboost"]  # what to do about it
    assert "2 style(s) failed: no-aux, too-few" in log.read_text()
    results = pd.read_parquet(run_dir / "results.parquet")
    results = results[results.method != "noise-floor"]  # the StyleRef split-half rows are tested in test_e2e
    assert sorted(zip(results["style"], results["method"])) == [
        ("quick", "base"), ("quick", "styleboost"), ("slow", "base"), ("slow", "styleboost")]
    assert (run_dir / "report.html").is_file()


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_no_ray_process_outlives_the_job(interrupted_then_rerun):
    *_, stray, _ = interrupted_then_rerun
    assert not stray, f"still running 30 s after the job ended: {stray}"


# ---------------------------------------------------------------------------------------------
# A worker killed mid-training, next to a style that trains undisturbed
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_with_a_killed_worker(ray_session, tmp_path_factory):
    """alpha and beta train side by side in one train_all; alpha's worker is SIGKILLed after a checkpoint."""
    root = tmp_path_factory.mktemp("killed-worker")
    make_style(root / "styles", "alpha", "zwx")
    make_style(root / "styles", "beta", "ukj", seed=1)
    config = write_config(root, "killed-worker", train={"max_steps": 60, "checkpoint_every": 10, "max_failures": 2})
    run = opened(config)
    curate_styles(run)

    seen: dict[str, set[int]] = defaultdict(set)  # trainer name -> every worker pid it ever had
    killed = None  # (pid, alpha's latest checkpoint step when it was killed)
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(train_all, plan_training(run))
        deadline = time.monotonic() + 240
        while not training.done() and time.monotonic() < deadline:
            for name, pids in train_workers(os.getpid()).items():
                seen[name] |= pids
            step = latest_checkpoint_step(run.dir, "alpha")
            if killed is None and step is not None and step < 60:
                alpha_workers = seen[trainer_dir(run.dir, "alpha").name]
                if alpha_workers:
                    [pid] = alpha_workers
                    os.kill(pid, signal.SIGKILL)
                    killed = (pid, step)
            time.sleep(0.05)
        outcomes = training.result(timeout=max(0.0, deadline - time.monotonic()))
    return run.dir, outcomes, killed, seen


def test_killed_worker_resumes_from_its_last_checkpoint(train_with_a_killed_worker):
    run_dir, outcomes, killed, seen = train_with_a_killed_worker
    assert killed is not None, "alpha finished before its worker could be killed"
    pid, step = killed
    assert not psutil.pid_exists(pid)
    alpha_workers = seen[trainer_dir(run_dir, "alpha").name]
    assert pid in alpha_workers and len(alpha_workers) >= 2  # Ray Train started a new worker
    assert outcomes[("alpha", "styleboost")]["status"] == "trained"
    assert model_card(run_dir, "alpha")["steps"] == 60
    assert [entry["step"] for entry in loss_log(run_dir, "alpha")] == list(range(1, 61))
    # Every checkpoint step (10, ..., 60) registered once: the new worker resumed at `step`, not at 0.
    assert checkpoint_snapshot(run_dir, "alpha")["current_report_index"] == 60 // 10


def test_other_style_trains_undisturbed(train_with_a_killed_worker):
    run_dir, outcomes, _, seen = train_with_a_killed_worker
    assert len(seen[trainer_dir(run_dir, "beta").name]) == 1  # one worker throughout: never restarted
    assert outcomes[("beta", "styleboost")]["status"] == "trained"
    assert model_card(run_dir, "beta")["steps"] == 60
    assert [entry["step"] for entry in loss_log(run_dir, "beta")] == list(range(1, 61))
    assert checkpoint_snapshot(run_dir, "beta")["current_report_index"] == 60 // 10


# ---------------------------------------------------------------------------------------------
# Out of GPU memory
# ---------------------------------------------------------------------------------------------

def oom_job() -> TrainJob:
    return TrainJob(style="watercolor", method="styleboost", family="sd1", key="0" * 64, base_model="tiny",
                    curated_path="", model_dir="", log_path="", storage_path="", style_config={}, train={})


def test_out_of_memory_names_the_style_and_the_settings_to_lower():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")
    message = explain(str(error), oom_job())
    assert message.startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "'watercolor'" in message and "train.batch_size" in message and "train.mixed_precision: bf16" in message


def test_out_of_memory_in_a_train_worker_reaches_the_driver_with_the_advice(ray_session, tmp_path):
    """A run that fails as a whole: the error travels worker -> Ray Train controller -> a fit_group-like task
    -> driver, where train_all explains its last line."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def run_out_of_memory(config: dict) -> None:  # what a too-large batch does to the loop on a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")

    @ray.remote(num_cpus=0)
    def fit(storage: str) -> None:
        TorchTrainer(run_out_of_memory, scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name="oom", storage_path=storage,
                                          failure_config=FailureConfig(max_failures=0))).fit()

    with pytest.raises(Exception) as caught:
        ray.get(fit.remote(str(tmp_path)))
    message = explain(str(caught.value).strip().splitlines()[-1], oom_job())
    assert "CUDA out of memory" in message and "'watercolor'" in message and "train.batch_size" in message


# ---------------------------------------------------------------------------------------------
# Nothing half-written
# ---------------------------------------------------------------------------------------------

def test_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "run", {"ink": ["base", "styleboost"]})
    write_report(run_dir)
    files = [run_dir / "report.html", *sorted((run_dir / "report_assets").iterdir())]
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}

    def crash(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("style_factory.report.plot_loss_curves", crash)  # fails after the first two plots
    with pytest.raises(OSError):
        write_report(run_dir)
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files} == before
    assert sorted((run_dir / "report_assets").iterdir()) == files[1:]
