"""A run: its folder layout and lock, Ray start-up, the command line shared by every job, and the outcome summary."""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TextIO

from style_factory.caption import check_content_prompts
from style_factory.config import (ConfigError, Registry, RunConfig, Style, load_run_config, load_styles,
                                 load_subjects)
from style_factory.families import FAMILIES, get_family
from style_factory.files import read_json, write_json_atomic
from style_factory.hub import OFFLINE_ENV, resolve_models
from style_factory.methods import METHODS
from style_factory.models import default_resolution, detect_family, resolve_base_model

REGISTRY = Registry(methods=METHODS, families=FAMILIES)
LOCK_FILE = ".lock"
TIMINGS_FILE = "timings.json"


@dataclass
class Run:
    """A validated run config with its styles and the paths its stages read and write."""

    config: RunConfig
    styles: list[Style]
    outcomes: dict[str, dict[str, str]] = field(default_factory=dict)  # style -> stage -> "ok"/"reused"/error
    stage: str = "start"  # the stage the job is in: a Ctrl-C or a full disk is recorded against it
    written: list[Path] = field(default_factory=list)  # the result files, once this command wrote them
    lock: TextIO | None = field(default=None, repr=False)  # the run folder's lock file, flock-ed while open
    timings: list[dict] = field(default_factory=list)  # what took how long in this command (see `timed`)
    local_base: str | None = None  # model.base's local folder, found by style_factory.hub.resolve_models; None: a preset

    @property
    def dir(self) -> Path:
        return Path(self.config.results_dir).resolve() / self.config.name

    @property
    def base_models_dir(self) -> Path:
        return Path(self.config.results_dir).resolve() / "base-models"

    @cached_property
    def base_model(self) -> str:
        """The folder `from_pretrained` loads for model.base (a preset's folder is written on first use)."""
        return self.local_base or resolve_base_model(self.config.model.base, self.base_models_dir)

    @cached_property
    def family(self) -> str:
        """model.family, or the family detected from the base model."""
        model = self.config.model
        return model.family if model.family != "auto" else detect_family(model.base, self.base_model)

    @property
    def resolution(self) -> int:
        """model.resolution, or the default of the preset or family."""
        model = self.config.model
        return model.resolution or default_resolution(model.base, get_family(self.family))

    def curated(self, style: str) -> Path:
        return self.dir / "curated" / f"{style}.parquet"

    def model_dir(self, style: str, method: str) -> Path:
        return self.dir / "models" / style / method

    def samples_dir(self, style: str, method: str) -> Path:
        return self.dir / "samples" / style / method

    def tensorboard_dir(self, style: str, method: str) -> Path:
        return self.dir / "tensorboard" / style / method

    def train_log(self, style: str, method: str) -> Path:
        return self.dir / "logs" / style / method / "train_log.jsonl"

    def record(self, style: str, stage: str, outcome: str) -> None:
        self.outcomes.setdefault(style, {})[stage] = outcome

    def failed(self, style: str) -> bool:
        return any(v not in ("ok", "reused") for v in self.outcomes.get(style, {}).values())

    def live_styles(self) -> list[Style]:
        """Styles with no failed stage so far: later stages skip the others."""
        return [s for s in self.styles if not self.failed(s.name)]

    def open(self) -> None:
        """Take the run folder's lock (exit 2 when another run holds it), remove what the interrupted writes of an
        earlier run left there, then write config.json."""
        self.lock = lock_run_dir(self.dir)
        remove_temp_files(self.dir)
        write_json_atomic(self.dir / "config.json", self.config.model_dump())

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Time `what`: run_job writes every span of the command into `timings.json` (`make bench` breaks the
        default run's wall time down from it)."""
        start = time.time()
        try:
            yield
        finally:
            self.timings.append({"what": what, "start": round(start, 3), "seconds": round(time.time() - start, 3)})

    def write_timings(self) -> None:
        """`timings.json`: this command's spans, its process start (imports come before the run) and its end."""
        import psutil

        write_json_atomic(self.dir / TIMINGS_FILE, {"command": shlex.join(sys.orig_argv),
                                                    "process_start": psutil.Process().create_time(),
                                                    "end": time.time(), "spans": self.timings})

    def release(self) -> None:
        """Give the lock back with its holder cleared, so that the next run sees no dead holder to take over."""
        if self.lock is not None:
            self.lock.truncate(0)
            self.lock.close()
            self.lock = None


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="run config YAML (default: the embedded tiny CPU demo)")
    parser.add_argument("--style", action="append", default=[], metavar="NAME",
                        help="run only this style (repeatable)")
    return parser.parse_args(argv)


def load_run(args: argparse.Namespace) -> Run:
    """Validate the run config and every style, and find every model the run loads on this machine (or download
    it, with model.allow_downloads), before any compute; exit 2 with the message if invalid or missing."""
    try:
        config = load_run_config(args.config, REGISTRY)
        styles = load_styles(config, REGISTRY, args.style)
        styles += load_subjects(config, REGISTRY, styles, str(args.config or "(default config)"))  # run as styles
        check_content_prompts(config.evaluate.prompts or [], styles, str(args.config or "(default config)"))
        local = resolve_models(config, styles, str(args.config or "(default config)"))
        if "curate.captioner" in local:
            config.curate.captioner = local["curate.captioner"]
        run = Run(config=config, styles=styles, local_base=local.get("model.base"))
        try:
            print(f"[model] {config.model.base}: family {run.family}, {run.resolution} px", flush=True)
        except ValueError as err:
            raise ConfigError(f"{args.config or '(default config)'}: model.family: {err}") from None
    except ConfigError as err:
        print(f"configuration error:\n{err}", file=sys.stderr)
        raise SystemExit(2) from None
    return run


def lock_run_dir(folder: Path) -> TextIO:
    """Hold `<folder>/.lock` with flock(LOCK_EX | LOCK_NB), the holder written in it; exit 2 naming the holder when
    another process has it. The kernel drops a flock when its process ends, however it ends: a lock whose file
    still names a holder but that nobody holds belonged to a run that died, and is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = os.fdopen(os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = describe_holder(lock.read())
        lock.close()
        print(f"[run] {folder} is in use by another run: {holder}.\nWait for it to finish, or stop that run; if that "
              "process is gone, just rerun: its lock went with it.", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # ENOLCK: a filesystem without locks (NFSv3 without lockd)
        print(f"[run] WARNING: cannot lock {folder / LOCK_FILE} ({err}); running unlocked: make sure no other run "
              "uses this folder", file=sys.stderr, flush=True)
    else:
        previous = lock.read()
        if previous.strip():
            print(f"[run] taking over the lock of {describe_holder(previous)} (no longer running)", flush=True)
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": datetime.now().astimezone().isoformat(timespec="seconds"),
                           "command": shlex.join(sys.orig_argv)}) + "\n")
    lock.flush()
    return lock


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}: {holder['command']}"
    except (ValueError, TypeError, KeyError):  # empty while its holder is starting, or not ours
        return "a process that has not written its details yet"


# Quiet per-file progress bars in every worker; the stages print one line per style instead.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1", "RAY_TRAIN_V2_ENABLED": "1"}
# On a local instance: Ray Train's controller sees a group finish within half a second, not two (a run trains
# many short groups), and starts no preemption watcher, as no node of a single machine is ever drained.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_ray(local_cpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local instance offering
    `local_cpus` CPUs (None: every core); True when this call did either (the caller stops it again), False when Ray
    was already running in this process."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.update({k: os.environ.get(k, v) for k, v in QUIET_ENV.items()})
    project = str(Path(__file__).resolve().parent.parent)
    # Workers load the models the driver resolved (load_run) from local folders, with the Hub off: none waits on it.
    worker_env = {**QUIET_ENV, **OFFLINE_ENV}
    env_vars = {**worker_env, **{k: os.environ.get(k, v) for k, v in LOCAL_TRAIN_ENV.items()},
                "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    try:
        if os.environ.get("RAY_ADDRESS"):
            context = ray.init(runtime_env={"env_vars": worker_env})  # the job's --working-dir is already on the path
            dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "not running"
            print(f"[ray] joined the cluster at {context.address_info['address']}; dashboard: {dashboard}", flush=True)
        else:
            context = start_local_ray(env_vars, local_cpus)
            cpus = int(ray.cluster_resources().get("CPU", 0))
            print(f"[ray] local instance started, {cpus} CPU{'s' * (cpus != 1)}; worker logs in "
                  f"{context.address_info['session_dir']}/logs", flush=True)
    except BaseException:  # a Ctrl-C halfway through start-up: stop what did start
        ray.shutdown()
        raise
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def start_local_ray(env_vars: dict[str, str], num_cpus: int | None = None, attempts: int = 2):
    """A local Ray instance, its worker logs kept in Ray's log folder (stage outcomes and errors reach the driver as
    results). Ray gives its raylet 30 s to register, which a machine busy with other work can miss: then once more."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                            runtime_env={"env_vars": env_vars})
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()
            print("[ray] the local instance did not start within Ray's 30 s (a busy machine?): starting it again",
                  flush=True)


def run_job(args: argparse.Namespace, stages: Callable[[Run], int], uses_ray: bool = True) -> int:
    """Open the run, start Ray (`uses_ray`) and run `stages`, which ends with its exit code; Ray is stopped and the
    lock given back however it ends.

    A Ctrl-C (exit 130) or a full disk (exit 1) anywhere is reported, not raised: see `abort`. Any other error keeps
    its traceback."""
    run = load_run(args)
    try:
        run.open()
        with run.timed("ray start"):
            stop_ray = uses_ray and start_ray(run.config.local_cpus)
        try:
            with watch_progress() if uses_ray else nullcontext():
                return stages(run)
        finally:
            if stop_ray:
                with run.timed("ray stop"):
                    shutdown_ray()
            run.write_timings()
    except KeyboardInterrupt:
        return abort(run, "interrupted (Ctrl-C)", 130)
    except OSError as err:
        if not disk_full(err):
            raise
        return abort(run, disk_full_message(err, run.dir), 1)
    finally:
        run.release()


def watch_progress():
    """The live progress view, fed by the workers (style_factory/progress.py, which imports Ray: a job without Ray
    never loads it)."""
    from style_factory.progress import watch

    return watch()


def shutdown_ray() -> None:
    """Stop the local instance start_ray started (or leave the cluster it joined), and wait until every process of
    it has exited: its workers end on their own once their raylet is gone, a few seconds later; any still running
    after 10 s are killed."""
    import psutil
    import ray

    session = ray.get_runtime_context().get_session_name()  # in the command line of each process ray.init started
    started = []
    for process in psutil.Process().children():
        try:
            if any(session in arg for arg in process.cmdline()):
                started += [process, *process.children(recursive=True)]
        except psutil.Error:  # it exited meanwhile
            continue
    ray.shutdown(wait_for_processes=True)
    _, alive = psutil.wait_procs(started, timeout=10)
    for process in alive:
        process.kill()


def disk_full(err: OSError) -> bool:
    """ENOSPC, also when it comes wrapped (a Ray task's error, pyarrow's) with the message alone."""
    return err.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err)


def disk_full_message(err: OSError, fallback: Path) -> str:
    """`disk full: <path>: <free space> free`, for the file the error names, else for `fallback`."""
    path = Path(os.fsdecode(err.filename)) if isinstance(err.filename, (str, bytes)) else fallback
    return f"disk full: {path}: {free_space(path)} free"


def free_space(path: Path) -> str:
    """The free space of the filesystem that holds `path` (or would hold it), human-readable."""
    while not path.exists():
        path = path.parent
    return human_size(shutil.disk_usage(path).free)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# What the writers leave behind when they are stopped halfway: `_tmp_beside` and the latent cache's `.tmp` files,
# half-saved `.tmp.png` samples, and `tempfile.mkdtemp` folders (`.<name>.` + 8 random characters) not yet moved
# into place. Generation's `.partial-<key>` folders and Ray Train's checkpoints are kept: a rerun resumes from them.
TEMP_FILE = re.compile(r".+\.tmp(\.png)?")
TEMP_DIR = re.compile(r"\..+\.[a-z0-9_]{8}")


def remove_temp_files(run_dir: Path) -> None:
    """Remove what interrupted writes left under the run folder. Only while nothing else writes there: the lock keeps
    other runs out, and this run's Ray is not started yet or stopped already."""
    removed = 0
    for folder, dirs, files in os.walk(run_dir):
        for name in [d for d in dirs if TEMP_DIR.fullmatch(d)]:
            shutil.rmtree(Path(folder) / name, ignore_errors=True)
            dirs.remove(name)
            removed += 1
        for name in filter(TEMP_FILE.fullmatch, files):
            (Path(folder) / name).unlink(missing_ok=True)
            removed += 1
    if removed:
        print(f"[run] removed {removed} temporary file(s) and folder(s) of interrupted writes under {run_dir}",
              flush=True)


def abort(run: Run, reason: str, code: int) -> int:
    """After a Ctrl-C or a full disk: remove the temporary files, record `reason` against the stage it stopped for
    every style still going, write summary.json (or say why it cannot), print where things are; `code`.

    The stages this command reached replace what an earlier command recorded for them; the stages it never reached
    keep theirs, as their outputs are still the folder's."""
    print(f"\n[run] {reason} during {run.stage}", file=sys.stderr, flush=True)
    if run.lock is None:  # stopped before the folder was ours: nothing of it to clean or record
        return code
    remove_temp_files(run.dir)
    for style in run.live_styles():
        stages = run.outcomes.get(style.name, {})
        if not any(stage == run.stage or stage.startswith(f"{run.stage}:") for stage in stages):
            run.record(style.name, run.stage, reason)
    earlier = read_json(run.dir / "summary.json")
    summary = earlier if isinstance(earlier, dict) else {}
    for style, stages in run.outcomes.items():
        reached = {key.split(":")[0] for key in stages}
        summary[style] = {**{k: v for k, v in (summary.get(style) or {}).items() if k.split(":")[0] not in reached},
                          **stages}
    path = run.dir / "summary.json"
    try:
        write_json_atomic(path, summary)
    except OSError as err:
        print(f"[run] could not write {path}: {disk_full_message(err, path) if disk_full(err) else err}",
              file=sys.stderr, flush=True)
        path = None
    print_outcomes(run, f"{reason} during {run.stage}")
    if path is not None:
        print(f"  {'summary.json':16s} {path}")
    print("Rerun the same command to go on: what is finished is reused.", flush=True)
    return code


def print_outcomes(run: Run, title: str = "") -> None:
    print(f"\n== Style Factory run {run.config.name}{': ' + title if title else ''} ==")
    for style, stages in run.outcomes.items():
        print(f"  {style:16s} " + "  ".join(f"{k}: {v}" for k, v in stages.items()))
    # A full disk inside a Ray worker reaches the driver as a style's error message, without the free space.
    if any(os.strerror(errno.ENOSPC) in outcome for stages in run.outcomes.values() for outcome in stages.values()):
        print(f"  disk full: {run.dir}: {free_space(run.dir)} free; free some space, then rerun the same command")


def finish(run: Run) -> int:
    """Write summary.json, point results/latest at this run, print where things are; the exit code.

    The summary keeps the styles earlier commands on this run folder recorded and this command did not run: the
    folder's results cover them too. results.parquet and report.html are named as this run's only when this command
    wrote them."""
    run.stage = "summary"
    earlier = read_json(run.dir / "summary.json")
    earlier = earlier if isinstance(earlier, dict) else {}
    write_json_atomic(run.dir / "summary.json", {**{k: v for k, v in earlier.items() if k not in run.outcomes},
                                                 **run.outcomes})
    latest = run.dir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = run.dir.parent / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.dir.name)
        os.replace(tmp, latest)
    failed = {s: o for s, o in run.outcomes.items() if run.failed(s)}
    print_outcomes(run)
    for name in ("results.parquet", "best.parquet", "report.html"):
        path = run.dir / name
        if path in run.written:
            print(f"  {name:16s} {path}")
        elif path.exists():
            print(f"  {name} (from an earlier command)  {path}")
    print(f"  {'latest':16s} {latest}")
    if failed:
        print(f"{len(failed)} style(s) failed: {', '.join(failed)} (details in {run.dir / 'summary.json'})")
    return 1 if failed else 0
