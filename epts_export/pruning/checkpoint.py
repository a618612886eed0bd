"""The checkpoint of an EPTS run, in ``<out>.partial/ckpt/``: what ``--resume`` continues from.

    state.json                       the run's fingerprint, blocks done, world size, metrics so far
    block_<i>.safetensors            block i's importance orders, adapters and low-group flag
    streams[.rank<r>-of-<w>].safetensors   each rank's dense and sparse streams after the last block done

Written as each block completes (a file whole or not at all); merged into the artifact's
``elastic.safetensors`` at the end.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifact.folder import ARTIFACT, tensor_key
from ..errors import UserError
from ..fsutil import atomic_path
from .distributed import Dist

def streams_file(ckpt: Path, dist: Dist) -> Path:
    """This rank's streams checkpoint: one file per rank, on the rank's own machine."""
    return ckpt / ("streams.safetensors" if dist.world == 1 else f"streams.rank{dist.rank}-of-{dist.world}.safetensors")


def read_state(fingerprint: str, ckpt: Path, dist: Dist) -> dict | None:
    """The checkpoint state of an interrupted run (rank 0 reads it), or None for a fresh start."""
    state_file = ckpt / "state.json"
    if not state_file.exists():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{state_file} is corrupted ({e}): delete {ckpt.parent} to start over") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise UserError(f"{ckpt.parent} was started with a different model, calibration or settings; "
                        "delete it or re-run with the original arguments")
    world = state.get("world_size", 1)
    if world != dist.world:
        how = "without torchrun" if world == 1 else f"under torchrun with {world} processes in all"
        raise UserError(f"{ckpt.parent} was started with {world} process(es) and this run has {dist.world}: "
                        f"its streams are saved per process; resume it {how}, or delete it to start over")
    return state


def drop_worker_files(tmp: Path, dist: Dist) -> None:
    """A rank other than 0, once every block is done: its streams are not needed any more. On
    another machine than rank 0's, the folders it made are removed too once empty."""
    ckpt = tmp / "ckpt"
    streams_file(ckpt, dist).unlink(missing_ok=True)
    for folder in (ckpt, tmp):
        with contextlib.suppress(OSError):  # not empty (rank 0's machine) or already gone
            folder.rmdir()


def save_streams(path: Path, dense: list[torch.Tensor], sparse: list[torch.Tensor], done: int) -> None:
    """One rank's two streams as a safetensors file ("dense.<k>", "sparse.<k>", k = the rank's k-th
    window), written one window at a time: streams kept on the GPU pass through the host one
    window at a time, and CPU streams are written without a copy (safetensors' save_file would
    first build the whole file in memory)."""
    tensors = [(f"{name}.{k}", t) for name, stream in (("dense", dense), ("sparse", sparse)) for k, t in enumerate(stream)]
    header: dict = {"__metadata__": {"done": str(done), "windows": str(len(dense))}}
    offset = 0
    for key, t in tensors:
        assert t.dtype == torch.float32, f"{key} is {t.dtype}"
        nbytes = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            f.write(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))


def load_streams(path: Path, done: int, windows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's streams after block ``done``, from ``_save_streams``; UserError when the file is
    unreadable, or from another block or world size than the state says."""
    from safetensors import safe_open

    tensors = load_checkpoint(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - load_file just read it
        meta = {}
    if meta.get("done") != str(done) or meta.get("windows") != str(windows):
        raise UserError(f"checkpoint {path} holds the streams of {meta.get('windows', '?')} windows after block "
                        f"{meta.get('done', '?')}, but the run is at block {done} with {windows} windows on this rank "
                        f"(it was interrupted while saving): delete {path.parent.parent} to start over")
    return ([tensors[f"dense.{k}"] for k in range(windows)], [tensors[f"sparse.{k}"] for k in range(windows)])


def block_tensors(i: int, res) -> dict[str, torch.Tensor]:
    tensors = {}
    for n in res.order:
        tensors[tensor_key(i, n, "order")] = res.order[n].contiguous()
        tensors[tensor_key(i, n, "lora_A")] = res.lora_A[n].contiguous()
        tensors[tensor_key(i, n, "lora_B")] = res.lora_B[n].contiguous()
    tensors[f"blocks.{i}.low_group_lora"] = torch.tensor([res.low_group_lora])
    return tensors


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file of an interrupted run; UserError when it is missing or truncated."""
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be trusted either way
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}): "
                        f"delete {path.parent.parent} to start over") from None


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def merge_block_files(ckpt: Path, dest: Path, nblocks: int) -> None:
    tensors, flags = {}, []
    for i in range(nblocks):
        part = load_checkpoint(ckpt / f"block_{i:04d}.safetensors")
        flags.append(bool(part.pop(f"blocks.{i}.low_group_lora").item()))
        tensors.update(part)
    tensors["low_group_lora"] = torch.tensor(flags)
    save_tensors(tensors, dest, {"format": ARTIFACT.format, "schema_version": str(ARTIFACT.schema_version)})
