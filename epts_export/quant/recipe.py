"""An INT8 recipe for one level of a model: the smoothing factors and the activation ranges,
measured on calibration windows, and how they are folded into the model and stored.

Which tensors can be smoothed is a property of the family: a linear's input can be divided by s
only where the op that makes it can absorb the division exactly:

    llama  input_layernorm -> q, k, v       post_attention_layernorm -> gate, up
           up_proj (rows) -> down_proj      (silu(gate) * up / s: the product is linear in up)
    opt    self_attn_layer_norm -> q, k, v  final_layer_norm -> fc1
           fc1 (rows) -> fc2                (only with ReLU, which commutes with s > 0)

o_proj / out_proj read the attention output, whose producer (softmax-weighted v) is not folded
here. Stored per level in the export: ``quant.json`` (alpha, ranges, calibration) and
``quant.safetensors`` (the factors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.families import Family, get_blocks, iter_prunable
from .math import act_scale, smoothing_factors

FORMAT = "epts-int8"
VERSION = 1
RECIPE_JSON, RECIPE_TENSORS = "quant.json", "quant.safetensors"
# SmoothQuant's alpha for the pairs a norm feeds, then for the MLP pair (up -> down, fc1 -> fc2).
# SmolLM2-135M, six levels, both corpora (BENCHMARKS.md, INT8): 0.85 costs 4.1% perplexity on
# average, 0.5 30%, none 130%; 0.9 for the MLP pair, better on a small sample, 4.5%.
DEFAULT_ALPHA = (0.85, 0.85)


def parse_smooth(value) -> tuple[float, float]:
    """--smooth: "A" (every pair) or "A,B" (norm pairs, MLP pair), each in [0, 1); 0 = off."""
    if isinstance(value, (int, float)):
        parts = [float(value)]
    elif isinstance(value, (tuple, list)):
        parts = [float(v) for v in value]
    else:
        try:
            parts = [float(v) for v in str(value).split(",")]
        except ValueError:
            parts = []
    if len(parts) not in (1, 2) or not all(0.0 <= a < 1.0 for a in parts):
        raise UserError(f"--smooth {value} is out of range: give alpha, or alpha for the norm pairs and the MLP pair "
                        "(like 0.85,0.9), each from 0 (off) up to below 1")
    return (parts[0], parts[-1])


@dataclass(frozen=True)
class SmoothPair:
    source: str  # block-relative path of the norm or linear that makes the tensor
    kind: str  # "norm" (scale its weight and bias) | "linear" (scale its output rows and bias)
    consumers: tuple[str, ...]  # block-relative paths of the prunable linears that read it


def smooth_pairs(model: nn.Module, fam: Family) -> list[SmoothPair]:
    """The foldable (producer, consumers) pairs of one block of ``model`` (see the module docstring)."""
    cfg = model.config
    if fam.name == "llama":
        return [SmoothPair("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                SmoothPair("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
                SmoothPair("mlp.up_proj", "linear", ("mlp.down_proj",))]
    if fam.name == "opt":
        pairs = []
        if getattr(cfg, "do_layer_norm_before", True):  # OPT-350m normalizes after: nothing to fold into
            pairs += [SmoothPair("self_attn_layer_norm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                      SmoothPair("final_layer_norm", "norm", ("fc1",))]
        if getattr(cfg, "activation_function", "relu") == "relu":
            pairs.append(SmoothPair("fc1", "linear", ("fc2",)))
        return pairs
    return []


@dataclass
class Int8Recipe:
    """What quantizes one level: ``alpha`` (0 = no smoothing), the factors per block-qualified
    producer ("model.layers.3.input_layernorm" -> s (C,)), and the largest magnitude of each
    prunable linear's (smoothed) input ("model.layers.3.self_attn.q_proj" -> float)."""

    alpha: tuple[float, float]  # (norm pairs, MLP pair)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    act_amax: dict[str, float] = field(default_factory=dict)
    act_scale: dict[str, float] = field(default_factory=dict)  # module path -> its input's float32 scale
    calibration: dict | None = None

    def save(self, folder: Path) -> list[str]:
        """Write quant.json and quant.safetensors into ``folder``; returns their names."""
        from safetensors.torch import save_file

        from ..fsutil import write_json

        save_file({k: v.float().contiguous() for k, v in self.smooth.items()} or {"_none": torch.zeros(0)},
                  str(folder / RECIPE_TENSORS))
        write_json(folder / RECIPE_JSON, {
            "format": FORMAT, "version": VERSION, "alpha": list(self.alpha),
            "weights": "int8, symmetric, per output channel (axis 1 of each (in, out) MatMul weight)",
            "activations": "int8, symmetric, per tensor, scale = max |x| on the calibration set / 127",
            "smoothed": sorted(self.smooth), "act_amax": self.act_amax, "act_scale": self.act_scale,
            "calibration": self.calibration})
        return [RECIPE_JSON, RECIPE_TENSORS]

    @classmethod
    def load(cls, folder: Path) -> "Int8Recipe":
        """The recipe stored in an int8 level folder; UserError when it is missing or malformed."""
        from safetensors.torch import load_file

        from ..device.files import load_json

        path = folder / RECIPE_JSON
        if not path.is_file() or not (folder / RECIPE_TENSORS).is_file():
            raise UserError(f"{folder} has no {RECIPE_JSON} and {RECIPE_TENSORS}: it is not an int8 level of an export")
        meta = load_json(path.read_bytes(), str(path))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserError(f"{path} is not an {FORMAT} v{VERSION} recipe")
        try:
            tensors = load_file(str(folder / RECIPE_TENSORS))
            smooth = {k: tensors[k] for k in meta["smoothed"]}
            amax = {str(k): float(v) for k, v in meta["act_amax"].items()}
            scales = {str(k): float(v) for k, v in meta["act_scale"].items()}
            alpha = parse_smooth(meta["alpha"])
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise UserError(f"{folder}: the int8 recipe is incomplete ({type(e).__name__}: {e})") from None
        if set(scales) != set(amax) or not all(np.isfinite(v) and v > 0 for v in scales.values()):
            raise UserError(f"{path}: the activation scales are incomplete or not positive finite numbers")
        return cls(alpha, smooth, amax, scales, meta.get("calibration"))


@torch.no_grad()
def input_amax(model: nn.Module, fam: Family, windows: torch.Tensor, batch: int = 4,
               advance: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of every prunable linear over the calibration windows (N, T):
    module path -> (in_features,) float32."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(path: str):
        def record(_module, args):
            a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(dim=0)
            stats[path] = a if path not in stats else torch.maximum(stats[path], a)
        return record

    for i, name, lin in iter_prunable(model, fam):
        hooks.append(lin.register_forward_pre_hook(hook(f"{fam.blocks}.{i}.{name}")))
    try:
        model.eval()
        for i in range(0, len(windows), batch):
            x = windows[i: i + batch]
            model(input_ids=x, use_cache=False)
            advance(len(x))
    finally:
        for h in hooks:
            h.remove()
    return stats


def build_recipe(model: nn.Module, fam: Family, stats: dict[str, torch.Tensor], alpha,
                 calibration: dict | None = None) -> Int8Recipe:
    """The recipe of ``model`` (at its level, not smoothed) from its ``input_amax`` statistics;
    ``alpha``: one value or (norm pairs, MLP pair) (``parse_smooth``)."""
    alphas = parse_smooth(alpha)
    recipe = Int8Recipe(alphas, calibration=calibration)
    divisor: dict[str, torch.Tensor] = {}  # consumer path -> s its input was divided by
    for i, block in enumerate(get_blocks(model, fam)):
        for pair in smooth_pairs(model, fam):
            a_pair = alphas[0] if pair.kind == "norm" else alphas[1]
            if a_pair == 0:
                continue
            paths = [f"{fam.blocks}.{i}.{c}" for c in pair.consumers]
            a = torch.stack([stats[p] for p in paths]).amax(dim=0)  # the same tensor: equal up to hooks' order
            w = torch.stack([block.get_submodule(c).weight.detach().abs().float().amax(dim=0)
                             for c in pair.consumers]).amax(dim=0)  # (in,)
            s = smoothing_factors(a, w, a_pair)
            recipe.smooth[f"{fam.blocks}.{i}.{pair.source}"] = s
            divisor.update({p: s for p in paths})
    for path, a in stats.items():
        recipe.act_amax[path] = float((a / divisor[path]).max()) if path in divisor else float(a.max())
    for i in range(len(get_blocks(model, fam))):
        for readers in fam.shared_inputs:
            base = act_scale(max(recipe.act_amax[f"{fam.blocks}.{i}.{c}"] for c in readers))
            for k, c in enumerate(readers):  # one float32 ulp apart: three Q nodes ONNX Runtime keeps apart (quant.qdq)
                recipe.act_scale[f"{fam.blocks}.{i}.{c}"] = float(_ulps_up(base, k))
    for path, a in recipe.act_amax.items():
        recipe.act_scale.setdefault(path, float(np.float32(act_scale(a))))
    return recipe


def _ulps_up(x: float, k: int) -> np.float32:
    v = np.float32(x)
    for _ in range(k):
        v = np.nextafter(v, np.float32(np.inf))
    return v


@contextlib.contextmanager
@torch.no_grad()
def smoothed(model: nn.Module, fam: Family, smooth: dict[str, torch.Tensor], restore_prunable: Callable[[], None] | None = None):
    """``model`` with the factors folded in (producers divided by s, consumers' input columns
    multiplied by s): the same function, other numbers. On exit the producers' tensors are put
    back bit for bit; the prunable weights by ``restore_prunable`` (e.g. re-materializing the
    level) or, without it, from copies kept here."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    prunable_ids = {id(lin.weight) for _, _, lin in iter_prunable(model, fam)}

    def keep(t: torch.Tensor | None):
        if t is not None and (restore_prunable is None or id(t) not in prunable_ids):
            saved.append((t, t.detach().clone()))

    pairs = smooth_pairs(model, fam)
    try:
        for i, block in enumerate(get_blocks(model, fam)):
            for pair in pairs:
                key = f"{fam.blocks}.{i}.{pair.source}"
                if key not in smooth:
                    continue
                s = smooth[key]
                src = block.get_submodule(pair.source)
                if s.shape != src.weight.shape[:1]:
                    raise UserError(f"the int8 recipe's smoothing factors for {key} have {s.numel()} entries where the "
                                    f"model has {src.weight.shape[0]}: it belongs to another model; export the level again")
                keep(src.weight)
                keep(getattr(src, "bias", None))
                if pair.kind == "norm":
                    src.weight.div_(s.to(src.weight.dtype))
                else:
                    src.weight.div_(s.to(src.weight.dtype)[:, None])  # (out, in): its output rows
                if getattr(src, "bias", None) is not None:
                    src.bias.div_(s.to(src.bias.dtype))
                for c in pair.consumers:
                    lin = block.get_submodule(c)
                    keep(lin.weight)
                    lin.weight.mul_(s.to(lin.weight.dtype)[None, :])  # (out, in): its input columns
        yield model
    finally:
        for t, v in reversed(saved):
            t.copy_(v)
        if restore_prunable is not None:
            restore_prunable()


def recipe_summary(recipe: Int8Recipe) -> dict:
    """What a manifest records of a level's recipe."""
    return {"alpha": list(recipe.alpha), "smoothed": len(recipe.smooth), "activations": len(recipe.act_amax),
            "act_amax_max": round(max(recipe.act_amax.values(), default=0.0), 4)}

