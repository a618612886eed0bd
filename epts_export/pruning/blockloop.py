"""The block loop shared by EPTS and the baselines (SparseGPT/Wanda style).

1. ``capture_block_inputs`` runs the model up to its first block and records, per calibration
   sequence, the hidden states entering block 0 and the keyword arguments the model passes to
   its blocks (attention mask, rotary embeddings, ...). Those keyword arguments are the same for
   every sequence of one length, so they are captured once.
2. The caller walks the blocks one at a time: move the block to the device, do its work,
   compute the next block's inputs, move it back (``inps, outs = outs, inps``).

Only one block lives on the device at a time; its cached inputs live there too when they fit
(``preflight.plan`` decides), so a 7B model fits one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.families import Family, get_blocks


class _StopForward(Exception):
    """Raised by the catcher once block 0's inputs are recorded; nothing after it needs to run."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, sink: list):
        super().__init__()
        self.block = block
        self.sink = sink

    def __getattr__(self, name: str):
        # the model's layer loop may read attributes of its blocks (Qwen2/3 under transformers 4.x
        # read ``attention_type`` to pick the mask): answer for the block we stand in for
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states.detach(), args, kwargs))
        raise _StopForward


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one (1, T, C) float32 tensor per calibration sequence, on CPU
    kwargs: dict[str, Any]  # keyword arguments every block receives (captured from the model)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, fam: Family, samples: torch.Tensor) -> BlockInputs:
    """Hidden states entering block 0 for each row of ``samples`` (N, T) token ids, plus block kwargs.

    The model stays where it is (CPU); only embeddings run. Positional arguments beyond the hidden
    states are not expected (transformers passes everything else by keyword) and are rejected.
    """
    blocks = get_blocks(model, fam)
    sink: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, sink)
    try:
        for row in samples:
            try:
                model(input_ids=row.unsqueeze(0), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
    assert len(sink) == len(samples), "the model never reached its first block"
    _, args, kwargs = sink[0]
    assert not args, f"block 0 received positional arguments {len(args)}; only keywords are supported"
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return BlockInputs(hidden=[h.float().cpu() for h, _, _ in sink], kwargs=kwargs)


def block_output(out: Any) -> torch.Tensor:
    """Blocks return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, device: torch.device | str,
              advance=lambda n: None, out_device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Forward every cached sequence through ``block`` on ``device``; outputs go to ``out_device``
    (the CPU unless the streams stay on the GPU). ``advance(1)`` is called after each sequence."""
    outs = []
    for h in hidden:
        outs.append(block_output(block(h.to(device), **kwargs)).float().to(out_device))
        advance(1)
    return outs
