"""Model families: where the transformer blocks are and which linear layers are prunable.

Adding a family is one ``Family(...)`` entry: where its blocks are, which linears are prunable, and
how its config.json sizes a block (what the memory pre-flight needs before any weight is read).
How a block is *called* is not declared here: the block loop captures the exact arguments the
model passes to its first block (see ``blockloop.capture_block_inputs``), which keeps this table
free of per-version call signatures. Nothing outside this module branches on a model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Sizes:
    """One block of a model and what lies outside its blocks, from config.json alone."""

    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    kv_heads: int
    linears: tuple[tuple[int, int], ...]  # (out, in) of each prunable linear, in the family's order
    other: int  # the block's other parameters (norms, biases)
    outside: int  # the parameters outside the blocks (embeddings, final norm, an untied head)


def _llama_sizes(cfg: dict) -> Sizes:
    C, H, V, I = (int(cfg[k]) for k in ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size"))
    kvh = int(cfg.get("num_key_value_heads") or H)
    hd = int(cfg.get("head_dim") or C // H)
    q, kv = H * hd, kvh * hd
    other = 2 * C  # the two RMSNorms
    if cfg.get("attention_bias"):
        other += q + 2 * kv + C
    if cfg.get("mlp_bias"):
        other += 2 * I + C
    other += _LLAMA_EXTRAS.get(str(cfg.get("model_type")), lambda q, kv, hd: 0)(q, kv, hd)
    outside = V * C + (0 if cfg.get("tie_word_embeddings", False) else V * C) + C
    return Sizes(C, I, H, hd, kvh, ((q, C), (kv, C), (kv, C), (C, q), (I, C), (I, C), (C, I)), other, outside)


# what a LLaMA-family model type adds to a block beyond its config's attention_bias / mlp_bias
_LLAMA_EXTRAS: dict[str, Callable[[int, int, int], int]] = {
    "qwen2": lambda q, kv, hd: q + 2 * kv,  # q/k/v biases, always on
    "qwen3": lambda q, kv, hd: 2 * hd,  # q_norm and k_norm (per head dimension)
}


def _opt_sizes(cfg: dict) -> Sizes:
    C, H, V, I = (int(cfg[k]) for k in ("hidden_size", "num_attention_heads", "vocab_size", "ffn_dim"))
    bias = bool(cfg.get("enable_bias", True))
    norms = 2 * (2 * C if cfg.get("layer_norm_elementwise_affine", True) else 0)
    other = (4 * C + I + C if bias else 0) + norms
    proj = int(cfg.get("word_embed_proj_dim") or C)
    outside = (V * proj + (int(cfg.get("max_position_embeddings", 2048)) + 2) * C  # learned positions, offset 2
               + (2 * C * proj if proj != C else 0) + 2 * C  # project_in/out, the final LayerNorm
               + (0 if cfg.get("tie_word_embeddings", True) else V * proj))
    return Sizes(C, I, H, C // H, H, ((C, C), (C, C), (C, C), (C, C), (I, C), (C, I)), other, outside)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values served by this family
    blocks: str  # dotted path from the CausalLM to its nn.ModuleList of blocks
    prunable: tuple[str, ...]  # dotted names of the prunable nn.Linear inside a block, in forward order
    sizes: Callable[[dict], Sizes]  # config.json -> a block's sizes (KeyError / ValueError when one is missing)
    gated_mlp: bool  # gate * up (two more intermediate tensors per token for autograd) vs fc1 -> activation
    shared_inputs: tuple[tuple[str, ...], ...] = ()  # prunable linears of a block that read one tensor (int8's Q/DQ)
    final: tuple[str, ...] = ()  # modules between the last block and lm_head, in order (absent or None: skipped)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        prunable=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        sizes=_llama_sizes,
        gated_mlp=True,
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
        final=("model.norm",),
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        prunable=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        sizes=_opt_sizes,
        gated_mlp=False,
        shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
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


def head_logits(model: nn.Module, fam: Family, hidden):
    """Logits from the last block's output: the family's final modules, then lm_head."""
    for path in fam.final:
        parent, _, name = path.rpartition(".")
        module = getattr(model.get_submodule(parent), name, None)
        if module is not None:
            hidden = module(hidden)
    return model.lm_head(hidden)


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
