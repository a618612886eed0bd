"""Dynamic mode: one graph with a ``sparsity_level`` input that builds each level's weights.

``make_elastic`` replaces each prunable initializer ``W_t`` (in, out) by a subgraph that builds the
selected level's weight on every run:

    keep = AND over code fields of  (packed << shl[level]) >= thr[level]      (uint8)
    W_t  = Gemm(A[rows(level)]^T, B_t[rows(level)], W_dense_t) * Cast(keep)

The codes hold every exported level's mask in a few bits per weight, in two fields: "bucket"
counts the unstructured levels that keep the weight (masks are nested, so "kept at the j-th
least sparse level" is "bucket >= j"; 2 bits for 3 levels, 4 bits for up to 15), and "nm" has
one bit per N:M level. Each field is packed ``8 // width`` slots per byte along axis 0, so one
shift (a uint8 Mul by 2**shl) over a broadcast (k, K/k, N) view, one compare and a free Reshape
unpack it. ``shl`` and ``thr`` select one level's bits (thr 0: the field does not constrain that
level). The adapters are the stacked A/B_t of the groups some exported level uses (scale folded
into B_t); ``rows(level)`` lists a block's adapter rows for the level (``core.rule``: none for a
low-group level in a block whose low-group check failed), padded with a zero row and cut by
``Slice``. Gemm adds A B to W in one pass; the mask is applied with Mul (ONNX Runtime's Where is
several times slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..core.levels import Level
from ..core.masks import level_mask
from ..core.rule import level_rule
from ..errors import UserError
from ..interface import LEVEL_INPUT

PREFIX = "epts/"  # names of the nodes and tables this module adds


def _slot_width(bits: int, rows: set[int]) -> int:
    """Bits per packed slot: the next power of two >= ``bits`` whose slots-per-byte divides every
    weight's row count (the packing axis), else 8."""
    for w in (1, 2, 4, 8):
        if w >= bits and all(r % (8 // w) == 0 for r in rows):
            return w
    return 8


@dataclass
class CodeField:
    """One packed array per weight: ``8 // width`` slots per byte along axis 0 (input rows
    j * in/k + c live in byte row c, slot j), and per level the shift and threshold that turn
    a slot into that level's keep bit: keep = (p << shl[level, j]) >= thr[level].

    The shift moves the level's bits to the top of the byte; whatever lower slots land below
    them is smaller than one unit of the field, so comparing the whole byte against the
    threshold placed in the top bits compares the field (one shift instead of two)."""

    name: str  # "bucket" (unstructured levels) or "nm" (one bit per N:M level)
    width: int
    shl: np.ndarray  # (levels, k, 1, 1) uint8
    thr: np.ndarray  # (levels,) uint8, already shifted to the top bits; 0 = no constraint

    @property
    def slots(self) -> int:
        return 8 // self.width


def _pack(code: torch.Tensor, width: int) -> np.ndarray:
    """(K, N) uint8 codes < 2**width -> (K/k, N) bytes, slot j of byte row c = code row j*K/k + c."""
    k = 8 // width
    rows = code.shape[0] // k
    packed = torch.zeros((rows, code.shape[1]), dtype=torch.uint8)
    for j in range(k):
        packed |= code[j * rows:(j + 1) * rows] << (j * width)
    return packed.numpy()


def _code_fields(levels: list[Level], rows: set[int]) -> list[CodeField]:
    """The bucket field (unstructured levels) and the nm field (N:M levels) for ``levels``."""
    unstructured = sorted((lv for lv in levels if not lv.is_nm), key=lambda lv: lv.sparsity)
    nm_levels = [lv for lv in levels if lv.is_nm]
    L, fields = len(levels), []
    if unstructured:
        ub = len(unstructured).bit_length()  # "kept at how many unstructured levels": 0..u
        w = _slot_width(ub, rows)
        shl = np.zeros((L, 8 // w, 1, 1), np.uint8)
        shl[:, :, 0, 0] = [8 - j * w - ub for j in range(8 // w)]
        thr = np.array([0 if lv.is_nm else (unstructured.index(lv) + 1) << (8 - ub) for lv in levels], np.uint8)
        fields.append(CodeField("bucket", w, shl, thr))
    if nm_levels:
        w = _slot_width(len(nm_levels), rows)
        shl = np.zeros((L, 8 // w, 1, 1), np.uint8)
        for idx, lv in enumerate(levels):
            t = nm_levels.index(lv) if lv.is_nm else 0
            shl[idx, :, 0, 0] = [8 - j * w - t - 1 for j in range(8 // w)]
        thr = np.array([128 if lv.is_nm else 0 for lv in levels], np.uint8)
        fields.append(CodeField("nm", w, shl, thr))
    return fields


def _codes(order: torch.Tensor, levels: list[Level], fields: list[CodeField]) -> dict[str, np.ndarray]:
    """Packed codes of one weight from its importance order (out, in): field name -> (K/k, N) uint8."""
    out = {}
    for f in fields:
        code = torch.zeros(order.shape, dtype=torch.uint8)
        if f.name == "bucket":
            for lv in (lv for lv in levels if not lv.is_nm):
                code += level_mask(order, lv).to(torch.uint8)
        else:
            for t, lv in enumerate(lv for lv in levels if lv.is_nm):
                code |= level_mask(order, lv).to(torch.uint8) << t
        out[f.name] = _pack(code.t().contiguous(), f.width)  # along the rows of W_t (in, out)
    return out


@dataclass
class ElasticTables:
    """Everything ``make_elastic`` adds, as numpy arrays (see the module docstring)."""

    levels: list[Level]
    fields: list[CodeField]
    codes: dict[str, dict[str, np.ndarray]]  # weight name -> field name -> packed (K/k, N) uint8
    lora_a: dict[str, np.ndarray]  # weight name -> (R+1, in), last row zero
    lora_b_t: dict[str, np.ndarray]  # weight name -> (R+1, out), scale folded, last row zero
    block_of: dict[str, int]  # weight name -> block
    rank_idx: list[np.ndarray]  # per block (levels, max_r) int64, padded with R (the zero row)
    rank_cnt: list[np.ndarray]  # per block (levels,) int64, >= 1

    @classmethod
    @torch.no_grad()
    def build(cls, elastic, levels: list[Level], initializers: dict[tuple[int, str], str],
              dtype: torch.dtype) -> "ElasticTables":
        """Tables for ``levels`` from an artifact's ``ElasticWeights`` (orders, adapters, low-group
        flags, rank, scale). ``initializers`` maps (block, linear name) to the graph's initializer
        name of that weight; ``dtype`` is the graph's float type."""
        nm_count = sum(lv.is_nm for lv in levels)
        if nm_count > 8 or len(levels) - nm_count > 255:
            raise UserError("dynamic mode serves at most 255 unstructured and 8 N:M levels in one graph")
        rows = {elastic.order(i, n).shape[1] for (i, n) in initializers}  # in_features = rows of W_t
        fields = _code_fields(levels, rows)
        # adapters: keep only the groups some exported level uses, in a compact row layout
        r = elastic.lora_rank
        used = sorted({g for lv in levels for g in level_rule(elastic.groups, lv).groups})
        slot = {g: k for k, g in enumerate(used)}
        R = len(used) * r
        rank_idx, rank_cnt = [], []
        for b in range(len(elastic.low_flags)):
            per_level = [elastic.rule(b, lv).rank_rows(r, slot) or [R] for lv in levels]
            width = max(len(x) for x in per_level)
            rank_idx.append(np.array([x + [R] * (width - len(x)) for x in per_level], dtype=np.int64))
            rank_cnt.append(np.array([len(x) for x in per_level], dtype=np.int64))

        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        sel = torch.tensor([g * r + j for g in used for j in range(r)], dtype=torch.long)
        codes, lora_a, lora_b_t, block_of = {}, {}, {}, {}
        for (i, n), name in initializers.items():
            codes[name] = _codes(elastic.order(i, n), levels, fields)
            B, A = elastic.lora(i, n)
            A, B = A[sel], B[:, sel] * elastic.scale  # (R, in), (out, R)
            lora_a[name] = torch.cat([A, torch.zeros(1, A.shape[1])]).numpy().astype(np_dtype)  # (R+1, in)
            lora_b_t[name] = torch.cat([B.t(), torch.zeros(1, B.shape[0])]).numpy().astype(np_dtype)  # (R+1, out)
            block_of[name] = i
        return cls(levels, fields, codes, lora_a, lora_b_t, block_of, rank_idx, rank_cnt)


class _Builder:
    """Collects the nodes and initializers ``make_elastic`` adds to a graph."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _level_index(b: _Builder, n_levels: int) -> tuple[str, str]:
    """(valid, idx): whether sparsity_level is in [0, n) and the index to gather with (0 if not)."""
    p, lvl = PREFIX, LEVEL_INPUT
    ge = b.node("GreaterOrEqual", [lvl, b.const(p + "zero_i64", np.array(0, np.int64))], p + "ge0")
    lt = b.node("Less", [lvl, b.const(p + "n_levels", np.array(n_levels, np.int64))], p + "lt_n")
    valid = b.node("And", [ge, lt], p + "valid")
    return valid, b.node("Where", [valid, lvl, p + "zero_i64"], p + "idx")


def _selectors(b: _Builder, tables: ElasticTables, idx: str) -> tuple[dict, dict]:
    """Per code field the level's (2**shl, thr), and per block the level's adapter rows."""
    p = PREFIX
    sel = {}
    for f in tables.fields:
        pow2 = (np.uint16(1) << f.shl.astype(np.uint16)).astype(np.uint8)  # 2**shl; shl <= 7
        sel[f.name] = (b.node("Gather", [b.const(f"{p}{f.name}/mul_table", pow2), idx], f"{p}{f.name}/mul"),
                       b.node("Gather", [b.const(f"{p}{f.name}/thr_table", f.thr), idx], f"{p}{f.name}/thr"))
    b.const(p + "starts", np.array([0], np.int64))
    b.const(p + "axis0", np.array([0], np.int64))
    rows = {}
    for k, (ri, rc) in enumerate(zip(tables.rank_idx, tables.rank_cnt)):
        row = b.node("Gather", [b.const(f"{p}block{k}/rank_idx_table", ri), idx], f"{p}block{k}/rank_idx_row")
        cnt = b.node("Gather", [b.const(f"{p}block{k}/rank_cnt_table", rc), idx], f"{p}block{k}/rank_cnt")
        cnt1 = b.node("Unsqueeze", [cnt, p + "axis0"], f"{p}block{k}/rank_cnt_1d")
        rows[k] = b.node("Slice", [row, p + "starts", cnt1], f"{p}block{k}/ranks")
    return sel, rows


def _weight_subgraph(b: _Builder, tables: ElasticTables, name: str, dense: onnx.TensorProto, sel: dict, rows: str) -> None:
    """The nodes that compute initializer ``name`` (now renamed ``<name>.dense``) at the selected level."""
    p, packed = PREFIX, tables.codes[name]
    shape = b.const(name + ".shape", np.array(list(dense.dims), np.int64))
    keeps = []
    for f in tables.fields:
        shl, thr = sel[f.name]
        c = b.node("Unsqueeze", [b.const(f"{name}.{f.name}", packed[f.name]), p + "axis0"], f"{name}/{f.name}_1")  # (1, K/k, N)
        # p << shl as p * 2**shl: uint8 Mul wraps like a shift and runs vectorized (BitShift does not)
        top = b.node("Mul", [c, shl], f"{name}/{f.name}_top")  # (k, K/k, N): slot j in the top bits
        keep = b.node("GreaterOrEqual", [top, thr], f"{name}/{f.name}_keep")
        keeps.append(b.node("Reshape", [keep, shape], f"{name}/{f.name}_keep2d"))  # (K, N): row j*K/k + c
    keep = keeps[0] if len(keeps) == 1 else b.node("And", keeps, name + "/keep")
    mask = b.node("Cast", [keep], name + "/mask", to=dense.data_type)
    # rows of A (R+1, in) and of B_t (R+1, out): contiguous gathers; Gemm(transA) = A_sel^T B_sel + W_t
    a = b.node("Gather", [b.const(name + ".lora_a", tables.lora_a[name]), rows], name + "/a", axis=0)
    bt = b.node("Gather", [b.const(name + ".lora_b_t", tables.lora_b_t[name]), rows], name + "/b", axis=0)
    merged = b.node("Gemm", [a, bt, dense.name], name + "/merged", transA=1)  # W + A B in one pass over W
    b.node("Mul", [merged, mask], name)  # the tensor the MatMul consumed as an initializer before


def _nan_guard(b: _Builder, g: onnx.GraphProto, valid: str) -> None:
    """Route every graph output through ``+ (valid ? 0 : NaN)``."""
    p, guard = PREFIX, {}
    for o in g.output:
        et = o.type.tensor_type.elem_type
        if et not in guard:
            nan = b.const(f"{p}nan_{et}", np.array(np.nan, helper.tensor_dtype_to_np_dtype(et)))
            z = b.const(f"{p}zero_{et}", np.array(0, helper.tensor_dtype_to_np_dtype(et)))
            guard[et] = b.node("Where", [valid, z, nan], f"{p}guard_{et}")
    raw = {o.name: o.name + "/unguarded" for o in g.output}
    for nd in g.node:
        for i, x in enumerate(nd.output):
            if x in raw:
                nd.output[i] = raw[x]
        for i, x in enumerate(nd.input):
            if x in raw:
                nd.input[i] = raw[x]
    for o in g.output:
        b.node("Add", [raw[o.name], guard[o.type.tensor_type.elem_type]], o.name)


def make_elastic(graph: onnx.ModelProto, tables: ElasticTables) -> None:
    """Add the ``sparsity_level`` input and replace every prunable initializer by its run-time
    subgraph (module docstring). Out-of-range levels: the weights of level 0 are built, and every
    output is NaN, so a wrong index can never pass for a real level's output."""
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    b = _Builder()
    g.input.append(helper.make_tensor_value_info(LEVEL_INPUT, TensorProto.INT64, []))
    valid, idx = _level_index(b, len(tables.levels))
    sel, rows = _selectors(b, tables, idx)
    for name in tables.codes:
        dense = inits[name]
        dense.name = name + ".dense"  # same data, new name: the dense W_t (in, out)
        _weight_subgraph(b, tables, name, dense, sel, rows[tables.block_of[name]])
    out_names = [o.name for o in g.output]
    _nan_guard(b, g, valid)
    # the weight subgraphs must run before their consumers: put them first (inputs only depend on
    # initializers and sparsity_level); the guards go last
    weight_nodes, tail = [], []
    for n in b.nodes:
        (tail if n.name.startswith(PREFIX + "guard") or n.output[0] in out_names else weight_nodes).append(n)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(weight_nodes + rest + tail)
    g.initializer.extend(b.inits)
