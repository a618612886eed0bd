"""Model families: where the transformer blocks are and which linear layers are prunable.

Adding a family is one ``Family(...)`` entry. How a block is *called* is not declared here: the
block loop captures the exact arguments the model passes to its first block (see
``blockloop.capture_block_inputs``), which keeps this table free of per-version call signatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values served by this family
    blocks: str  # dotted path from the CausalLM to its nn.ModuleList of blocks
    prunable: tuple[str, ...]  # dotted names of the prunable nn.Linear inside a block, in forward order


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        prunable=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        prunable=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
)


def supported_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_or_type: nn.Module | str) -> Family:
    """The family that serves a model (or a config.model_type); UserError listing the supported ones."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", "?")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UserError(f"unsupported architecture {model_type!r}: supported model types are {', '.join(supported_types())}")


def get_blocks(model: nn.Module, fam: Family) -> nn.ModuleList:
    return model.get_submodule(fam.blocks)


def prunable_linears(block: nn.Module, fam: Family) -> dict[str, nn.Linear]:
    """name -> nn.Linear for one block, in the family's order."""
    out = {}
    for name in fam.prunable:
        mod = block.get_submodule(name)
        assert isinstance(mod, nn.Linear), f"{fam.name}: {name} is {type(mod).__name__}, expected nn.Linear"
        out[name] = mod
    return out


def iter_prunable(model: nn.Module, fam: Family):
    """Yield (block_index, name, nn.Linear) over the whole model."""
    for i, block in enumerate(get_blocks(model, fam)):
        for name, lin in prunable_linears(block, fam).items():
            yield i, name, lin


@torch.no_grad()
def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all prunable linear weights of the model."""
    fam = family_for(model)
    zeros = total = 0
    for _, _, lin in iter_prunable(model, fam):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(total, 1)
