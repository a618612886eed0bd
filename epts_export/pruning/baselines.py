"""One-level baselines through the same block loop: magnitude, Wanda, SparseGPT.

Reference behaviour (locuslab/wanda, IST-DASLab/sparsegpt): statistics of every prunable layer
of a block are gathered in one pass over the block's (already pruned-upstream) inputs, the
block is pruned, then re-run to produce the next block's inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .blockloop import run_block
from .distributed import LOCAL, Dist
from ..core.levels import Level
from ..core.masks import level_mask, magnitude_mask, importance_order, wanda_scores
from ..core.sparsegpt import sparsegpt_prune
from ..core.stats import HessianAccumulator, RowScalars

SPARSEGPT_BLOCKSIZE = 128


@torch.no_grad()
def prune_magnitude(linears: dict[str, nn.Linear], level: Level) -> None:
    for lin in linears.values():
        lin.weight.mul_(magnitude_mask(lin.weight, level).to(lin.weight.dtype))


@torch.no_grad()
def prune_block_calibrated(method: str, block: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
                           kwargs: dict, level: Level, device, advance=lambda n: None, *, dist: Dist = LOCAL,
                           streams_device="cpu") -> list[torch.Tensor]:
    """Prune one block (on ``device``) with Wanda or SparseGPT; return the next block's inputs (on
    ``streams_device``). ``inputs``: this rank's windows; the statistics are summed over the ranks
    before any mask is chosen, so every rank prunes the block the same way."""
    if method == "wanda":
        stats = {n: RowScalars(l.in_features, device) for n, l in linears.items()}

        def hook(name):
            def fn(_m, inp, _o):
                stats[name].add(inp[0])
            return fn
    else:
        stats = {n: HessianAccumulator(l.in_features, device) for n, l in linears.items()}

        def hook(name):
            def fn(_m, inp, _o):
                stats[name].add_batch(inp[0])
            return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    run_block(block, inputs, kwargs, device, advance)  # the hooks gather the statistics; outputs unused
    for h in handles:
        h.remove()
    if dist.world > 1:
        for n in linears:
            stats[n].combine(dist.all_reduce_)
    for n, lin in linears.items():
        if method == "wanda":
            mask = level_mask(importance_order(wanda_scores(lin.weight, stats[n].mean())), level)
            lin.weight.mul_(mask.to(lin.weight.dtype))
        else:
            nm = (level.n, level.m) if level.is_nm else None
            lin.weight.copy_(sparsegpt_prune(lin.weight, stats[n].H, sparsity=level.sparsity, nm=nm,
                                             blocksize=SPARSEGPT_BLOCKSIZE))
    # the next block's inputs, from the pruned block
    return run_block(block, inputs, kwargs, device, advance, out_device=streams_device)
