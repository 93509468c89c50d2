"""Nothing lost, nothing crashes: a killed worker, an interrupted job, half-written files, failing styles, OOM.

One fixture runs `python -m jobs.all_styles` twice on four styles. In the first run slow's Ray Train worker is
SIGKILLed after slow's first checkpoint while quick trains beside it, and the whole job (driver and local Ray) once
quick is trained and slow's new worker has checkpointed; the second run finishes. Resumption is judged from what
Ray Train keeps in `<run>/ray_train/<trainer>/checkpoint_manager_snapshot.json`: `current_report_index` counts every
checkpoint ever registered for the trainer, across restarts and reruns, so it equals max_steps / checkpoint_every
only if no checkpoint step was trained (and reported) twice.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from style_factory.report import write_report
from style_factory.run import finish
from style_factory.train import explain
from style_factory.train_job import TrainJob
from tests.helpers import REPO, make_style, opened
from tests.test_report import make_run

EVALUATE = {"prompts": ["a red circle on a blue background", "a yellow star above a green square"],
            "seeds": [0], "num_inference_steps": 2}
QUICK_STEPS, QUICK_EVERY = 16, 4  # long enough to be training when slow's worker is killed at slow's first checkpoint
SLOW_STEPS, SLOW_EVERY = 16, 2  # the worker killed at step 2, the job at 4 or later (its new worker's first)


def write_config(root: Path, name: str, train: dict) -> Path:
    config = {"name": name, "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
              "baselines": [], "train": train, "evaluate": EVALUATE}  # the faults are in training
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trainer_dir(run_dir: Path, style: str) -> Path:
    """The Ray Train storage folder of the one trainer that trains a style: <run>/ray_train/<style>-<method>-<key>,
    `+<n>-<hash>` added when it trains n more styles after it."""
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


def model_file(run_dir: Path, style: str) -> Path:
    return run_dir / "models" / style / "styleboost" / "unet" / "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------
# A worker killed mid-training, then the whole job, then a rerun; two of its styles fail
# ---------------------------------------------------------------------------------------------

def run_job(command: list[str], log: Path, watch=None, timeout: float = 600):
    """Run a job in its own process group; SIGKILL the group as soon as watch(job's pid), called at every poll,
    returns a value.

    Returns (exit code, watch's value, the job's processes still alive 30 s after it ended). Ray's workers
    run in process groups of their own and should exit once their raylet is gone; any that do not are killed.
    A kill takes every process of the job seen so far with it, as when its machine goes down.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not this session's
    with log.open("a") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    started: dict[int, psutil.Process] = {}
    stopped, deadline, killed, timed_out = None, time.monotonic() + timeout, False, False
    while job.poll() is None:
        try:
            started.update({p.pid: p for p in psutil.Process(job.pid).children(recursive=True)})
            if watch is not None and stopped is None:
                stopped = watch(job.pid)
        except psutil.Error:  # the driver exited meanwhile
            pass
        except BaseException:  # a failing watcher: the job is not left running
            os.killpg(job.pid, signal.SIGKILL)
            raise
        if not killed and (stopped is not None or time.monotonic() > deadline):
            killed, timed_out = True, stopped is None
            os.killpg(job.pid, signal.SIGKILL)
            for process in started.values():  # Ray's workers too, at once: left alone, one trains on for seconds
                with contextlib.suppress(psutil.Error):
                    process.kill()
        time.sleep(0.05)
    _, alive = psutil.wait_procs(list(started.values()), timeout=30)
    for process in alive:
        process.kill()
    if timed_out:
        pytest.fail(f"{' '.join(command)} ran over {timeout} s; log: {log}")
    return job.returncode, stopped, alive


class Faults:
    """The first run's watcher: SIGKILL slow's worker at slow's first checkpoint, then stop the job (return the step
    of slow's latest checkpoint) once quick is trained and slow's new worker has checkpointed."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.seen: dict[str, set[int]] = defaultdict(set)  # trainer name -> every worker pid it ever had
        self.killed: tuple[int, int] | None = None  # (pid, slow's latest checkpoint step when it was killed)
        self.quick_training_at_kill: bool | None = None
        self.interrupted_at: int | None = None  # slow's latest checkpoint step when the job was killed

    def workers(self, style: str) -> set[int]:
        return set().union(*(pids for name, pids in self.seen.items() if name.startswith(f"{style}-styleboost-")))

    def __call__(self, job_pid: int) -> int | None:
        for name, pids in train_workers(job_pid).items():
            self.seen[name] |= pids
        step = latest_checkpoint_step(self.run_dir, "slow")
        if self.killed is None:
            if step is not None and step < SLOW_STEPS and self.workers("slow"):
                [pid] = self.workers("slow")
                os.kill(pid, signal.SIGKILL)
                self.killed = (pid, step)
                self.quick_training_at_kill = (bool(self.workers("quick"))
                                               and not model_file(self.run_dir, "quick").is_file())
            return None
        done = step is not None and step > self.killed[1] and model_file(self.run_dir, "quick").is_file()
        return step if done else None


@pytest.fixture(scope="module")
def faults_then_rerun(tmp_path_factory):
    """(run folder, config, the first run's Faults, quick's model's mtime then, the rerun's exit code, its processes
    left, the log of both runs). no-aux fails its method's data check (no prior images); too-few fails curation
    (2 StyleRef images). quick and slow train side by side: the 2 local CPUs give two trainers."""
    root = tmp_path_factory.mktemp("interrupted")
    make_style(root / "styles", "quick", "zwx", train={"max_steps": QUICK_STEPS, "checkpoint_every": QUICK_EVERY})
    make_style(root / "styles", "slow", "ukj", seed=1, train={"max_steps": SLOW_STEPS, "checkpoint_every": SLOW_EVERY})
    make_style(root / "styles", "no-aux", "qpv", seed=2, n_aux=0)
    make_style(root / "styles", "too-few", "ykr", seed=3, n_ref=2)
    config = write_config(root, "interrupted", train={"max_steps": 2, "max_failures": 2})
    run_dir, log = root / "results" / "interrupted", root / "job.log"
    command = [sys.executable, "-m", "jobs.all_styles", "--config", str(config)]
    faults = Faults(run_dir)
    code, faults.interrupted_at, _ = run_job(command, log, watch=faults)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (run_dir / "summary.json").exists()  # the job never got to the end
    assert not model_file(run_dir, "slow").exists(), "slow trained to the end before the kill: nothing to resume"
    quick_written = model_file(run_dir, "quick").stat().st_mtime_ns
    code, _, stray = run_job(command, log)
    return run_dir, config, faults, quick_written, code, stray, log


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_rerun_reuses_what_the_interrupted_run_finished(faults_then_rerun):
    run_dir, _, _, quick_written, *_ = faults_then_rerun
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quick"] == {"curate": "reused", "train:styleboost": "reused",
                                "evaluate:base": "ok", "evaluate:styleboost": "ok"}
    assert model_file(run_dir, "quick").stat().st_mtime_ns == quick_written  # not retrained


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_killed_worker_resumes_from_its_last_checkpoint(faults_then_rerun):
    run_dir, _, faults, *_ = faults_then_rerun
    assert faults.killed is not None, "slow finished before its worker could be killed"
    pid, step = faults.killed
    assert not psutil.pid_exists(pid)
    slow_workers = faults.seen[trainer_dir(run_dir, "slow").name]
    assert pid in slow_workers and len(slow_workers) >= 2  # Ray Train started a new worker
    assert faults.interrupted_at > step  # which trained on and checkpointed before the job was killed
    # Every checkpoint step registered once over the restart and both runs: the new worker resumed at `step`.
    assert checkpoint_snapshot(run_dir, "slow")["current_report_index"] == SLOW_STEPS // SLOW_EVERY


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_interrupted_style_resumes_from_its_last_checkpoint(faults_then_rerun):
    run_dir, _, faults, *_ = faults_then_rerun
    assert faults.interrupted_at < SLOW_STEPS  # the kill landed mid-training
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["slow"] == {"curate": "reused", "train:styleboost": "ok",
                               "evaluate:base": "ok", "evaluate:styleboost": "ok"}
    assert model_card(run_dir, "slow")["steps"] == SLOW_STEPS
    assert [entry["step"] for entry in loss_log(run_dir, "slow")] == list(range(1, SLOW_STEPS + 1))
    # The rerun started after the step of its last checkpoint, not at 0.
    assert checkpoint_snapshot(run_dir, "slow")["current_report_index"] == SLOW_STEPS // SLOW_EVERY


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_other_style_trains_undisturbed(faults_then_rerun):
    run_dir, _, faults, *_ = faults_then_rerun
    assert faults.quick_training_at_kill  # beside slow when its worker was killed
    assert len(faults.seen[trainer_dir(run_dir, "quick").name]) == 1  # one worker throughout: never restarted
    assert model_card(run_dir, "quick")["steps"] == QUICK_STEPS
    assert [entry["step"] for entry in loss_log(run_dir, "quick")] == list(range(1, QUICK_STEPS + 1))
    assert checkpoint_snapshot(run_dir, "quick")["current_report_index"] == QUICK_STEPS // QUICK_EVERY


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_failing_styles_are_named_with_the_reason_and_the_others_finish(faults_then_rerun):
    run_dir, _, _, _, exit_code, _, log = faults_then_rerun
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
def test_no_ray_process_outlives_the_job(faults_then_rerun):
    *_, stray, _ = faults_then_rerun
    assert not stray, f"still running 30 s after the job ended: {stray}"


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_results_of_an_earlier_command_are_not_shown_as_this_ones(faults_then_rerun, capsys):
    run_dir, config, *_, log = faults_then_rerun
    results, report = run_dir / "results.parquet", run_dir / "report.html"
    output = log.read_text()  # the rerun's: the first run never got to the end
    assert f"  results.parquet  {results}" in output and f"  report.html      {report}" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    run = opened(config)  # a command that writes neither
    try:
        capsys.readouterr()
        assert finish(run) == 0
    finally:
        run.release()
    out = capsys.readouterr().out
    assert f"results.parquet (from an earlier command)  {results}" in out
    assert f"report.html (from an earlier command)  {report}" in out
    assert json.loads((run_dir / "summary.json").read_text()) == summary  # the earlier command's, kept


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
