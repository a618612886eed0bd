"""Files on both sides: sha256, one atomic writer and one manifest reader.

Every folder the pipeline writes (elastic artifact, ONNX export, bundle, converted model) has a
``manifest.json`` that names its format and schema version and the sha256 of every other file
(``read_manifest``, ``hash_errors``); files are written whole or not at all (``atomic_path``).
Standard library only: it ships in bundles (``epts_export.device``). The host's staged folders and
destination checks are ``epts_export.fsutil``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from .errors import UserError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# one atomic writer


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block
    completes and is removed when it raises, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------
# one manifest reader


@dataclass(frozen=True)
class ManifestFormat:
    """What a folder's manifest.json must say: its ``format`` and ``schema_version``."""

    format: str  # "epts-elastic", "epts-onnx", "epts-bundle", ...
    schema_version: int
    what: str  # how errors name the folder: "artifact", "ONNX export", "bundle"
    create_hint: str  # how to make one: "create one with `epts-export optimize`"
    upgrade_hint: str = "re-create it with this version or install the epts-export that wrote it"
    fields: tuple[tuple[str, type], ...] = ()  # required top-level keys and their JSON types

    def header(self) -> dict:
        """The first two keys of a manifest of this format."""
        return {"format": self.format, "schema_version": self.schema_version}


def read_manifest(folder: Path, fmt: ManifestFormat, corrupt_exit: int = 1) -> dict:
    """The manifest.json of ``folder``, checked for its format and schema version. One-line
    UserErrors for a missing folder, no manifest, bad JSON, another format, or a schema that is
    newer or older than the one this epts-export reads."""
    folder = Path(folder)
    mf = folder / MANIFEST
    if not folder.exists():
        raise UserError(f"{fmt.what} not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not an epts-export {fmt.what} folder; {fmt.create_hint}")
    if not mf.is_file():
        raise UserError(f"{folder} is not an epts-export {fmt.what} (no {MANIFEST}); {fmt.create_hint}")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{mf} is not UTF-8 text (byte {e.start}); the {fmt.what} is corrupted", corrupt_exit) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{mf} is not valid JSON ({e.msg}); the {fmt.what} is corrupted", corrupt_exit) from None
    except OSError as e:
        raise UserError(f"cannot read {mf}: {e.strerror or e}", corrupt_exit) from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.format:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{folder} is not an epts-export {fmt.what} (its manifest is format {got!r}); {fmt.create_hint}")
    version = manifest.get("schema_version")
    if version != fmt.schema_version:
        age = ("newer than" if isinstance(version, int) and version > fmt.schema_version else "not")
        raise UserError(f"{fmt.what} {folder} has schema version {version!r}, {age} the version {fmt.schema_version} "
                        f"this epts-export reads; {fmt.upgrade_hint}")
    for key, kind in (*fmt.fields, ("files", dict)):
        check_type(manifest, key, kind, f"{mf}", corrupt_exit)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise UserError(f"{mf}: 'files' must map relative paths to sha256 strings; the {fmt.what} is corrupted", corrupt_exit)
    return manifest


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def check_type(record: dict, key: str, kind: type, where: str, exit_code: int = 1):
    """``record[key]``, which must exist and be of JSON type ``kind``; UserError naming ``where`` otherwise."""
    if key not in record:
        raise UserError(f"{where}: '{key}' is missing; the file is corrupted or was not written by epts-export", exit_code)
    value = record[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise UserError(f"{where}: '{key}' must be {_JSON_TYPES.get(kind, kind.__name__)}, got {type(value).__name__}; "
                        "the file is corrupted", exit_code)
    return value


# --------------------------------------------------------------------------------------------
# hashes


@dataclass(frozen=True)
class HashError:
    """One file of a manifest that is missing or does not match its sha256."""

    path: str  # relative posix path, as listed in the manifest
    missing: bool

    def __str__(self) -> str:
        if self.missing:
            return f"file {self.path} is missing"
        return f"file {self.path} does not match its sha256 in {MANIFEST} (altered or truncated)"

    def under(self, folder: str) -> bool:
        """Whether the file lies in ``folder`` ("" = the top level)."""
        parent = self.path.rpartition("/")[0]
        return parent == folder if not folder else self.path.startswith(folder.rstrip("/") + "/")


def hash_errors(folder: Path, expected: dict[str, str]) -> list[HashError]:
    """One HashError per missing or altered file of ``expected`` (relative path -> sha256)."""
    errors = []
    for rel, digest in expected.items():
        p = folder / rel
        if not p.is_file():
            errors.append(HashError(rel, missing=True))
        elif sha256_file(p) != digest:
            errors.append(HashError(rel, missing=False))
    return errors


def verify_hashes(folder: Path, expected: dict[str, str], what: str) -> None:
    """UserError naming the first missing or altered file."""
    errors = hash_errors(folder, expected)
    if errors:
        state = "incomplete" if errors[0].missing else "corrupted"
        raise UserError(f"{what} {folder} is {state}: {errors[0]}")


def inside(value, where: str, what: str = "'dir'", exit_code: int = 3) -> str:
    """``value`` as a relative posix path that stays inside its folder (no absolute path, '..',
    backslash or '~'); UserError naming ``where`` otherwise. Manifests name files and folders so."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: {what} must be a relative path", exit_code)
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value or value.startswith("~"):
        raise UserError(f"{where}: {what} {value!r} must be a path inside the folder", exit_code)
    return p.as_posix()
