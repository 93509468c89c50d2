"""Shared fixtures: one local Ray instance per test session, the tiny model written once, one end-to-end run.

Builders and loaders the tests share live in tests/helpers.py.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import yaml

from style_factory.models import resolve_base_model
from tests.helpers import copy_example_styles

E2E_STYLES = ["pixel-art", "anime"]  # one with two tokens
RAY_CPUS_PER_WORKER = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(scope="session")
def ray_session():
    """Each xdist worker's Ray offers its share of the cores: two instances each claiming the whole machine run two
    trainings and two sampler actors apiece side by side, each paying its own start-up on the same cores."""
    from style_factory.run import start_ray

    start_ray(local_cpus=RAY_CPUS_PER_WORKER)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return resolve_base_model("tiny", tmp_path_factory.mktemp("base-models"))


@pytest.fixture(scope="session")
def e2e_run(ray_session, tmp_path_factory):
    """Two example styles through curate -> train -> evaluate -> decide -> report, once per session: (run folder,
    config path, exit code), validation samples on, what it printed in `stdout.log` beside the config (not a
    terminal). Tests that read a real run folder share it; a test may rerun the same config on it."""
    from jobs import all_styles

    root = tmp_path_factory.mktemp("e2e")
    copy_example_styles(root / "styles", E2E_STYLES)
    for style in E2E_STYLES:  # the run's few steps, not the examples' own overrides (merging is tested in test_config)
        style_yaml = root / "styles" / style / "style.yaml"
        style_yaml.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(style_yaml.read_text()).items()
                                              if k != "train"}))
    config = {
        "name": "e2e", "styles_dir": str(root / "styles"), "results_dir": str(root / "results"),
        "train": {"max_steps": 4, "checkpoint_every": 2, "validation_every": 2},
        "evaluate": {"prompts": ["a red circle on a blue background", "a yellow star above a green square"],
                     "seeds": [0, 1], "num_inference_steps": 3},
    }
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with (root / "stdout.log").open("w") as out, contextlib.redirect_stdout(out):
        exit_code = all_styles.main(["--config", str(config_path)])
    return root / "results" / "e2e", config_path, exit_code


# Test modules that read the session's `e2e_run`: under `make test` they run in one worker, so it is made once.
E2E_RUN_MODULES = {"tests/test_e2e.py", "tests/test_decide.py", "tests/test_watch.py"}


def pytest_itemcollected(item):
    """A test that needs the session's Ray instance is a `ray` test, however deep the fixture sits."""
    if "ray_session" in item.fixturenames:
        item.add_marker(pytest.mark.ray)


# The longest work units of `make test`, longest first (its --durations, a module's fixtures and tests together):
# dealt first, so that the two workers end together. A module not named here follows them, `ray` modules first.
LONGEST_FIRST = ["tests/test_faults.py", "tests/test_methods_e2e.py", "tests/test_run_lifecycle.py",
                 "tests/test_families_e2e.py", "tests/test_pretrained.py", "tests/test_reuse.py",
                 "tests/test_bench_gpu.py", "e2e_run", "tests/test_fan_out.py", "tests/test_model_variants.py"]


def work_unit(nodeid: str) -> str:
    """What one xdist worker runs in one go: a module, or every module that reads the session's `e2e_run`."""
    module = nodeid.split("::", 1)[0]
    return "e2e_run" if module in E2E_RUN_MODULES else module


def pytest_collection_modifyitems(items):
    """The work units in the order they are dealt: LONGEST_FIRST, then modules with `ray` tests, then the rest, so
    that the quick ones fill the workers' ends."""
    ray_units = {work_unit(item.nodeid) for item in items if item.get_closest_marker("ray")}

    def rank(item) -> tuple[int, int]:
        unit = work_unit(item.nodeid)
        return (LONGEST_FIRST.index(unit), 0) if unit in LONGEST_FIRST else (len(LONGEST_FIRST), unit not in ray_units)

    items.sort(key=rank)  # stable: the order within a unit stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N` (`make test`): a work unit's tests run in one worker, so its module fixtures are built once, and
    the E2E_RUN_MODULES share one; units are dealt in collection order (never xdist's reordering by test count), a
    worker's next only once it is on its current unit's last test (xdist's default takes the next one test earlier,
    which can tie a long module to a busy worker while the other runs out of work)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:  # a worker holds its last test until it has a next
                self._assign_work_unit(node)

    return ModuleScheduling(config, log)
