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


def hash_errors(folder: Path, expected: dict[str, str]) -> list[str]:
    """One line per missing or altered file of ``expected`` (relative path -> sha256)."""
    errors = []
    for rel, digest in expected.items():
        p = folder / rel
        if not p.is_file():
            errors.append(f"file {rel} is missing")
        elif sha256_file(p) != digest:
            errors.append(f"file {rel} does not match its sha256 in manifest.json (altered or truncated)")
    return errors


def verify_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    """UserError naming the first missing or altered file."""
    errors = hash_errors(folder, expected)
    if errors:
        state = "incomplete" if errors[0].endswith("is missing") else "corrupted"
        raise UserError(f"{what} {folder} is {state}: {errors[0]}")


def read_manifest(folder: Path, what: str, fmt: str, create_hint: str, corrupt_exit: int = 1) -> dict:
    """The manifest.json of an epts-export folder (artifact, export, bundle), checked for its
    format; one-line UserErrors for a missing folder, no manifest, bad JSON or another format."""
    mf = folder / "manifest.json"
    if not folder.exists():
        raise UserError(f"{what} not found: {folder}")
    if not mf.is_file():
        raise UserError(f"{folder} is not an epts-export {what} (no manifest.json); {create_hint}")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mf} is not valid JSON ({e.msg}); the {what} is corrupted", corrupt_exit) from None
    if manifest.get("format") != fmt:
        raise UserError(f"{folder} is not an epts-export {what} (its manifest is format {manifest.get('format')!r}); {create_hint}")
    return manifest


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
