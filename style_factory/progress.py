"""Watching a run: how much work is done, gathered from the workers into one small Ray actor and shown on the
driver's console, as live progress bars (rich) on a terminal and as plain lines otherwise.

A task ("curate", "train", "sample") is made of parts (an image, a (style, method) job, a prompt of one model), each
reported as an absolute count of its own total: a report sent twice, or again by a restarted worker, never counts
twice. Stages report every part they will do, with what is already done, on the driver before they start; workers
report what they did. A report is a no-op when no run is watching (a function called on its own, a test), so nothing that computes depends on them.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TextIO

import ray

ACTOR_NAME = "style-factory-progress"  # one per Ray job (named actors live in the job's namespace)
# task -> (what its counts are, what its parts are where a person counts them too)
TASKS = {"curate": ("images decoded", None), "caption": ("images captioned", None),
         "train": ("steps trained", "models"), "sample": ("images sampled", None)}
REPORT_SECONDS = 1.0  # a training loop reports at most this often (and always its last step)
POLL_SECONDS = 0.5  # how often the view reads the counter (and redraws the bars)
PLAIN_SECONDS = 30.0  # a plain line per task at most this often, and at each milestone (a model or task finished)


class Counter:
    """The counts: per task, per part, (count, total). Run as a Ray actor by `watch`."""

    def __init__(self):
        self.tasks: dict[str, dict[str, tuple[int, int]]] = {}

    def report(self, task: str, parts: dict[str, tuple[int, int]]) -> None:
        self.tasks.setdefault(task, {}).update(parts)

    def clear(self) -> None:
        self.tasks = {}

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per task: done and total, and parts complete of parts."""
        return {task: {"done": sum(min(c, t) for c, t in parts.values()), "total": sum(t for _, t in parts.values()),
                       "complete": sum(c >= t for c, t in parts.values()), "parts": len(parts)}
                for task, parts in self.tasks.items()}


def _counter():
    """The run's counter actor, or None when no run is watching (or Ray is not connected in this process)."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(ACTOR_NAME)
    except ValueError:
        return None


def report(task: str, parts: dict[str, tuple[int, int]]) -> None:
    """Set each part of `task` to (count, total); fire and forget: the caller never waits for the counter."""
    counter = _counter()
    if counter is not None:
        counter.report.remote(task, parts)


class StepReporter:
    """One training job's steps, reported at most every REPORT_SECONDS and always at its last step: a fast loop
    pays one remote call a second."""

    def __init__(self, part: str, total: int):
        self.part, self.total, self.last = part, total, 0.0

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if step >= self.total or now - self.last >= REPORT_SECONDS:
            report("train", {self.part: (step, self.total)})
            self.last = now


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class View:
    """Polls `snapshot` and shows it on `stream`: rich progress bars (with an ETA) when it is a terminal, else a plain
    line per task every `plain_seconds` at most and at each milestone, with counts, rate and ETA."""

    def __init__(self, snapshot: Callable[[], dict], stream: TextIO, plain_seconds: float = PLAIN_SECONDS):
        self.snapshot, self.stream, self.plain_seconds = snapshot, stream, plain_seconds
        self.live = stream.isatty()
        self.began: dict[str, float] = {}  # task -> when first seen
        # task -> (time, done) of the last poll before its first progress: the rate leaves out the start-up (Ray
        # workers starting, models loading)
        self.first: dict[str, tuple[float, int]] = {}
        self.shown: dict[str, tuple[float, tuple]] = {}  # task -> (time, counts) of its last plain line
        self.bars, self.tasks = None, {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress-view", daemon=True)

    def start(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bars = Progress(TextColumn("{task.description:8s}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}  {task.fields[parts]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), auto_refresh=False)
            self.bars.start()  # print()s of the driver appear above the bars meanwhile
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.update(final=True)
        if self.bars is not None:
            self.bars.stop()

    def _loop(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            self.update()

    def update(self, final: bool = False) -> None:
        try:
            snapshot = self.snapshot()
        except Exception:  # noqa: BLE001 - the counter went away (Ray shutting down): nothing more to show
            return
        now = time.monotonic()
        for task, counts in snapshot.items():
            self.began.setdefault(task, now)
            if task not in self.first or counts["done"] == self.first[task][1]:
                self.first[task] = (now, counts["done"])
            if self.bars is not None:
                self._show_bar(task, counts)
            else:
                self._show_line(task, counts, now, final)
        if self.bars is not None:
            self.bars.refresh()

    def _parts(self, task: str, counts: dict) -> str:
        noun = TASKS[task][1]
        return f"{counts['complete']}/{counts['parts']} {noun}" if noun else ""

    def _show_bar(self, task: str, counts: dict) -> None:
        fields = {"unit": TASKS[task][0], "parts": self._parts(task, counts)}
        if task not in self.tasks:
            self.tasks[task] = self.bars.add_task(task, total=counts["total"], completed=counts["done"], **fields)
        else:
            self.bars.update(self.tasks[task], total=counts["total"], completed=counts["done"], **fields)

    def eta(self, task: str, counts: dict, now: float) -> str:
        started, done_then = self.first[task]
        rate = (counts["done"] - done_then) / max(now - started, 1e-9)
        if counts["done"] >= counts["total"]:
            return f"done in {duration(now - self.began[task])}"
        return f"{rate:.2f}/s, ETA {duration((counts['total'] - counts['done']) / rate)}" if rate > 0 else "ETA --"

    def _show_line(self, task: str, counts: dict, now: float, final: bool) -> None:
        key = (counts["done"], counts["total"], counts["complete"], counts["parts"])
        last_time, last_key = self.shown.get(task, (float("-inf"), None))
        if key == last_key:
            return
        counted_parts = TASKS[task][1] is not None
        milestone = (last_key is None or counts["done"] >= counts["total"]
                     or (counted_parts and counts["complete"] != last_key[2]))
        if not (milestone or final or now - last_time >= self.plain_seconds):
            return
        parts = self._parts(task, counts)
        print(f"[progress] {task}: {counts['done']}/{counts['total']} {TASKS[task][0]}"
              f"{', ' + parts if parts else ''}, {self.eta(task, counts, now)}", file=self.stream, flush=True)
        self.shown[task] = (now, key)


@contextmanager
def watch(stream: TextIO | None = None):
    """While the block runs: the counter actor (found by the workers by name; kept for the next run of this
    driver's Ray session, emptied) and its view on `stream` (stdout). Needs Ray started in this process."""
    counter = ray.remote(num_cpus=0)(Counter).options(name=ACTOR_NAME, get_if_exists=True).remote()
    ray.get(counter.clear.remote(), timeout=60)
    view = View(lambda: ray.get(counter.snapshot.remote(), timeout=10), stream or sys.stdout)
    view.start()
    try:
        yield view
    finally:
        view.stop()
