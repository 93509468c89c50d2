"""Train `tiny-pretrained` and the toy metric backbone from scratch, and write them where the pipeline loads them.

    python scripts/train_tiny_pretrained.py [--out style_factory/assets] [--work results/pretrain] [--set unet_steps=3000]
                                            [--cpu-hour] [--only clip|vae]

The defaults of style_factory.pretrain.PretrainConfig are the shipped model's: 17 minutes on one H100 (CLIP and VAE
trained at once with `--only clip` and `--only vae` in two processes, then this command without `--only`), about
12 hours on 2 CPU cores. `--cpu-hour` is the short run (79 minutes on 2 CPU cores): color, size and background
are learnt, the object's kind is not. Everything is seeded, so a rerun reproduces the shipped figures closely
(bitwise only on the same machine and torch build).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so the script runs from a plain checkout

from style_factory.models import ASSETS_DIR  # noqa: E402
from style_factory.pretrain import CPU_HOUR, PretrainConfig, pretrain  # noqa: E402


def parse_overrides(pairs: list[str], cpu_hour: bool) -> PretrainConfig:
    fields = {f.name: f.type for f in dataclasses.fields(PretrainConfig)}
    values = dict(CPU_HOUR) if cpu_hour else {}
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
    parser.add_argument("--cpu-hour", action="store_true",
                        help="the short CPU run's lengths (style_factory.pretrain.CPU_HOUR); --set still applies on top")
    parser.add_argument("--only", choices=("clip", "vae"),
                        help="train just this phase into --work (two processes can train both at once); "
                             "a later run without --only loads it")
    args = parser.parse_args()
    pretrain(parse_overrides(args.set, args.cpu_hour), args.out, args.work, args.only)


if __name__ == "__main__":
    main()
