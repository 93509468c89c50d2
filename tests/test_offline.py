"""A run on a machine without network: every model is found locally in the driver before any compute, and a missing
one stops the job at once (exit 2) with one message saying what is missing, where it was looked for, what to do."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from style_factory.config import RunConfig
from style_factory.hub import MissingModels, resolve_models
from style_factory.models import ASSETS_DIR, TINY_PRETRAINED_DIR_NAME
from style_factory.run import load_run, parse_args
from tests.helpers import REPO, load_sd1, make_style

TINY_PRETRAINED = ASSETS_DIR / TINY_PRETRAINED_DIR_NAME
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every outgoing connection attempt (name look-ups included), each refused: the list a test asserts on."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("outgoing connection refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return attempts


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty Hugging Face cache that huggingface_hub uses for this test."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_model(cache: Path, repo_id: str, source: Path) -> Path:
    """`source`'s files as hub id `repo_id` in Hugging Face cache `cache` (refs/main -> one snapshot)."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, entry / "snapshots" / SNAPSHOT)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SNAPSHOT)
    return entry / "snapshots" / SNAPSHOT


def write_run(tmp_path: Path, **fields) -> Path:
    make_style(tmp_path / "styles", "ink", "qxi", n_ref=2, n_aux=2)
    config = {"name": "offline", "styles_dir": "styles", "results_dir": "results", **fields}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job_offline(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    """The real job entry, as a user without network starts it: HF_HUB_OFFLINE unset, an empty HF_HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")
    return subprocess.run([sys.executable, "-m", "jobs.all_styles", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.ray  # runs a job entry: it must stop before Ray starts
def test_missing_models_stop_the_job_with_one_message(tmp_path):
    config = write_run(tmp_path, model={"base": "no-such/model", "models_dir": "./models"},
                       curate={"captioner": "no-such/captioner"},
                       evaluate={"clip": "ViT-B-32:./weights/clip.safetensors", "dino": "./weights/dino.safetensors"})
    done = run_job_offline(tmp_path, config)
    assert done.returncode == 2, done.stderr
    message = done.stderr
    assert "4 model(s) this run needs are not on this machine" in message
    for line in ("model.base: 'no-such/model': not found",
                 f"looked in {tmp_path / 'models' / 'no-such' / 'model'} (model.models_dir)",
                 f"looked in {tmp_path / 'empty-hf-home' / 'hub' / 'models--no-such--model'} (the Hugging Face cache",
                 "curate.captioner: 'no-such/captioner': not found",
                 f"evaluate.clip: 'ViT-B-32:{tmp_path / 'weights' / 'clip.safetensors'}': clip weights not found",
                 f"evaluate.dino: '{tmp_path / 'weights' / 'dino.safetensors'}': dino weights not found",
                 "hf download", "model.allow_downloads: true", "HF_HOME", "model.models_dir"):
        assert line in message
    assert "Traceback" not in message and "Retrying" not in message
    assert "[ray]" not in done.stdout  # nothing was started: no Ray, no run folder
    assert not (tmp_path / "results" / "offline").exists()


@pytest.mark.ray  # runs a job entry: it must stop before Ray starts
def test_a_misspelled_preset_names_the_preset(tmp_path):
    done = run_job_offline(tmp_path, write_run(tmp_path, model={"base": "tiny-pretraind"}))
    assert done.returncode == 2, done.stderr
    assert "model.base: 'tiny-pretraind': not found" in done.stderr
    assert "did you mean the preset 'tiny-pretrained'?" in done.stderr


def test_a_cached_hub_id_resolves_and_loads_without_network(tmp_path, hf_cache, connections):
    snapshot = cache_model(hf_cache, "test-org/tiny-sd", TINY_PRETRAINED)
    # a transformers folder (config.json and safetensors weights) is what a captioner hub id must resolve to
    captioner = cache_model(hf_cache, "test-org/captioner", TINY_PRETRAINED / "text_encoder")
    config = write_run(tmp_path, model={"base": "test-org/tiny-sd"}, curate={"captioner": "test-org/captioner"})
    run = load_run(parse_args(__doc__, ["--config", str(config)]))
    assert Path(run.base_model) == snapshot and run.family == "sd1"
    assert run.config.model.base == "test-org/tiny-sd"  # results and reports still name the hub id
    assert Path(run.config.curate.captioner) == captioner  # curation loads the folder, not the id
    models = load_sd1(run.base_model)
    assert models.unet.config.sample_size == 16 and models.source == run.base_model
    assert connections == []


def test_staged_folders_are_found_and_checked_for_every_file(tmp_path, hf_cache, connections):
    staged = tmp_path / "models" / "test-org" / "tiny-sd"
    shutil.copytree(TINY_PRETRAINED, staged)
    (tmp_path / "dino.safetensors").write_bytes(b"weights")
    config = RunConfig.model_validate({"model": {"base": "test-org/tiny-sd", "models_dir": str(tmp_path / "models")},
                                       "evaluate": {"dino": str(tmp_path / "dino.safetensors")}})
    assert resolve_models(config, [], "run.yaml") == {"model.base": str(staged)}

    (staged / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (staged / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(MissingModels) as caught:
        resolve_models(config, [], "run.yaml")
    (missing,) = caught.value.missing
    assert missing.field == "model.base"
    assert "unet/diffusion_pytorch_model.safetensors or" in missing.problem
    assert "tokenizer/tokenizer.json or tokenizer/vocab.json" in missing.problem
    assert connections == []


def test_allow_downloads_tries_the_hub_once_and_reports_a_failure(tmp_path, hf_cache, connections):
    config = RunConfig.model_validate({"model": {"base": "no-such/model", "allow_downloads": True,
                                                 "models_dir": str(tmp_path / "models")}})
    with pytest.raises(MissingModels) as caught:
        resolve_models(config, [], "run.yaml")
    (missing,) = caught.value.missing
    assert missing.problem.startswith("download failed") and connections  # it did ask the Hub, here in the driver


def test_ray_workers_run_with_the_hub_switched_off(ray_session):
    @ray_session.remote(num_cpus=0)
    def hub_switches() -> dict:
        return {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}

    assert ray_session.get(hub_switches.remote()) == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
