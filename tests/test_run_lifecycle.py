"""A run's life: one run per folder at a time (its lock), and a Ctrl-C or a full disk that still reports, cleans up
and stops Ray.

Every run is the real `python -m jobs.<job>` in a process of its own, in one chain that one fixture runs: the same
command fails on a full disk, runs again once the disk has room, is refused a second time beside itself, and is
stopped with a Ctrl-C in training; a lone `jobs.curate` of the same styles runs beside the chain as the reference.
The results of a finished command are tested in tests/test_faults.py, on its rerun's folder.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from style_factory.files import _tmp_beside, read_json
from tests.helpers import REPO, make_style, opened

# Stopped by the Ctrl-C long before its last step; a checkpoint every 5 steps, so that one may be on its way.
TRAIN = {"max_steps": 400, "checkpoint_every": 5}
EVALUATE = {"prompts": ["a red circle on a blue background", "a yellow star above a green square"],
            "seeds": [0], "num_inference_steps": 2}
TIMEOUT = 600  # seconds, for any one job: a hang guard, far above a tiny run beside the other tests (`make test -n 2`)


def write_config(root: Path, name: str, results_dir: Path) -> Path:
    config = {"name": name, "styles_dir": str(root / "styles"), "results_dir": str(results_dir), "baselines": [],
              "local_cpus": 1, "train": TRAIN, "evaluate": EVALUATE}  # one style: nothing to run side by side
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Job:
    """`python -m jobs.<job> --config CONFIG` in a session of its own (so that a signal reaches it as a terminal's
    Ctrl-C would), its output in a log; every process it starts is remembered, to check that none outlives it."""

    def __init__(self, config: Path, log: Path, job: str = "all_styles"):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
        self.log = log
        with log.open("w") as out:
            # SIGINT as a terminal leaves it, also under a pytest started in the background (which ignores it)
            self.process = subprocess.Popen([sys.executable, "-m", f"jobs.{job}", "--config", str(config)], cwd=REPO,
                                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started = time.monotonic()
        self.descendants: dict[int, psutil.Process] = {}

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition) -> bool:
        """Poll until condition() holds (True) or the job has ended (False)."""
        while self.process.poll() is None:
            try:
                self.descendants.update({p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)})
            except psutil.Error:  # the driver exited meanwhile
                pass
            if condition():
                return True
            if time.monotonic() - self.started > TIMEOUT:
                for process in [psutil.Process(self.process.pid), *self.descendants.values()]:
                    try:
                        process.kill()
                    except psutil.Error:
                        pass
                pytest.fail(f"{self.process.args} ran over {TIMEOUT} s; log: {self.log}")
            time.sleep(0.05)
        return False

    def wait(self) -> int:
        self.wait_until(lambda: False)
        return self.process.returncode

    def ray_processes_left(self) -> list[str]:
        """Processes of this job's Ray still running once it has exited: those it started, and any other that
        names its Ray session folder (one a raylet started after the last poll)."""
        match = re.search(r"worker logs in (\S+)/logs", self.output)
        session = match.group(1) if match else None
        _, alive = psutil.wait_procs(list(self.descendants.values()), timeout=1)
        found = {p.pid: p for p in alive}
        for process in psutil.process_iter(["cmdline"]):
            if session and session in " ".join(process.info["cmdline"] or []):
                found[process.pid] = process
        left = []
        for pid, process in found.items():
            try:
                left.append(f"{pid}: {' '.join(process.cmdline())[:120]}")
            except psutil.Error:  # it exited meanwhile
                continue
        return left


def holder(run_dir: Path) -> dict | None:
    """The holder recorded in the run folder's lock file; None when it names none."""
    return read_json(run_dir / ".lock")


def curated(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "curated" / "ink.parquet")


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and hidden folders under the run folder, but the lock, Ray Train's storage marker and
    generation's `.partial-<key>` folders (kept on purpose: a rerun goes on from them)."""
    kept = re.compile(r"\.lock|\.validate_storage_marker|\..+\.partial-[0-9a-f]{16}")
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if ".tmp" in p.name or (p.name.startswith(".") and not kept.fullmatch(p.name)))


# ---------------------------------------------------------------------------------------------
# The chain of runs
# ---------------------------------------------------------------------------------------------

def training(job: Job) -> bool:
    """Steps trained, in the progress view's plain lines, as the person at the terminal sees them."""
    return any(int(steps) > 0 for steps in re.findall(r"\[progress\] train: (\d+)/400", job.output))


def the_same_command_three_times(root: Path) -> dict:
    """results_dir on a 32 KiB tmpfs: the lock's record, config.json and the curation report fit, the curated
    Parquet does not (`full`). Then the tmpfs grows and the same command runs again (`first`); once it holds the
    lock, the same command is started a second time beside it (`second`); once `first` trains, SIGINT to its
    process group (as a terminal's Ctrl-C). Meanwhile `lone`, the reference, curates the same styles on a folder of
    its own. What the tests read of the tmpfs is read here, before it goes.

    Without a tmpfs (not root), `full` is left out and the rest runs on a plain folder."""
    disk = root / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    config, run_dir = write_config(root, "run", disk), disk / "run"
    lone = Job(write_config(root, "lone", root / "results-lone"), root / "lone.log", job="curate")
    result = {"run_dir": run_dir, "no_tmpfs": mounted.stderr.strip() if mounted.returncode else None}
    try:
        if not mounted.returncode:
            full = Job(config, root / "full.log")
            result["full"] = {"code": full.wait(), "output": full.output, "leftovers": leftovers(run_dir),
                              "summary": read_json(run_dir / "summary.json"), "ray_left": full.ray_processes_left()}
            subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)  # room for a few checkpoints
        first = Job(config, root / "first.log")
        assert first.wait_until(lambda: (holder(run_dir) or {}).get("pid") == first.process.pid), first.output[-3000:]
        config_written = (run_dir / "config.json").stat().st_mtime_ns
        second = Job(config, root / "second.log")
        result["second"] = {"code": second.wait(), "output": second.output,
                            "seconds": time.monotonic() - second.started, "holder_pid": first.process.pid,
                            "holder_still_running": first.process.poll() is None, "lock_after": holder(run_dir),
                            "config_untouched": (run_dir / "config.json").stat().st_mtime_ns == config_written}
        assert first.wait_until(lambda: training(first)), first.output[-3000:]
        os.killpg(first.process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        result["first"] = {"code": first.wait(), "output": first.output, "seconds": time.monotonic() - interrupted,
                           "ray_left": first.ray_processes_left(), "summary": read_json(run_dir / "summary.json"),
                           "leftovers": leftovers(run_dir), "lock": (run_dir / ".lock").read_text(),
                           "curated": curated(run_dir)}
        result["lone"] = {"code": lone.wait(), "output": lone.output}
        if result["lone"]["code"] == 0:
            result["lone"]["curated"] = curated(root / "results-lone" / "lone")
        return result
    finally:
        lone.wait()
        if not mounted.returncode:
            subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle")
    make_style(root / "styles", "ink", "zwx")
    return root


@pytest.fixture(scope="module")
def runs(root) -> dict:
    return the_same_command_three_times(root)


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

def test_a_dead_runs_lock_is_taken_over_with_a_message(root, capsys):
    """A lock file that names a process that has exited, its flock long gone with it."""
    config = write_config(root, "stale", root / "results-stale")
    run_dir = root / "results-stale" / "stale"
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir.mkdir(parents=True)
    record = {"host": socket.gethostname(), "pid": dead.pid, "since": "2026-01-01T00:00:00+00:00",
              "command": "python -m jobs.train"}
    (run_dir / ".lock").write_text(json.dumps(record))
    capsys.readouterr()
    run = opened(config)
    try:
        out = capsys.readouterr().out
        assert (f"[run] taking over the lock of pid {dead.pid} on host {socket.gethostname()}, since "
                "2026-01-01T00:00:00+00:00: python -m jobs.train (no longer running)") in out
        assert holder(run_dir)["pid"] == os.getpid()
    finally:
        run.release()
    assert holder(run_dir) is None  # its record cleared: the next run has nothing to take over


def test_a_run_starts_by_removing_what_interrupted_writes_left(root, capsys):
    """What a run killed halfway through its writes leaves, made by the writers' own first steps; and what a rerun
    goes on from, which stays."""
    config = write_config(root, "leftovers", root / "results-leftovers")
    run_dir = root / "results-leftovers" / "leftovers"
    _tmp_beside(run_dir / "curated" / "ink.parquet")  # write_parquet_atomic's file, killed before its rename
    (run_dir / "models" / "ink").mkdir(parents=True)
    export = Path(tempfile.mkdtemp(dir=run_dir / "models" / "ink", prefix=".styleboost."))  # export's model folder
    (export / "model_index.json").write_text("{}")
    partial = run_dir / "samples" / "ink" / f".base.partial-{'0' * 16}"  # generation's, kept for the rerun
    partial.mkdir(parents=True)
    (partial / "p000_s0.png").write_bytes(b"a finished sample")
    (partial / "p001_s0.tmp.png").write_bytes(b"half a sample")
    capsys.readouterr()
    opened(config).release()
    out = capsys.readouterr().out
    assert f"[run] removed 3 temporary file(s) and folder(s) of interrupted writes under {run_dir}" in out
    assert leftovers(run_dir) == []
    assert [p.name for p in partial.iterdir()] == ["p000_s0.png"]


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_a_second_run_on_the_same_folder_refuses_at_once_naming_the_holder(runs):
    second = runs["second"]
    assert second["code"] == 2, second["output"][-3000:]
    assert second["holder_still_running"]
    message = second["output"]
    assert f"pid {second['holder_pid']} on host {socket.gethostname()}, since " in message
    assert "-m jobs.all_styles --config" in message  # the holder's command
    assert "Wait for it to finish, or stop that run" in message and "just rerun" in message
    assert "[ray]" not in message  # refused before starting anything
    print(f"second run refused {second['seconds']:.1f} s after it started")


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_the_first_run_is_undisturbed_and_curates_as_a_lone_run(runs):
    """Also the rerun after the full disk below: it goes on from what the failed run left, curates what a lone run
    curates (the stage the full disk stopped), and trains."""
    second, first, lone = runs["second"], runs["first"], runs["lone"]
    assert second["lock_after"]["pid"] == second["holder_pid"] and second["config_untouched"]
    assert lone["code"] == 0, lone["output"][-3000:]
    pd.testing.assert_frame_equal(first["curated"], lone["curated"])
    assert "taking over" not in first["output"]  # the failed run gave its lock back
    assert "[ray] local instance started, 1 CPU;" in first["output"]  # the config's local_cpus


# ---------------------------------------------------------------------------------------------
# Ctrl-C and a full disk
# ---------------------------------------------------------------------------------------------

@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_ctrl_c_reports_cleans_up_and_stops_ray(runs):
    first = runs["first"]
    output = first["output"]
    assert first["code"] == 130, output[-3000:]
    assert "Traceback" not in output
    assert "[run] interrupted (Ctrl-C) during train" in output
    assert first["summary"] == {"ink": {"curate": "ok", "train": "interrupted (Ctrl-C)"}}  # the full disk's replaced
    assert first["leftovers"] == []
    assert first["ray_left"] == []
    assert first["lock"] == ""  # given back on exit, its holder cleared
    print(f"exited {first['seconds']:.1f} s after the Ctrl-C")


@pytest.mark.ray  # runs jobs in subprocesses, each with its own Ray
def test_a_full_disk_names_the_path_and_the_free_space_and_cleans_up(runs):
    if runs["no_tmpfs"] is not None:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {runs['no_tmpfs']}")
    full, run_dir = runs["full"], runs["run_dir"]
    output = full["output"]
    assert full["code"] == 1, output[-3000:]
    assert "Traceback" not in output
    message = re.search(rf"disk full: {re.escape(str(run_dir / 'curated' / 'ink.parquet'))}: [\d.]+ KiB free",
                        output)
    assert message, output[-3000:]
    assert f"[run] {message.group(0)} during curate" in output
    assert full["summary"] == {"ink": {"curate": message.group(0)}}
    assert full["leftovers"] == []
    assert full["ray_left"] == []


def test_a_local_ray_that_misses_its_start_up_deadline_is_started_once_more(monkeypatch, capsys):
    import ray

    from style_factory.run import start_local_ray

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "context"

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    assert start_local_ray({"A": "1"}) == "context"
    assert calls[1] == "shutdown" and calls[2]["runtime_env"] == {"env_vars": {"A": "1"}}
    assert "starting it again" in capsys.readouterr().out
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ValueError("another problem")))
    with pytest.raises(ValueError, match="another problem"):
        start_local_ray({})
