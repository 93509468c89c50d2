"""A run: its folder layout, Ray start-up, the command line shared by every job, and the outcome summary."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, Style, load_run_config, load_styles
from pipeline.files import write_json_atomic


@dataclass
class Run:
    """A validated run config with its styles and the paths its stages read and write."""

    config: RunConfig
    styles: list[Style]
    outcomes: dict[str, dict[str, str]] = field(default_factory=dict)  # style -> stage -> "ok"/"reused"/error

    @property
    def dir(self) -> Path:
        return Path(self.config.results_dir).resolve() / self.config.name

    @property
    def base_models_dir(self) -> Path:
        return Path(self.config.results_dir).resolve() / "base-models"

    def curated(self, style: str) -> Path:
        return self.dir / "curated" / f"{style}.parquet"

    def model_dir(self, style: str, method: str) -> Path:
        return self.dir / "models" / style / method

    def samples_dir(self, style: str, method: str) -> Path:
        return self.dir / "samples" / style / method

    def train_log(self, style: str, method: str) -> Path:
        return self.dir / "logs" / style / method / "train_log.jsonl"

    def record(self, style: str, stage: str, outcome: str) -> None:
        self.outcomes.setdefault(style, {})[stage] = outcome

    def failed(self, style: str) -> bool:
        return any(v not in ("ok", "reused") for v in self.outcomes.get(style, {}).values())

    def live_styles(self) -> list[Style]:
        """Styles with no failed stage so far: later stages skip the others."""
        return [s for s in self.styles if not self.failed(s.name)]


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="run config YAML (default: the embedded tiny CPU demo)")
    parser.add_argument("--style", action="append", default=[], metavar="NAME",
                        help="run only this style (repeatable)")
    return parser.parse_args(argv)


def open_run(args: argparse.Namespace) -> Run:
    """Validate the run config and every style before any compute; exit 2 with the message if invalid."""
    try:
        config = load_run_config(args.config)
        styles = load_styles(config, args.style)
    except ConfigError as err:
        print(f"configuration error:\n{err}", file=sys.stderr)
        raise SystemExit(2) from None
    run = Run(config=config, styles=styles)
    run.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.dir / "config.json", config.model_dump())
    return run


# Quiet per-file progress bars in every worker; the stages print one line per style instead.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1", "RAY_TRAIN_V2_ENABLED": "1"}


def start_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: os.environ.get(k, v) for k, v in QUIET_ENV.items()})
    project = str(Path(__file__).resolve().parent.parent)
    env_vars = {**QUIET_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": QUIET_ENV})  # the job's --working-dir is already on the path
    else:
        # Worker logs stay in Ray's log folder; stage outcomes and errors reach the driver as results.
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars})
        print("[ray] local instance started; worker logs in /tmp/ray/session_latest/logs", flush=True)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False


def finish(run: Run) -> int:
    """Write summary.json, point results/latest at this run, print where things are; the exit code."""
    write_json_atomic(run.dir / "summary.json", run.outcomes)
    latest = run.dir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = run.dir.parent / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.dir.name)
        os.replace(tmp, latest)
    failed = {s: o for s, o in run.outcomes.items() if run.failed(s)}
    print("\n== Style Factory run", run.config.name, "==")
    for style, stages in run.outcomes.items():
        print(f"  {style:16s} " + "  ".join(f"{k}: {v}" for k, v in stages.items()))
    for name in ("results.parquet", "report.html"):
        if (run.dir / name).exists():
            print(f"  {name:16s} {run.dir / name}")
    print(f"  {'latest':16s} {latest}")
    if failed:
        print(f"{len(failed)} style(s) failed: {', '.join(failed)} (details in {run.dir / 'summary.json'})")
    return 1 if failed else 0
