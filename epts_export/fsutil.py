"""Files: sha256, one atomic writer, one staged folder, and one manifest reader.

Every artifact of the pipeline (elastic artifact, ONNX export, bundle, converted model) is a
folder that appears only when complete (``staged_dir``), whose files are written whole or not at
all (``atomic_path``), with a ``manifest.json`` that names its format and schema version and the
sha256 of every other file (``read_manifest``, ``hash_errors``).

Standard library only: a copy of this module travels inside bundles with the device-side engine
builder, which must run where epts-export is not installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
PRIVATE_PREFIX = ".tmp-"


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


def normalize_modes(folder: Path) -> None:
    """Give every file and folder below ``folder`` the permissions the umask asks for, keeping
    execute bits: some writers create files 0600 (onnx's external data), and a bundle copied to a
    device for another user must stay readable."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *Path(folder).rglob("*")]:
        try:
            mode = path.stat().st_mode
            if path.is_dir():
                os.chmod(path, 0o777 & ~umask)
            else:
                execute = 0o111 if mode & 0o100 else 0
                os.chmod(path, (0o666 | execute) & ~umask)
        except OSError:
            pass


def vendor_package(dest: Path, files) -> Path:
    """Copy ``files`` (paths relative to the epts_export package) into ``dest/epts_export/``, with
    empty ``__init__.py`` files for the subpackages they use (the real ones may import more): the
    minimal package a bundle's scripts import on a device without epts-export. Returns ``dest``."""
    package = Path(__file__).resolve().parent
    for rel in files:
        write_bytes(Path(dest) / "epts_export" / rel, (package / rel).read_bytes())
    for sub in sorted({Path(rel).parent for rel in files} - {Path(".")}):
        init = Path(dest) / "epts_export" / sub / "__init__.py"
        if not init.exists():
            write_text(init, "")
    return Path(dest)


# --------------------------------------------------------------------------------------------
# one staged folder


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL_SUFFIX)


def _writable_parent(path: Path, flag: str) -> None:
    """UserError unless the nearest existing ancestor of ``path`` is a folder this process can write."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {parent} (permission denied); choose another {flag}")


def check_destination(final: Path, *, overwrite: bool = False, inputs=(), flag: str = "--out") -> None:
    """Before any work: UserError when the output folder ``final`` cannot be written, exists without
    ``overwrite``, is a file, or would replace (or lie inside) one of ``inputs``."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{flag} {final} is a file: give the path of a folder to create")
    if final.exists() and not overwrite:
        raise UserError(f"output {final} already exists: choose another {flag} or pass --overwrite")
    _writable_parent(final, flag)
    target = final.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise UserError(f"{flag} {final} would overwrite or nest inside the input {src}: choose another {flag}")


def check_output_file(path: Path, flag: str) -> None:
    """Before any work: UserError when the report file ``path`` cannot be written (a folder, under a file, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file path")
    _writable_parent(path, flag)


@contextlib.contextmanager
def staged_dir(final: Path, *, overwrite: bool = False, resumable: bool = False, resume: bool = False,
               private: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it becomes ``final`` only when the block completes.

    - default: the folder is ``<final>.partial``; one left by a killed run is replaced, and the
      folder is removed when the block raises. ``final`` existing is a UserError unless
      ``overwrite``.
    - ``resumable``: the partial folder holds work worth keeping. It is kept when the block
      raises (unless still empty), and an existing one is reused with ``resume`` or refused
      without it.
    - ``private``: the folder is unique to this process, so concurrent writers of a cache never
      share one; the first to finish wins, a later finisher discards its copy. ``final`` is left
      alone if it exists when the block completes.
    """
    final = Path(final)
    if not private:
        check_destination(final, overwrite=overwrite)
    if private:
        final.parent.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent))
        tmp = holder / final.name
        tmp.mkdir()
    else:
        holder, tmp = None, partial_path(final)
        if tmp.exists() and resumable and not resume:
            raise UserError(f"{tmp} holds an interrupted run: pass --resume to continue it, or delete it to start over")
        if tmp.exists() and not resumable:  # left by a killed run
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {tmp}: {e.strerror or e}") from None
    try:
        yield tmp
        normalize_modes(tmp)
        if private:
            with contextlib.suppress(OSError):  # another process published first: keep theirs
                if not final.exists():
                    os.replace(tmp, final)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if not resumable or not any(tmp.iterdir()):  # an empty partial holds nothing to resume
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


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


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """relative posix path -> sha256 for every file below ``folder`` (sorted)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


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
