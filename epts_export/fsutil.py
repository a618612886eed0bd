"""Files: sha256, JSON, and folders that appear only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import UserError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, obj) -> None:
    """Write JSON via a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def file_hashes(folder: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """relative posix path -> sha256 for every file below ``folder`` (sorted)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def verify_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    """UserError naming the first missing or altered file."""
    for rel, digest in expected.items():
        p = folder / rel
        if not p.is_file():
            raise UserError(f"{what} {folder} is incomplete: file {rel} is missing")
        if sha256_file(p) != digest:
            raise UserError(f"{what} {folder} is corrupted: file {rel} does not match its sha256 in manifest.json (altered or truncated)")


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


@contextlib.contextmanager
def staged_dir(final: Path, overwrite: bool = False, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block completes.

    On error the temporary folder is removed, unless ``keep_on_error`` (resumable work keeps it).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"output {final} already exists: choose another --out or pass --overwrite")
    tmp = partial_path(final)
    if tmp.exists() and not keep_on_error:  # left by a killed run; only resumable work reuses it
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
