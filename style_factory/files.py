"""Files that appear whole or not at all (write, then rename), and content hashes that key stage outputs."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PACKAGE_DIR = Path(__file__).parent


# Temporary files and folders are created as open() and mkdir() create any other: mode 0666 / 0777 less the umask,
# which the kernel applies (and a default ACL, where the folder has one). tempfile.mkstemp / mkdtemp make them owner-
# only (0600 / 0700), and the rename keeps that mode, so teammates and a web server could not read a shared run
# folder. No umask is read: os.umask can only be read by setting it, for the whole process, racing other threads.
def _fresh_name(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """`parent / <prefix><8 random characters><suffix>`, created by `create` under a name no one else holds."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _tmp_beside(path: Path) -> Path:
    return _fresh_name(path.parent, f".{path.name}.", ".tmp",
                       lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `<prefix><8 random characters>` in `parent`, made as mkdir makes one (see above), to be
    filled and then moved into place (replace_dir_atomic)."""
    return _fresh_name(Path(parent), prefix, "", lambda tmp: tmp.mkdir())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as err:  # a full disk or a Ctrl-C leaves no temporary file, and the error names the file
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = _tmp_beside(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException as err:  # as in write_text_atomic
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def replace_dir_atomic(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an older `dst` is removed only after `src` is complete. If the move fails,
    `src` is removed: no temporary folder is left behind."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    except BaseException:
        shutil.rmtree(src, ignore_errors=True)
        raise


def read_json(path: Path) -> Any | None:
    """A JSON file's content; None when it is missing or does not parse (a truncated or garbled marker)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


DIGEST_LIMIT = 64 * 2**20  # files up to this size get a sha256 in a manifest; larger ones their size alone


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file under `folder` (but `skip`): its size, and its sha256 where that is cheap."""
    manifest = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name not in skip:
            size = path.stat().st_size
            manifest[name] = {"size": size, **({"sha256": file_digest(path)} if size <= DIGEST_LIMIT else {})}
    return manifest


def manifest_problem(folder: Path, manifest: dict[str, dict]) -> str | None:
    """What is wrong with `folder` against its manifest (a file missing, cut short or changed); None when whole."""
    for name, facts in manifest.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != facts["size"]:
            return f"{path} has {path.stat().st_size} bytes, {facts['size']} were written"
        if "sha256" in facts and file_digest(path) != facts["sha256"]:
            return f"{path} changed since it was written"
    return None


def move_aside(path: Path) -> Path:
    """Rename a file that failed to load to `<name>.corrupt-<n>` beside it (kept for a look, never read again)."""
    n = 0
    while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(path, aside)
    return aside


def sha256_of(*parts: Any) -> str:
    """Hash of JSON-able values: the key of a stage output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def hash_files(paths: list[Path], root: Path) -> str:
    """Hash of the files' names (relative to `root`, so a clone elsewhere gets the same hash) and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# Packages whose __init__ only registers their modules by name: a job names its own method and family, so following
# a registry would make every job's key depend on every method.
REGISTRIES = ("style_factory.methods", "style_factory.families")


def module_file(module: str) -> Path | None:
    """The source file of a `style_factory.` module, or None for anything else."""
    parts = module.split(".")
    if parts[0] != "style_factory":
        return None
    path = PACKAGE_DIR.joinpath(*parts[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """The `style_factory.` modules a source file imports, at the top or inside a function (`from style_factory import x`
    counts as `style_factory.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if (file := module_file(name)) is not None and file.is_file()}


def code_version(*modules: str) -> str:
    """Hash of the source of `modules` (e.g. "style_factory.loop") and of every pipeline module they import, directly or
    not, except through a registry: the code a stage's output depends on, and no more."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name in REGISTRIES:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name))
    return hash_files([module_file(name) for name in seen], PACKAGE_DIR)[:16]
