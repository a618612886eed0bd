"""The cache of converted model folders: each built in a private temporary folder next to its final
place and renamed into place only when complete, with ``epts_source.json`` (the source record)
written last inside it. A folder at the final place is always whole, concurrent runs each build
their own copy and the first to finish wins, and an interrupted run leaves only a ``.tmp-*``
folder, which the next run ignores and cleans up."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError, one_line
from ..fsutil import PRIVATE_PREFIX, normalize_modes, staged_dir, write_text
from .weights import folder_sha256, weight_files

SOURCE_FILE = "epts_source.json"
"""Name of the source record inside every converted folder; its presence marks the folder complete."""

_FORMAT = 2  # bump when the layout of a converted folder changes; older folders are rebuilt
# 2: config.json carries rope_theta at the top level too (transformers 4.x read 10000 without it)
_STALE_TMP_SECONDS = 24 * 3600
# the temporary folders this module leaves beside the cache's folders while it works:
# PRIVATE_PREFIX + name + "-" + pid + "-" + random (staged_dir's and tempfile's naming)
_TMP_NAME = re.compile(re.escape(PRIVATE_PREFIX) + r"(?P<name>.+)-(?P<pid>\d+)-(?P<random>[^-]+)$")


def cache_dir() -> Path:
    """``$EPTS_CACHE`` if set, else ``$XDG_CACHE_HOME/epts-export``, else ``~/.cache/epts-export``."""
    explicit = os.environ.get("EPTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "epts-export"
    return Path.home() / ".cache" / "epts-export"


def complete_record(dest: Path) -> dict | None:
    """The source record of a complete converted folder at ``dest``, or None."""
    record = read_source(dest)
    if record is None or record.get("format") != _FORMAT or not record.get("sha256"):
        return None
    if not (dest / "config.json").is_file() or not weight_files(dest):
        return None
    return record


def read_source(folder: Path) -> dict | None:
    """The parsed ``epts_source.json`` of ``folder``, or None when it is missing or not a JSON object."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def build_cached(dest: Path, build: Callable[[Path, Path], dict]) -> dict:
    """Run ``build(out, work)`` in a private temporary folder that becomes ``dest`` once complete.

    ``build`` creates and fills ``out`` and returns the source record (without ``spec``); the cache
    adds ``format`` and ``folder_sha256`` and writes it to ``out/epts_source.json`` last. ``work`` is
    scratch space outside ``out``, removed afterwards. Returns the record of the folder now at
    ``dest``: ours, or that of a concurrent run which finished first.
    """
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {parent}: {one_line(exc)}; "
                        "set EPTS_CACHE to a writable folder") from exc
    _clean_stale_tmp(parent)
    if dest.exists() and complete_record(dest) is None:
        # an incomplete or outdated folder (not a run's: those appear whole): staged_dir would keep it
        _remove_tree(dest, parent)
    prefix = f"{PRIVATE_PREFIX}{dest.name}-work-{os.getpid()}-"  # named so _clean_stale_tmp knows its pid
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as scratch, \
            staged_dir(dest, private=True) as out:
        work = Path(scratch)
        out.rmdir()  # build() gets a path that does not exist yet, as save_pretrained-style writers expect
        record = {k: v for k, v in build(out, work).items() if k != "spec"}
        record["format"] = _FORMAT
        record["folder_sha256"] = folder_sha256(out, weight_files(out))
        write_text(out / SOURCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        normalize_modes(out)
        _fsync_tree(out)  # the rename that publishes the folder must not outlive its contents on a crash
    winner = complete_record(dest)
    if winner is None:  # neither ours nor anyone's: something at dest would not move out of the way
        raise UserError(f"could not place the converted model at {dest}; remove it and try again, "
                        "or set EPTS_CACHE to another folder")
    return record if winner == record else winner


def _remove_tree(path: Path, parent: Path) -> None:
    """Remove the folder ``path``: renamed aside first, so ``path`` is free at once even if removal is slow."""
    trash = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{path.name}-old-{os.getpid()}-", dir=parent))
    try:
        os.replace(path, trash / "old")
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _clean_stale_tmp(parent: Path) -> None:
    """Remove ``.tmp-*`` folders left by killed runs (their process is gone, or they are old)."""
    now = time.time()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PRIVATE_PREFIX) or not entry.is_dir():
            continue
        match = _TMP_NAME.match(entry.name)
        pid = int(match.group("pid")) if match else None
        try:
            old = now - entry.stat().st_mtime > _STALE_TMP_SECONDS
        except OSError:
            continue
        if old or (pid is not None and pid != os.getpid() and not _pid_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
