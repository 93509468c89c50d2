"""Download the real metric backbones into a models folder, checking every file, where the network allows.

    python scripts/fetch_weights.py [--models-dir ~/.cache/style-factory]      # or: make fetch-weights

Then point a run at it (`model.models_dir`, or leave the default folder, which `auto` searches):

  inception-2015-12-05.pt                 clean-fid's Inception TorchScript (FID/KID)
  open_clip_vit_b_32.safetensors          OpenAI CLIP ViT-B/32 in open_clip format (CLIP-T, style similarity)
  dino_vit_small_patch16_224.safetensors  DINO ViT-S/16 (style consistency)
  csd_vit_l14.safetensors                 CSD ViT-L/14 (CSD style similarity), converted from the Hub's checkpoint

Checks: a Hugging Face file must match the SHA-256 the Hub publishes for it (its LFS object id); the
Inception file has no published digest, so it must load as TorchScript and give 2048 features. CSD's
checkpoint (tomg-group-umd/CSD-ViT-L pytorch_model.bin, a 2.4 GB training checkpoint pickle) is fetched at a
pinned revision and must also match a pinned SHA-256; it is then read as weights only (no code runs), its model
weights must have CSD's layout, and they are written as safetensors; the pickle is deleted. Every digest is
written to SHA256SUMS in the folder, and a later run of this script verifies the files against it, so a file
that changes on disk is caught. A failed check deletes the download and names the file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the script runs from a plain checkout

from style_factory import backbones  # noqa: E402

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
HUB_FILES = {  # local name -> (Hugging Face repo, file in it)
    backbones.CLIP_FILE_NAME: (backbones.CLIP_HF_REPO, backbones.CLIP_HF_FILE_NAME),
    backbones.DINO_FILE_NAME: (backbones.DINO_HF_REPO, "model.safetensors"),
}
SUMS_FILE = "SHA256SUMS"


class ChecksumError(RuntimeError):
    pass


def read_sums(folder: Path) -> dict[str, str]:
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in path.read_text().splitlines() if line)}


def write_sums(folder: Path, sums: dict[str, str]) -> None:
    (folder / SUMS_FILE).write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))


def verify(path: Path, expected: str) -> str:
    """The file's SHA-256; on a mismatch the file is deleted and the error names it."""
    actual = backbones.sha256_of_file(path)
    if actual != expected:
        path.unlink()
        raise ChecksumError(f"{path}: SHA-256 {actual} does not match the expected {expected}; the file was deleted")
    return actual


def check_inception(path: Path) -> None:
    import torch

    try:
        features = torch.jit.load(str(path), map_location="cpu").eval()(
            torch.zeros(1, 3, 299, 299), return_features=True)
    except Exception as err:  # any failure to load or run means the download is not the network we expect
        path.unlink()
        raise ChecksumError(f"{path}: not clean-fid's Inception TorchScript ({err}); the file was deleted") from err
    if tuple(features.shape) != (1, 2048):
        path.unlink()
        raise ChecksumError(f"{path}: gives features of shape {tuple(features.shape)}, not (1, 2048); deleted")


def download(url: str, dest: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp, urllib.request.urlopen(url) as response:
        shutil.copyfileobj(response, tmp)
    Path(tmp.name).replace(dest)


def fetch_hub_file(repo: str, filename: str, dest: Path, revision: str | None = None) -> str:
    from huggingface_hub import HfApi, hf_hub_download

    (info,) = HfApi().get_paths_info(repo, [filename], revision=revision)
    if info.lfs is None:
        raise ChecksumError(f"{repo}/{filename}: the Hub publishes no SHA-256 for it")
    shutil.copyfile(hf_hub_download(repo, filename, revision=revision), dest)
    return verify(dest, info.lfs.sha256)


def csd_checkpoint_globals() -> list:
    """What CSD's training checkpoint pickles besides tensors and builtins: its argparse options, holding numpy
    scalars (pickled by numpy 1 as numpy.core.multiarray.scalar) and their dtypes."""
    import numpy as np

    scalar = np._core.multiarray.scalar
    dtypes = [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return [argparse.Namespace, np.dtype, *dtypes, scalar, (scalar, "numpy.core.multiarray.scalar")]


def convert_csd(checkpoint: Path, dest: Path) -> None:
    """CSD's checkpoint read as weights only (torch's restricted unpickler, allowing csd_checkpoint_globals), its
    model weights checked for CSD's layout (every key and shape) and written to `dest` as safetensors."""
    import torch
    from safetensors.torch import save_file

    allowed = csd_checkpoint_globals()
    allowed_names = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
                     for entry in allowed}
    if unsafe := sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint)) - allowed_names):
        raise ChecksumError(f"{checkpoint}: unpickling it would call {', '.join(unsafe)}, which no weights need; "
                            "not read")
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = backbones.csd_state_dict(checkpoint_dict)
        backbones.Csd.from_state_dict(state)
    except Exception as err:  # any failure to read it or to match the layout: not the checkpoint we expect
        raise ChecksumError(f"{checkpoint}: not CSD's checkpoint layout ({type(err).__name__}: {err})") from err
    partial = dest.with_name(f".{dest.name}.partial")
    save_file(state, str(partial))
    os.replace(partial, dest)


def fetch_csd(dest: Path) -> str:
    """CSD's checkpoint at the pinned revision, checked against the Hub's and the pinned SHA-256, converted into
    `dest`; the checkpoint copy is deleted, converted or not."""
    checkpoint = dest.with_name(backbones.CSD_HF_FILE_NAME)
    try:
        fetch_hub_file(backbones.CSD_HF_REPO, backbones.CSD_HF_FILE_NAME, checkpoint, backbones.CSD_HF_REVISION)
        verify(checkpoint, backbones.CSD_HF_SHA256)
        convert_csd(checkpoint, dest)
    finally:
        checkpoint.unlink(missing_ok=True)
    return backbones.sha256_of_file(dest)


def fetch(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    sums = read_sums(folder)
    for name in [backbones.INCEPTION_FILE_NAME, *HUB_FILES, backbones.CSD_FILE_NAME]:
        path = folder / name
        if path.is_file() and name in sums:
            verify(path, sums[name])
            print(f"ok        {path}")
            continue
        if name == backbones.INCEPTION_FILE_NAME:
            download(INCEPTION_URL, path)
            check_inception(path)
            sums[name] = backbones.sha256_of_file(path)
        elif name == backbones.CSD_FILE_NAME:
            sums[name] = fetch_csd(path)
        else:
            sums[name] = fetch_hub_file(*HUB_FILES[name], path)
        write_sums(folder, sums)
        print(f"fetched   {path}  sha256 {sums[name]}")
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=backbones.STYLE_FACTORY_CACHE_DIR)
    args = parser.parse_args()
    try:
        fetch(args.models_dir.expanduser())
    except ChecksumError as err:
        raise SystemExit(f"fetch-weights: {err}") from None


if __name__ == "__main__":
    main()
