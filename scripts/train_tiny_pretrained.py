"""Train `tiny-pretrained` and the toy metric backbone from scratch, and write them where the pipeline loads them.

    python scripts/train_tiny_pretrained.py [--out pipeline/assets] [--work results/pretrain] [--set unet_steps=3000]

About 80 minutes on 2 CPU cores (measured: 79) with the defaults of pipeline.pretrain.PretrainConfig; everything is seeded, so
a rerun reproduces the shipped figures closely (bitwise only on the same machine and torch build).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the script runs from a plain checkout

from pipeline.models import ASSETS_DIR  # noqa: E402
from pipeline.pretrain import PretrainConfig, pretrain  # noqa: E402


def parse_overrides(pairs: list[str]) -> PretrainConfig:
    fields = {f.name: f.type for f in dataclasses.fields(PretrainConfig)}
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {pair}: unknown setting {name!r}; known: {', '.join(fields)}")
        values[name] = float(value) if fields[name] == "float" else int(value)
    return PretrainConfig(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "results" / "pretrain")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a PretrainConfig field, e.g. --set unet_steps=500")
    args = parser.parse_args()
    pretrain(parse_overrides(args.set), args.out, args.work)


if __name__ == "__main__":
    main()
