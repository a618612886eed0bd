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
import stat
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


def replaceable(path: Path, flag: str = "output") -> None:
    """UserError unless ``path`` is absent or a regular file: a file is written by renaming a
    complete copy onto it, which would turn a symbolic link, a FIFO or a device node into a plain
    file (and never write where a link points)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{flag} {path} is {kind}: files are written whole and renamed into place, so give a new "
                        "path or a regular file")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block
    completes and is removed when it raises, so a reader never sees half a file. ``path`` must be
    absent or a regular file (``replaceable``)."""
    path = Path(path)
    replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        replaceable(path)  # not swapped for a link while we wrote
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
    if mf.is_symlink():
        raise UserError(f"{mf} is a symbolic link; the {fmt.what} is corrupted", corrupt_exit)
    try:
        manifest = load_json(mf.read_bytes(), f"{mf}", f"the {fmt.what} is corrupted", corrupt_exit)
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
    for rel in manifest["files"]:  # never read (or answer about) a file outside the folder
        if inside(rel, f"{mf}", "the listed file", corrupt_exit) != rel or rel == MANIFEST:
            raise UserError(f"{mf}: the listed file {rel!r} is not a plain path inside the folder", corrupt_exit)
    return manifest


def load_json(data: bytes | str, where: str, hint: str = "the file is corrupted", exit_code: int = 1):
    """JSON from ``data``, strictly: UTF-8, no NaN or Infinity, nesting the parser can hold (its
    recursion guard, not a crash); UserError naming ``where`` otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (byte {e.start}); {hint}", exit_code) from None

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}); {hint}", exit_code) from None
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be a file epts-export wrote; {hint}", exit_code) from None
    except ValueError as e:
        raise UserError(f"{where} is not valid JSON ({e}); {hint}", exit_code) from None


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
    link: bool = False  # a symbolic link on the way (folders hold plain files only)
    unlisted: bool = False  # present, but not in the manifest

    def __str__(self) -> str:
        if self.unlisted:
            return f"file {self.path} is not listed in {MANIFEST}"
        if self.link:
            return f"file {self.path} is or lies under a symbolic link (bundles and artifacts hold plain files only)"
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
        if linked(folder, rel):
            errors.append(HashError(rel, missing=False, link=True))
        elif not p.is_file():
            errors.append(HashError(rel, missing=True))
        elif sha256_file(p) != digest:
            errors.append(HashError(rel, missing=False))
    return errors


def unlisted_under(root: Path, rel_dir: str, listed, allowed=()) -> list[HashError]:
    """One HashError per entry below ``root/rel_dir`` that is not a folder and not in ``listed``
    or ``allowed`` (a FIFO, a device node or a link counts): what a runtime would find beside
    the files it loads, for example a graph's external data."""
    top = Path(root) / rel_dir
    out = []
    for p in sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else []:
        rel = p.relative_to(root).as_posix()
        if (p.is_symlink() or not p.is_dir()) and rel not in listed and rel not in allowed:
            out.append(HashError(rel, missing=False, unlisted=True))
    return out


def require_listed(files, folder: str, names, where: str, exit_code: int = 3) -> None:
    """UserError unless ``files`` (a manifest's) lists ``folder/name`` for every name: a runtime
    loads those, so they must be hashed."""
    missing = [rel for rel in (f"{folder}/{n}" if folder not in ("", ".") else n for n in names) if rel not in files]
    if missing:
        raise UserError(f"{where}: manifest.json does not list {', '.join(missing)}, which serving the level reads; "
                        "the folder is corrupted", exit_code)


def linked(folder: Path, rel: str) -> bool:
    """Whether ``folder/rel`` or a folder between ``folder`` and it is a symbolic link."""
    p = Path(folder)
    for part in PurePosixPath(rel).parts:
        p = p / part
        if p.is_symlink():
            return True
    return False


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
