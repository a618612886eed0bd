"""ONNX graph work after tracing: naming, saving, the sparsity check, and dynamic-mode surgery.

Dynamic mode (``make_elastic``) replaces each prunable initializer ``W_t`` (in, out) by a
subgraph that builds the selected level's weight on every run:

    code  = per-weight uint8 code (two 4-bit codes per byte when they fit)
    keep  = ((code << shl[level]) >> shr[level]) >= thr[level]      the level's mask
    delta = A_t[:, ranks(level)] @ B_t[ranks(level), :]             the level's adapters (scale folded into B_t)
    W_t   = Where(keep, W_dense_t + delta, 0)

A code packs the mask of every exported level: its low bits count the unstructured levels that
keep the weight (masks are nested, so "kept at the j-th least sparse level" is "count >= j"),
and one bit per N:M level follows. ``shl``/``shr``/``thr`` select one level's field, so one
code path serves every level. ``ranks(level)`` lists the adapter ranks of the level's groups
per block (none for a low-group level in a block whose low-group check failed), padded with a
zero rank and cut by ``Slice`` to its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .errors import UserError
from .levels import Level, active_groups, unstructured_group
from .masks import keep_count, nm_mask

EXTERNAL_LIMIT = 2 * 1024**3 - 64 * 1024**2
DATA_FILE = "model.onnx_data"


def load(path: Path) -> onnx.ModelProto:
    """Load a graph and its external data; UserError for a file that is not a readable ONNX model."""
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def initializer_bytes(graph: onnx.ModelProto) -> int:
    return sum(_nbytes(t) for t in graph.graph.initializer)


def _nbytes(t: onnx.TensorProto) -> int:
    n = math.prod(t.dims)
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def save(graph: onnx.ModelProto, path: Path, external: str = "auto") -> None:
    """Write ``graph`` to ``path``; weights go to ``model.onnx_data`` beside it when the graph
    passes protobuf's 2 GB limit (``external='auto'``), always, or never."""
    use_external = external == "always" or (external == "auto" and initializer_bytes(graph) > EXTERNAL_LIMIT)
    if use_external:
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(graph, str(path))
    onnx.checker.check_model(str(path))


def consumers(graph: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """tensor name -> [(node, input index)] over the main graph."""
    out: dict[str, list] = {}
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def _rename(graph: onnx.ModelProto, mapping: dict[str, str]) -> None:
    for t in graph.graph.initializer:
        if t.name in mapping:
            t.name = mapping[t.name]
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def finalize(graph: onnx.ModelProto, weights: dict[str, str], metadata: dict[str, str]) -> None:
    """Strip the tracing wrapper's prefix from initializer names, check that every prunable
    weight is an initializer feeding MatMul directly, and set producer and metadata."""
    _rename(graph, {t.name: t.name[2:] for t in graph.graph.initializer if t.name.startswith("m.")})
    names = {t.name for t in graph.graph.initializer}
    missing = [w for w in weights if w not in names]
    if missing:  # e.g. deduplicated by value during export: identical weights cannot keep their own names
        raise RuntimeError(f"export lost the names of {len(missing)} prunable weights, first {missing[0]}")
    graph.producer_name = "epts-export"
    from . import __version__

    graph.producer_version = __version__
    del graph.metadata_props[:]
    for k, v in metadata.items():
        graph.metadata_props.add(key=k, value=v)


def metadata(graph: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in graph.metadata_props}


def _initializers(graph: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    want = set(names)
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer if t.name in want}


def weight_sparsity(graph: onnx.ModelProto, weights: dict[str, str]) -> float:
    """Fraction of exact zeros over the prunable weight initializers."""
    zeros = total = 0
    for arr in _initializers(graph, weights).values():
        zeros += int((arr == 0).sum())
        total += arr.size
    return zeros / max(total, 1)


def check_sparsity(graph: onnx.ModelProto, weights: dict[str, str], level: Level,
                   expected_zeros: dict[str, np.ndarray] | None = None) -> dict:
    """Does sparsity survive in a baked graph? For every prunable weight initializer ``W_t`` (in, out):

    - it feeds MatMul directly as input B, and nothing else (no Reshape/Concat/Mul hiding it);
    - unstructured: each output column has at least the pruned count of zeros;
      N:M: every group of M consecutive elements along axis 0 (the reduction axis) has at most N non-zeros;
    - with ``expected_zeros`` (name -> bool (in, out), from the materialized PyTorch weights):
      exactly those zeros.

    Returns {"ok", "weights", "measured_sparsity", "failures": [str]}.
    """
    cons = consumers(graph)
    arrays = _initializers(graph, weights)
    failures: list[str] = []
    zeros = total = 0
    for name in weights:
        if name not in arrays:
            failures.append(f"{name}: not an initializer of the graph")
            continue
        w = arrays[name]
        zeros += int((w == 0).sum())
        total += w.size
        users = cons.get(name, [])
        bad = [f"{n.op_type}[{i}]" for n, i in users if not (n.op_type == "MatMul" and i == 1)]
        if not users or bad:
            failures.append(f"{name}: consumed by {', '.join(bad) or 'nothing'}, not directly by MatMul as its weight")
        k, n_out = w.shape
        if level.is_nm:
            if k % level.m:
                failures.append(f"{name}: reduction axis {k} is not a multiple of {level.m}")
            else:
                nz = (w != 0).reshape(k // level.m, level.m, n_out).sum(axis=1)
                if (nz > level.n).any():
                    failures.append(f"{name}: {int((nz > level.n).sum())} groups along axis 0 have more than {level.n} of {level.m} non-zeros")
        else:
            need = k - keep_count(k, level.sparsity)
            short = int(((w == 0).sum(axis=0) < need).sum())
            if short:
                failures.append(f"{name}: {short} output columns have fewer than {need} zeros of {k}")
        if expected_zeros is not None and name in expected_zeros:
            diff = int(((w == 0) != expected_zeros[name]).sum())
            if diff:
                failures.append(f"{name}: {diff} weights differ from the materialized zero pattern")
    return {"ok": not failures, "weights": len(weights), "measured_sparsity": round(zeros / max(total, 1), 6),
            "failures": failures}


# --------------------------------------------------------------------------------------------
# dynamic mode


@dataclass
class ElasticTables:
    """Everything ``make_elastic`` adds, as numpy arrays (see the module docstring)."""

    levels: list[Level]
    packed: bool  # two 4-bit codes per byte (columns j and j + out/2)
    shl_lo: np.ndarray  # (levels,) uint8
    shl_hi: np.ndarray  # (levels,) uint8, packed only
    shr: np.ndarray  # (levels,) uint8
    thr: np.ndarray  # (levels,) uint8
    codes: dict[str, np.ndarray]  # weight name -> (in, out) or (in, out/2) uint8
    lora_a_t: dict[str, np.ndarray]  # weight name -> (in, R+1), last column zero
    lora_b_t: dict[str, np.ndarray]  # weight name -> (R+1, out), scale folded, last row zero
    block_of: dict[str, int]  # weight name -> block
    rank_idx: list[np.ndarray]  # per block (levels, max_r) int64, padded with R (the zero rank)
    rank_cnt: list[np.ndarray]  # per block (levels,) int64, >= 1

    @classmethod
    @torch.no_grad()
    def build(cls, em, levels: list[Level], weights: dict[str, str], fam, dtype: torch.dtype) -> "ElasticTables":
        from .artifact import tensor_key

        art = em.artifact
        groups = art.groups
        unstructured = sorted((lv for lv in levels if not lv.is_nm), key=lambda lv: lv.sparsity)
        nm_levels = [lv for lv in levels if lv.is_nm]
        ub = len(unstructured).bit_length()  # bits for "kept at how many unstructured levels" (0..u)
        bits = ub + len(nm_levels)
        if bits > 8:
            raise UserError(f"dynamic mode packs every level's mask into 8 bits per weight; {len(unstructured)} unstructured "
                            f"and {len(nm_levels)} N:M levels need {bits}: export fewer levels or use --mode baked")
        outs = {em.dense[(i, n)].shape[0] for i, n in em.dense}
        packed = bits <= 4 and all(o % 2 == 0 for o in outs)
        L = len(levels)
        shl_lo, shl_hi, shr, thr = (np.zeros(L, np.uint8) for _ in range(4))
        for idx, lv in enumerate(levels):
            if lv.is_nm:
                q, w, t = ub + nm_levels.index(lv), 1, 1
            else:
                q, w, t = 0, ub, unstructured.index(lv) + 1
            span = 4 if packed else 8
            shl_lo[idx], shl_hi[idx], shr[idx], thr[idx] = 8 - q - w, span - q - w if packed else 0, 8 - w, t

        # adapters: keep only the groups some exported level uses, in a compact rank layout
        rank = em.rank
        used = sorted({g for lv in levels for g in active_groups(groups, lv)})
        pos = {g: k for k, g in enumerate(used)}  # group -> compact slot
        R = len(used) * rank
        in_low = [not lv.is_nm and unstructured_group(groups, lv.sparsity) == 0 for lv in levels]
        rank_idx, rank_cnt = [], []
        for b in range(len(em.low_flags)):
            rows = []
            for idx, lv in enumerate(levels):
                gs = [] if (in_low[idx] and not em.low_flags[b]) else active_groups(groups, lv)
                rows.append([pos[g] * rank + j for g in gs for j in range(rank)] or [R])
            width = max(len(r) for r in rows)
            rank_idx.append(np.array([r + [R] * (width - len(r)) for r in rows], dtype=np.int64))
            rank_cnt.append(np.array([len(r) for r in rows], dtype=np.int64))

        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        sel = torch.tensor([g * rank + j for g in used for j in range(rank)], dtype=torch.long)
        codes, lora_a_t, lora_b_t, block_of = {}, {}, {}, {}
        by_module = {module: name for name, module in weights.items()}
        for (i, n), dense in em.dense.items():
            name = by_module[f"{fam.blocks}.{i}.{n}"]
            order = em.tensors[tensor_key(i, n, "order")]  # (out, in)
            code = torch.zeros(order.shape, dtype=torch.uint8)
            for lv in unstructured:
                code += (order < keep_count(order.shape[1], lv.sparsity)).to(torch.uint8)
            for t, lv in enumerate(nm_levels):
                code |= nm_mask(order, lv.n, lv.m).to(torch.uint8) << (ub + t)
            code = code.t().contiguous()  # (in, out), like W_t
            if packed:
                half = code.shape[1] // 2
                code = code[:, :half] | (code[:, half:] << 4)
            codes[name] = code.numpy()
            A = em.tensors[tensor_key(i, n, "lora_A")][sel]  # (R, in)
            B = em.tensors[tensor_key(i, n, "lora_B")][:, sel] * em.scale  # (out, R)
            a_t = torch.cat([A.t(), torch.zeros(A.shape[1], 1)], dim=1)  # (in, R+1)
            b_t = torch.cat([B.t(), torch.zeros(1, B.shape[0])], dim=0)  # (R+1, out)
            lora_a_t[name], lora_b_t[name] = a_t.numpy().astype(np_dtype), b_t.numpy().astype(np_dtype)
            block_of[name] = i
        return cls(levels, packed, shl_lo, shl_hi, shr, thr, codes, lora_a_t, lora_b_t, block_of, rank_idx, rank_cnt)


def make_elastic(graph: onnx.ModelProto, tables: ElasticTables) -> None:
    """Add the ``sparsity_level`` input and replace every prunable initializer by its run-time
    subgraph (module docstring). Out-of-range levels: the weights of level 0 are built, and every
    output is NaN, so a wrong index can never pass for a real level's output."""
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    L = len(tables.levels)
    g.input.append(helper.make_tensor_value_info("sparsity_level", TensorProto.INT64, []))
    p = "epts/"
    lvl = "sparsity_level"
    ge = node("GreaterOrEqual", [lvl, const(p + "zero_i64", np.array(0, np.int64))], p + "ge0")
    lt = node("Less", [lvl, const(p + "n_levels", np.array(L, np.int64))], p + "lt_n")
    valid = node("And", [ge, lt], p + "valid")
    idx = node("Where", [valid, lvl, p + "zero_i64"], p + "idx")
    shl_lo = node("Gather", [const(p + "shl_lo_table", tables.shl_lo), idx], p + "shl_lo")
    shl_hi = node("Gather", [const(p + "shl_hi_table", tables.shl_hi), idx], p + "shl_hi") if tables.packed else None
    shr = node("Gather", [const(p + "shr_table", tables.shr), idx], p + "shr")
    thr = node("Gather", [const(p + "thr_table", tables.thr), idx], p + "thr")
    const(p + "starts", np.array([0], np.int64))
    ranks = {}
    for b, (ri, rc) in enumerate(zip(tables.rank_idx, tables.rank_cnt)):
        row = node("Gather", [const(f"{p}block{b}/rank_idx_table", ri), idx], f"{p}block{b}/rank_idx_row")
        cnt = node("Gather", [const(f"{p}block{b}/rank_cnt_table", rc), idx], f"{p}block{b}/rank_cnt")
        cnt1 = node("Unsqueeze", [cnt, const(f"{p}block{b}/axes0", np.array([0], np.int64))], f"{p}block{b}/rank_cnt_1d")
        ranks[b] = node("Slice", [row, p + "starts", cnt1], f"{p}block{b}/ranks")

    for name, code in tables.codes.items():
        dense = inits[name]
        elem = dense.data_type
        dense.name = name + ".dense"  # same data, new name: the dense W_t (in, out)
        zero = const(name + ".zero", np.zeros((), helper.tensor_dtype_to_np_dtype(elem)))
        c = const(name + ".codes", code)
        lo = node("BitShift", [node("BitShift", [c, shl_lo], name + "/lo_l", direction="LEFT"), shr], name + "/lo", direction="RIGHT")
        if tables.packed:
            hi = node("BitShift", [node("BitShift", [c, shl_hi], name + "/hi_l", direction="LEFT"), shr], name + "/hi", direction="RIGHT")
            field = node("Concat", [lo, hi], name + "/field", axis=1)
        else:
            field = lo
        keep = node("GreaterOrEqual", [field, thr], name + "/keep")
        a = node("Gather", [const(name + ".lora_a_t", tables.lora_a_t[name]), ranks[tables.block_of[name]]], name + "/a", axis=1)
        bt = node("Gather", [const(name + ".lora_b_t", tables.lora_b_t[name]), ranks[tables.block_of[name]]], name + "/b", axis=0)
        delta = node("MatMul", [a, bt], name + "/delta")
        merged = node("Add", [dense.name, delta], name + "/merged")
        node("Where", [keep, merged, zero], name)  # the tensor the MatMul consumed as an initializer before

    # NaN guard on every output
    out_names = [o.name for o in g.output]
    guard = {}
    for o in g.output:
        et = o.type.tensor_type.elem_type
        if et not in guard:
            nan = const(f"{p}nan_{et}", np.array(np.nan, helper.tensor_dtype_to_np_dtype(et)))
            z = const(f"{p}zero_{et}", np.array(0, helper.tensor_dtype_to_np_dtype(et)))
            guard[et] = node("Where", [valid, z, nan], f"{p}guard_{et}")
    raw = {n: n + "/unguarded" for n in out_names}
    for nd in g.node:
        for i, x in enumerate(nd.output):
            if x in raw:
                nd.output[i] = raw[x]
        for i, x in enumerate(nd.input):
            if x in raw:
                nd.input[i] = raw[x]
    for o in g.output:
        node("Add", [raw[o.name], guard[o.type.tensor_type.elem_type]], o.name)

    # the weight subgraphs must run before their consumers: put them first (inputs only depend on
    # initializers and sparsity_level); the guards go last
    weight_nodes, tail = [], []
    for n in nodes:
        (tail if n.name.startswith(p + "guard") or n.output[0] in out_names else weight_nodes).append(n)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(weight_nodes + rest + tail)
    g.initializer.extend(new_inits)
