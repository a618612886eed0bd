"""Tracing a materialized model into the decoder graph of ``interface``.

Every prunable linear becomes ``MatMul(x, W_t)`` with ``W_t`` (in, out) a named initializer
``<module>.weight_t`` (+ ``Add`` of the bias): nothing sits between the weight and its MatMul,
and N:M groups of the torch weight's input axis land on axis 0 of ``W_t``, the reduction axis
that TensorRT's sparse kernels need. In fp16, LayerNorm and softmax are computed in float32.
``DecoderWithPast`` is both what is traced and the PyTorch reference of ``validate``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from ..device.interface import KVLayout, dynamic_axes, io_names
from ..models.families import Family, get_blocks, iter_prunable

# The dummy shapes the graph is traced with; validate uses other shapes on purpose.
DUMMY = {"batch": 2, "seq": 4, "past": 3}


class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits float32, *present).

    ``past`` is flat (key0, value0, key1, ...), each (batch, kv_heads, past, head_dim); a past
    length of 0 is a prefill. The same module is the PyTorch reference in ``validate``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model
        self.layers = model.config.num_hidden_layers
        # transformers 5 renamed the kwarg `past_key_values` to `cache` (with a deprecation shim)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{self.cache_kwarg: cache})
        pkv = out.past_key_values
        presents = []
        for i in range(self.layers):
            layer = pkv.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits.float(), *presents)


class MatMulLinear(nn.Module):
    """y = x @ weight_t (+ bias): exports as MatMul(x, weight_t) with weight_t (in, out) a named initializer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class Fp32LayerNorm(nn.Module):
    """LayerNorm computed in float32 for an fp16 graph (TensorRT takes precision from the graph)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False) if ln.bias is not None else None

    def forward(self, x):
        return nn.functional.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


@contextlib.contextmanager
def export_view(model: nn.Module, fam: Family, fp16: bool):
    """Swap every prunable nn.Linear for a MatMulLinear (and, in fp16, LayerNorms for fp32 ones)
    for the duration of an export; the original modules are put back afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module, name: str, new: nn.Module):
        swapped.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    for block in get_blocks(model, fam):
        for dotted in fam.prunable:
            parent_name, _, leaf = dotted.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            swap(parent, leaf, MatMulLinear(getattr(parent, leaf)))
    softmax = nn.functional.softmax
    if fp16:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm):
                    swap(parent, name, Fp32LayerNorm(child))

        def softmax_upcast(x, dim=None, _stacklevel=3, dtype=None):
            # HF calls softmax(x, dtype=float32), which the exporter writes as Softmax(fp16) -> Cast:
            # cast first, so that the Softmax itself runs in float32
            return softmax(x.to(dtype) if dtype is not None else x, dim=dim)

        nn.functional.softmax = softmax_upcast
    try:
        yield
    finally:
        nn.functional.softmax = softmax
        for parent, name, old in reversed(swapped):
            setattr(parent, name, old)


def prunable_weight_names(model: nn.Module, fam: Family) -> dict[str, str]:
    """initializer name -> torch module name for every prunable linear ("model.layers.0.mlp.up_proj.weight_t")."""
    out = {}
    for i, name, _ in iter_prunable(model, fam):
        module = f"{fam.blocks}.{i}.{name}"
        out[f"{module}.weight_t"] = module
    return out


def dummy_inputs(config, dtype: torch.dtype, batch: int, seq: int, past: int) -> tuple:
    """Tracing inputs: random ids, a full mask, positions after ``past`` random cached tokens."""
    geo = KVLayout.from_config(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=g).to(dtype) for _ in range(2 * geo.layers)]
    return (ids, mask, pos, *kv)


def _traceable_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                         **kwargs):
    """Causal + padding mask without vmap, for transformers 4.x, whose mask code uses torch.vmap,
    which the TorchScript tracer cannot follow. (batch, 1, q, kv) bool, True = attend.
    transformers 5 traces its own mask code; sliding windows are not reproduced here."""
    from transformers.masking_utils import prepare_padding_mask

    kv_idx = torch.arange(kv_length, device=cache_position.device) + kv_offset  # (kv,)
    mask = (kv_idx[None, :] <= cache_position[:, None])[None, None].expand(batch_size, 1, -1, -1)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (batch, kv) bool or None
    return mask if padding is None else mask & padding[:, None, None, :]


@contextlib.contextmanager
def _traceable_masks():
    import transformers
    from transformers import masking_utils as mu

    if int(transformers.__version__.split(".")[0]) >= 5 or not hasattr(mu, "sdpa_mask"):
        yield
        return
    original = mu.sdpa_mask
    mu.sdpa_mask = _traceable_sdpa_mask
    try:
        yield
    finally:
        mu.sdpa_mask = original


def trace_to_onnx(model: nn.Module, fam: Family, path: Path, opset: int, fp16: bool) -> None:
    """Trace ``model`` (already at its level, in its export dtype) into ``path`` (+ external data)."""
    layers = model.config.num_hidden_layers
    names_in, names_out = io_names(layers, dynamic=False)
    dtype = torch.float16 if fp16 else torch.float32
    args = dummy_inputs(model.config, dtype, **DUMMY)
    wrapper = DecoderWithPast(model).eval()
    with export_view(model, fam, fp16), _traceable_masks(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic_axes(layers), opset_version=opset, do_constant_folding=True,
                          dynamo=False)


def _set_attention(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


@contextlib.contextmanager
def traceable(em, fp16: bool):
    """An ElasticModel's model as it is traced: eager attention (sdpa does not trace into plain
    ONNX ops on every version), eval mode, half precision for fp16 graphs. On exit the model is
    what it was, bit for bit (its float32 parameters and buffers, its attention and cache
    settings; the prunable weights dense), so the one loaded model serves validation next."""
    model = em.model
    config = model.config
    attention, use_cache = getattr(config, "_attn_implementation", None), getattr(config, "use_cache", None)
    prunable = {f"{em.family.blocks}.{i}.{n}.weight" for i, n in getattr(em, "dense", None) or {}}
    saved = {} if not fp16 else {
        name: t.detach().clone() for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and name not in prunable}
    model.eval()
    _set_attention(model, "eager")
    if fp16:
        model.half()
    try:
        yield model
    finally:
        if fp16:
            model.float()
            tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            with torch.no_grad():
                for name, value in saved.items():
                    tensors[name].copy_(value)
        if getattr(em, "elastic", None) is not None and (fp16 or em.level is not None):
            em.at(None)  # the prunable weights from their float32 dense copies
        if attention is not None:
            _set_attention(model, attention)
        config.use_cache = use_cache
