"""scripts/fetch_weights.py without the network: the checks that guard what it downloads."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("fetch_weights", REPO / "scripts" / "fetch_weights.py")
fetch_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_weights)


def test_a_file_that_does_not_match_its_digest_is_deleted_and_named(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"good")
    assert fetch_weights.verify(path, hashlib.sha256(b"good").hexdigest()) == hashlib.sha256(b"good").hexdigest()
    with pytest.raises(fetch_weights.ChecksumError, match="weights.safetensors"):
        fetch_weights.verify(path, "0" * 64)
    assert not path.exists()


def test_files_recorded_in_sha256sums_are_verified_without_the_network(tmp_path, monkeypatch):
    names = [fetch_weights.backbones.INCEPTION_FILE_NAME, *fetch_weights.HUB_FILES,
             fetch_weights.backbones.CSD_FILE_NAME]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    fetch_weights.write_sums(tmp_path, {n: hashlib.sha256(n.encode()).hexdigest() for n in names})
    monkeypatch.setattr(fetch_weights, "download", lambda *a: pytest.fail("no download expected"))
    monkeypatch.setattr(fetch_weights, "fetch_hub_file", lambda *a: pytest.fail("no download expected"))
    assert fetch_weights.fetch(tmp_path) == fetch_weights.read_sums(tmp_path)

    (tmp_path / names[1]).write_bytes(b"changed on disk")
    with pytest.raises(fetch_weights.ChecksumError, match=names[1]):
        fetch_weights.fetch(tmp_path)


def test_an_inception_file_that_is_not_the_torchscript_network_is_rejected(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(fetch_weights.ChecksumError, match="inception-2015-12-05.pt"):
        fetch_weights.check_inception(path)
    assert not path.exists()


class ArbitraryObject:
    pass


def csd_training_checkpoint(path, extra=None):
    """A random width-reduced checkpoint of CSD's layout, saved as its training script saves one."""
    torch.manual_seed(0)
    model = fetch_weights.backbones.Csd(width=64, layers=2, embed_dim=32)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "opt_bb": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "iter": 10,
                "args": argparse.Namespace(arch="vit_large", lr=np.float64(0.003), **(extra or {}))}, path)
    return model


def test_csd_is_fetched_checked_and_converted_to_safetensors(tmp_path, monkeypatch):
    backbones = fetch_weights.backbones
    made = {}

    def fake_hub_file(repo, filename, dest, revision=None):
        assert (repo, filename, revision) == (backbones.CSD_HF_REPO, backbones.CSD_HF_FILE_NAME,
                                              backbones.CSD_HF_REVISION)
        made["model"] = csd_training_checkpoint(dest)
        return backbones.sha256_of_file(dest)

    monkeypatch.setattr(fetch_weights, "fetch_hub_file", fake_hub_file)
    dest = tmp_path / backbones.CSD_FILE_NAME
    with pytest.raises(fetch_weights.ChecksumError, match="does not match the expected"):  # not the pinned file
        fetch_weights.fetch_csd(dest)
    assert not dest.exists() and not (tmp_path / backbones.CSD_HF_FILE_NAME).exists()

    monkeypatch.setattr(backbones, "CSD_HF_SHA256", None)
    monkeypatch.setattr(fetch_weights, "verify", lambda path, expected: backbones.sha256_of_file(path))
    assert fetch_weights.fetch_csd(dest) == backbones.sha256_of_file(dest)
    assert not (tmp_path / backbones.CSD_HF_FILE_NAME).exists()  # the pickle is not kept
    converted = load_file(str(dest))
    assert converted.keys() == made["model"].state_dict().keys()
    torch.testing.assert_close(converted["last_layer_style"], made["model"].last_layer_style.detach())


def test_a_csd_checkpoint_that_would_run_code_or_is_not_the_layout_is_refused(tmp_path):
    checkpoint, dest = tmp_path / "pytorch_model.bin", tmp_path / "csd.safetensors"
    csd_training_checkpoint(checkpoint, extra={"hook": ArbitraryObject()})  # unpickling it would call its class
    with pytest.raises(fetch_weights.ChecksumError, match="model.bin: unpickling it would call .*ArbitraryObject"):
        fetch_weights.convert_csd(checkpoint, dest)
    torch.save({"model_state_dict": {"module.backbone.conv1.weight": torch.zeros(64, 3, 14, 14)}}, checkpoint)
    with pytest.raises(fetch_weights.ChecksumError, match="not CSD's checkpoint layout"):
        fetch_weights.convert_csd(checkpoint, dest)
    assert not dest.exists()
