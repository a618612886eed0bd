"""Extracting a bundle shipped as a tar archive, trusting nothing but its manifest.

Every member is checked before anything is written: plain files and folders only (no links,
devices, absolute paths or '..'), one bundle per archive, and every file listed in the bundle's
manifest.json with its size. Files are then extracted one by one through sha256, so what lands on
disk is bounded by what the manifest lists and every byte is checked on the way.
Standard library only: it runs in the bundle's standalone runner too.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import EXIT_INTEGRITY, UserError
from .files import MANIFEST, load_json

MAX_MEMBERS = 100_000  # a bundle holds tens of files; an archive of more is not one
MAX_MANIFEST_BYTES = 64 << 20


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    if p.is_absolute() or m.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", m.name):
        raise UserError(f"unsafe tar {archive}: member {m.name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise UserError(f"unsafe tar {archive}: member {m.name!r} climbs out of the folder ('..'); refusing to extract")
    if m.issym() or m.islnk():
        raise UserError(f"unsafe tar {archive}: member {m.name!r} is a link ({m.linkname!r}); bundles hold plain files only")
    if not (m.isfile() or m.isdir()):
        raise UserError(f"unsafe tar {archive}: member {m.name!r} is not a plain file or folder")


def _scan(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for m in tar:  # streams the headers: a truncated archive fails here, before anything is written
        _check_member(archive, m)
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise UserError(f"{archive} has more than {MAX_MEMBERS} members: not an epts-export bundle", EXIT_INTEGRITY)
    return members


def _manifest(archive: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> tuple[PurePosixPath, dict]:
    """(the bundle's root inside the archive, its parsed manifest)."""
    found = [m for m in members if m.isfile() and PurePosixPath(m.name).name == MANIFEST
             and len(PurePosixPath(m.name).parts) <= 2]
    if not found:
        raise UserError(f"{archive} holds no manifest.json: not an epts-export bundle")
    if len(found) > 1:
        raise UserError(f"{archive} holds {len(found)} bundles ({', '.join(m.name for m in found)}): "
                        "ship one bundle per archive", EXIT_INTEGRITY)
    m = found[0]
    if m.size > MAX_MANIFEST_BYTES:
        raise UserError(f"{archive}: {m.name} is {m.size} bytes, too large for a manifest", EXIT_INTEGRITY)
    manifest = load_json(tar.extractfile(m).read(), f"{archive}: {m.name}", "the bundle is corrupted", EXIT_INTEGRITY)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{archive}: {m.name} lists no files; not an epts-export bundle", EXIT_INTEGRITY)
    return PurePosixPath(m.name).parent, manifest


def _plan(archive: Path, members, root: PurePosixPath, manifest: dict) -> list[tuple[tarfile.TarInfo, str]]:
    """(member, relative path) of every file to extract; UserError for any member the manifest does not list."""
    listed = manifest["files"]
    sizes = manifest.get("file_sizes") if isinstance(manifest.get("file_sizes"), dict) else {}
    folders = {"."} | {str(PurePosixPath(f).parent) for f in listed}
    folders |= {str(p) for f in listed for p in PurePosixPath(f).parents}
    plan, seen = [], set()
    for m in members:
        name = PurePosixPath(m.name)
        try:
            rel = name.relative_to(root).as_posix() if str(root) != "." else name.as_posix()
        except ValueError:
            raise UserError(f"{archive}: member {m.name!r} lies outside the bundle folder {root}/", EXIT_INTEGRITY) from None
        if m.isdir():
            if rel not in folders and str(name) != str(root):
                raise UserError(f"{archive}: folder {rel!r} is not part of the bundle (manifest.json lists no file in it)",
                                EXIT_INTEGRITY)
            continue
        if rel == MANIFEST:
            continue
        if rel not in listed:
            raise UserError(f"{archive}: member {rel!r} is not listed in the bundle's manifest.json; refusing to extract",
                            EXIT_INTEGRITY)
        if rel in seen:
            raise UserError(f"{archive}: member {rel!r} appears twice", EXIT_INTEGRITY)
        if rel in sizes and m.size != sizes[rel]:
            raise UserError(f"{archive}: member {rel!r} is {m.size} bytes, the manifest says {sizes[rel]}", EXIT_INTEGRITY)
        seen.add(rel)
        plan.append((m, rel))
    return plan


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive (.tar, .tar.gz, ...) into ``dest`` (module docstring); returns the
    bundle folder. UserError exit 1 for an unsafe archive, 3 for a truncated, altered or padded one."""
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _scan(archive, tar)
            root, manifest = _manifest(archive, tar, members)
            plan = _plan(archive, members, root, manifest)
            out = Path(dest) / root
            out.mkdir(parents=True, exist_ok=True)
            (out / MANIFEST).write_text(json.dumps(manifest))
            bad = []
            for m, rel in plan:
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
                if h.hexdigest() != manifest["files"][rel]:
                    bad.append(rel)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"{archive} is truncated or corrupted ({type(e).__name__}: {e or 'unexpected end'})",
                        EXIT_INTEGRITY) from None
    except OSError as e:
        raise UserError(f"cannot read {archive}: {e.strerror or e}") from None
    if bad:
        raise UserError(f"bundle {archive} failed verification: " + "; ".join(
            f"file {r} does not match its sha256 in manifest.json (altered or truncated)" for r in bad[:5]), EXIT_INTEGRITY)
    return out
