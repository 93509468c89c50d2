"""scripts/fetch_weights.py without the network: the checks that guard what it downloads."""
from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

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
    names = [fetch_weights.backbones.INCEPTION_FILE_NAME, *fetch_weights.HUB_FILES]
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
