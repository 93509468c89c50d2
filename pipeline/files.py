"""Files that appear whole or not at all (write, then rename), and content hashes that key stage outputs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PIPELINE_DIR = Path(__file__).parent


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp_beside(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = _tmp_beside(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def replace_dir_atomic(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an older `dst` is removed only after `src` is complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def sha256_of(*parts: Any) -> str:
    """Hash of JSON-able values: the key of a stage output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(*modules: str) -> str:
    """Hash of the pipeline source files a stage depends on (e.g. "train.py", "methods")."""
    files: list[Path] = []
    for name in modules:
        target = PIPELINE_DIR / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return hash_files(files)[:16]
