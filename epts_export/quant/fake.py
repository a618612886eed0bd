"""The PyTorch reference of an int8 level: the smoothed model whose prunable linears quantize
their input per tensor and compute with their int8 weights dequantized (``quant.math``), in
float32. ``validate`` compares the int8 graph with it; ``eval`` measures its perplexity.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import UserError
from ..models.families import Family, get_blocks
from .math import fake_quantize_act, quantize_weight
from .recipe import Int8Recipe, smoothed


class FakeQuantLinear(nn.Module):
    """y = Q(x) @ Q(W)^T + b with Q(x) per tensor at ``scale`` and Q(W) per output channel."""

    def __init__(self, linear: nn.Linear, scale: float):
        super().__init__()
        q, w_scale = quantize_weight(linear.weight.detach().t())  # (in, out) int8, (out,)
        self.q_t, self.w_scale = q, w_scale  # what the graph must hold (``qdq.check_quantized``)
        self.weight = nn.Parameter((q.float() * w_scale).t().contiguous(), requires_grad=False)  # (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        self.scale = scale
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = nn.functional.linear(fake_quantize_act(x, self.scale), self.weight, self.bias)
        return y.to(x.dtype)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, fam: Family, recipe: Int8Recipe, restore_prunable=None):
    """``model`` smoothed by ``recipe`` with every prunable linear a FakeQuantLinear; everything
    is put back on exit (``recipe.smoothed``). Yields {module path: FakeQuantLinear}."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    with smoothed(model, fam, recipe.smooth, restore_prunable):
        try:
            linears = {}
            for i, block in enumerate(get_blocks(model, fam)):
                for dotted in fam.prunable:
                    path = f"{fam.blocks}.{i}.{dotted}"
                    parent_name, _, leaf = dotted.rpartition(".")
                    parent = block.get_submodule(parent_name) if parent_name else block
                    old = getattr(parent, leaf)
                    if path not in recipe.act_scale:
                        raise UserError(f"the int8 recipe has no activation scale for {path}: export the level again")
                    new = FakeQuantLinear(old, recipe.act_scale[path])
                    swapped.append((parent, leaf, old))
                    setattr(parent, leaf, new)
                    linears[path] = new
            yield linears
        finally:
            for parent, leaf, old in reversed(swapped):
                setattr(parent, leaf, old)
