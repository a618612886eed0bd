"""The weight files of a Hugging Face folder: which they are, one digest over them, and the model's
parameter count read from the safetensors headers (no weight loaded)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ..errors import UserError
from ..fsutil import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(folder: Path) -> list[Path]:
    """The weight files at the top of ``folder``: safetensors if there are any, else .bin/.pt/.pth."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    except OSError:
        return []
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def weight_params(folder: Path) -> int | None:
    """Parameters of a Hugging Face folder's model, read from its safetensors headers (no weights
    loaded); None when its weights are not safetensors. A header that cannot be read is a UserError."""
    files = [p for p in weight_files(Path(folder)) if p.suffix == ".safetensors"]
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


def folder_sha256(folder: Path, files: list[Path]) -> str:
    """sha256 over ``"<sha256>  <name>\\n"`` lines (like sha256sum), one per weight file, sorted by name."""
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n"
                    for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix()))
    return hashlib.sha256(lines.encode()).hexdigest()
