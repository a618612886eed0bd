"""Host-side folders: one staged folder, destination checks, permissions, and file lists.

Every artifact of the pipeline (elastic artifact, ONNX export, bundle, converted model) is a
folder that appears only when complete (``staged_dir``). Hashes, the atomic writer and the
manifest reader are ``device.files`` (they ship in bundles); they are imported here so that host
code finds every file helper in one place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .device.files import (MANIFEST, HashError, ManifestFormat, atomic_path, check_type, hash_errors,  # noqa: F401
                           read_manifest, replaceable, sha256_bytes, sha256_file, verify_hashes, write_bytes, write_json,
                           write_text)
from .errors import UserError

PARTIAL_SUFFIX = ".partial"
PRIVATE_PREFIX = ".tmp-"


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


def vendor_device(dest: Path) -> Path:
    """Copy the device package whole (``epts_export/device/``, every ``.py`` file, no caches) with
    the package's top ``__init__.py`` (which only sets ``__version__``) into
    ``dest/epts_export/``: what a bundle's scripts import on a device without epts-export. The
    device package imports only the standard library, numpy, tokenizers, onnxruntime and
    tensorrt (``tests/test_device_package.py``). Returns ``dest``."""
    package = Path(__file__).resolve().parent
    files = [Path("__init__.py"), *(p.relative_to(package) for p in sorted((package / "device").rglob("*.py")))]
    for rel in files:
        write_bytes(Path(dest) / "epts_export" / rel, (package / rel).read_bytes())
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


NAME_MAX = 255 - len(PARTIAL_SUFFIX) - 24  # room for the staging names beside it (.partial, .tmp-<pid>-...)


def _plain_path(path: Path, flag: str) -> None:
    """UserError for a path the shell did not expand (``~``) or whose name the file system cannot hold."""
    if str(path).startswith("~"):
        raise UserError(f"{flag} {path}: '~' was not expanded (quoted?); give the path as $HOME/... or unquoted")
    if len(os.fsencode(Path(path).name)) > NAME_MAX:
        raise UserError(f"{flag} {str(path)[:60]}...: the name is {len(os.fsencode(Path(path).name))} bytes, "
                        f"at most {NAME_MAX} fit beside its staging copy")


def check_destination(final: Path, *, overwrite: bool = False, inputs=(), flag: str = "--out") -> None:
    """Before any work: UserError when the output folder ``final`` cannot be written, exists without
    ``overwrite``, is a file or a symbolic link, or would replace (or lie inside) one of ``inputs``."""
    final = Path(final)
    _plain_path(final, flag)
    if final.is_symlink():
        raise UserError(f"{flag} {final} is a symbolic link: give the folder's real path ({os.path.realpath(final)})")
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
    _plain_path(path, flag)
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{flag} {path} is a folder: give a file path")
    _writable_parent(path, flag)
    replaceable(path, flag)


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
    lock = None
    if not private:
        check_destination(final, overwrite=overwrite)
    if private:
        final.parent.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent))
        tmp = holder / final.name
        tmp.mkdir()
    else:
        holder, tmp = None, partial_path(final)
        if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
            raise UserError(f"{tmp} is in the way (not a folder epts-export left): move it away")
        if tmp.exists() and resumable and not resume:
            _lock_partial(tmp, final).close()  # a live run is said as such, not as an interrupted one
            raise UserError(f"{tmp} holds an interrupted run: pass --resume to continue it, or delete it to start over")
        if tmp.exists() and not resumable:  # left by a killed run, unless a live one holds it
            _lock_partial(tmp, final).close()
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True, exist_ok=resumable)
        except FileExistsError:
            raise UserError(f"another epts-export began writing {final} just now: wait for it, or choose another "
                            "--out") from None
        except OSError as e:
            raise UserError(f"cannot create {tmp}: {e.strerror or e}") from None
        lock = _lock_partial(tmp, final)  # held until the folder is published or removed
    try:
        yield tmp
        normalize_modes(tmp)
        if private:
            with contextlib.suppress(OSError):  # another process published first: keep theirs
                if not final.exists():
                    os.replace(tmp, final)
        else:
            if (final.exists() or final.is_symlink()) and not overwrite:
                raise UserError(f"{final} appeared while this run wrote it (another epts-export?): this run's output "
                                f"is discarded; pass --overwrite to replace it")
            if final.is_symlink() or (final.exists() and not final.is_dir()):
                raise UserError(f"{final} became a link or a file while this run wrote it: this run's output is discarded")
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
        if lock is not None:
            lock.close()


class _PartialLock:
    """An exclusive flock on a staging folder, held by the run that writes it."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_partial(tmp: Path, final: Path) -> _PartialLock:
    """Lock ``tmp`` (a folder) for this process; UserError when another live run holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the publish-time checks remain
        return _PartialLock(None)
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot open {tmp}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another epts-export is writing {final} (it holds {tmp}): wait for it to finish or stop it, "
                        "or choose another --out") from None
    return _PartialLock(fd)


# --------------------------------------------------------------------------------------------
# file lists


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,), known: dict[str, str] | None = None) -> dict[str, str]:
    """relative posix path -> sha256 for every file below ``folder`` (sorted). ``known``: the
    hashes of files the caller copied here from a folder whose hashes it holds (not read again)."""
    out = {}
    known = known or {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = known[rel] if rel in known else sha256_file(p)
    return out


