"""A job's code key covers the code that job runs, no more: its method (and what that imports), its family, and the
shared loop. Editing one method retrains only that method's models."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from style_factory import files
from style_factory.families import FAMILIES
from style_factory.files import code_version
from style_factory.methods import METHODS


@pytest.fixture
def pipeline_copy(tmp_path, monkeypatch) -> Path:
    """An editable copy of pipeline/ that code_version reads instead of the real one."""
    copy = tmp_path / "style_factory"
    shutil.copytree(files.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    monkeypatch.setattr(files, "PACKAGE_DIR", copy)
    return copy


def job_keys(family: str = "sd1") -> dict[str, str]:
    return {name: code_version("style_factory.worker", cls.__module__, FAMILIES[family].__module__)
            for name, cls in METHODS.items()}


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit\n")


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_editing_a_method_changes_its_key_alone(pipeline_copy):
    before = job_keys()
    edit(pipeline_copy / "methods" / "textboost.py")
    assert changed(before, job_keys()) == {"textboost"}


def test_a_method_built_on_another_follows_its_edits(pipeline_copy):
    before = job_keys()
    edit(pipeline_copy / "methods" / "styleboost.py")
    # DreamBooth is StyleBoost with other priors, and a subject's content adapter is DreamBooth's recipe
    assert changed(before, job_keys()) == {"styleboost", "dreambooth", "content"}


@pytest.mark.slow
def test_the_shared_loop_and_a_family_change_the_keys_of_the_jobs_they_run(pipeline_copy):
    before, before_sdxl = job_keys(), job_keys("sdxl")
    edit(pipeline_copy / "families" / "sdxl.py")
    assert changed(before, job_keys()) == set() and changed(before_sdxl, job_keys("sdxl")) == set(METHODS)
    edit(pipeline_copy / "loop.py")
    assert changed(before, job_keys()) == set(METHODS)


def test_registering_a_method_retrains_nothing(pipeline_copy):
    before = job_keys()
    edit(pipeline_copy / "methods" / "__init__.py")
    edit(pipeline_copy / "families" / "__init__.py")
    assert changed(before, job_keys()) == set()


def test_the_key_does_not_depend_on_where_the_repository_is(pipeline_copy, monkeypatch):
    here = job_keys()
    monkeypatch.setattr(files, "PACKAGE_DIR", Path(__file__).resolve().parent.parent / "style_factory")
    assert job_keys() == here
