"""Dynamic mode: one set of tables that builds any exported level's weights from ``sparsity_level``.

``make_elastic`` replaces each prunable initializer ``W_t`` (in, out) by a subgraph that builds the
selected level's weight:

    keep = AND over code fields of  (packed << shl[level]) >= thr[level]      (uint8)
    W_t  = Gemm(A[rows(level)]^T, B_t[rows(level)], W_dense_t) * Cast(keep)

The codes hold every exported level's mask in a few bits per weight. Two subfields: "bucket"
counts the unstructured levels that keep the weight (masks are nested, so "kept at the j-th
least sparse level" is "bucket >= j"; 2 bits for 3 levels, 3 for up to 7), and one bit per N:M
level. They are packed either as one field (nm bits low, bucket on top: 4 bits for the default
5 + 1 levels) or as two, whichever is smaller; a field is packed ``8 // width`` slots per byte
along axis 0, so one shift (a uint8 Mul by 2**shl) over a broadcast (k, K/k, N) view, one compare
and a free Reshape unpack it. ``shl`` moves the level's subfield to the top of the byte and
``thr`` is its threshold there (0: the field does not constrain that level). The adapters are
the stacked A/B_t rows that some exported level of the block uses (scale folded into B_t);
``rows(level)`` lists the block's rows for the level, cut by ``Slice``, and a per-block factor
multiplies them: 1, or 0 for a level that uses none (``core.rule``: a low-group level in a block
whose low-group check failed). Gemm adds A B to W in
one pass; the mask is applied with Mul (ONNX Runtime's Where is several times slower).

An index outside the table multiplies the adapter rows by NaN, so every built weight, and with
them every output of the whole graph, is NaN: a wrong index can never pass for a real level's output.

``split_graphs`` cuts the whole graph in two that share its tensors: ``weights.onnx``
(``sparsity_level`` -> every prunable weight) and ``decoder.onnx`` (the decoder with those weights
as initializers that a runtime supplies; see ``device.ort.ElasticDecoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..core.levels import Level
from ..core.rule import level_rule
from ..errors import UserError
from ..device.interface import LEVEL_INPUT

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

    A slot holds the bucket subfield (``bucket_bits`` bits at bit ``bucket_at``) and/or one bit
    per N:M level (level t at bit ``nm_at + t``). The shift moves the level's subfield to the top
    of the byte; what lies above it wraps away, and whatever lands below it is smaller than one
    unit of the subfield, so comparing the whole byte against the threshold placed in the top
    bits compares the subfield (one shift instead of two). Tables have one row per level plus
    one for an out-of-range index (no constraint: its weights are NaN anyway)."""

    name: str  # "code" (both subfields), "bucket" or "nm"
    width: int
    bucket_bits: int  # 0: no bucket subfield in this field
    bucket_at: int
    nm_count: int  # 0: no N:M bits in this field
    nm_at: int
    shl: np.ndarray  # (levels + 1, k, 1, 1) uint8
    thr: np.ndarray  # (levels + 1,) uint8, already shifted to the top bits; 0 = no constraint

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


def _field(name: str, levels: list[Level], rows: set[int], bucket: bool, nm: bool) -> CodeField:
    unstructured = sorted((lv for lv in levels if not lv.is_nm), key=lambda lv: lv.sparsity)
    nm_levels = [lv for lv in levels if lv.is_nm]
    ub = len(unstructured).bit_length() if bucket else 0  # "kept at how many unstructured levels": 0..u
    nmc = len(nm_levels) if nm else 0
    w = _slot_width(ub + nmc, rows)
    k, L = 8 // w, len(levels)
    shl = np.zeros((L + 1, k, 1, 1), np.uint8)
    thr = np.zeros(L + 1, np.uint8)
    for idx, lv in enumerate(levels):
        if lv.is_nm and nmc:  # bit nm_at + t of slot j (nm_at = 0) to bit 7
            t = nm_levels.index(lv)
            shl[idx, :, 0, 0] = [7 - j * w - t for j in range(k)]
            thr[idx] = 128
        elif not lv.is_nm and ub:  # the bucket's top bit (bit nmc + ub - 1 of slot j) to bit 7
            shl[idx, :, 0, 0] = [8 - j * w - nmc - ub for j in range(k)]
            thr[idx] = (unstructured.index(lv) + 1) << (8 - ub)
    return CodeField(name, w, ub, nmc, nmc, 0, shl, thr)


def _code_fields(levels: list[Level], rows: set[int]) -> list[CodeField]:
    """One field holding the bucket (unstructured levels) and the N:M bits, or one field for each,
    whichever stores fewer bits per weight (the single field on a tie: fewer nodes to run)."""
    has_u, has_nm = any(not lv.is_nm for lv in levels), any(lv.is_nm for lv in levels)
    if not (has_u and has_nm):
        return [_field("bucket" if has_u else "nm", levels, rows, has_u, has_nm)]
    two = [_field("bucket", levels, rows, True, False), _field("nm", levels, rows, False, True)]
    if two[0].bucket_bits + two[1].nm_count > 8:
        return two
    one = [_field("code", levels, rows, True, True)]
    two = [_field("bucket", levels, rows, True, False), _field("nm", levels, rows, False, True)]
    return one if sum(8 // f.slots for f in one) <= sum(8 // f.slots for f in two) else two


def _codes(order: torch.Tensor, levels: list[Level], fields: list[CodeField], rule) -> dict[str, np.ndarray]:
    """Packed codes of one weight from its importance order (out, in): field name -> (K/k, N) uint8.
    ``rule``: level -> the LevelRule of the weight's block (its mask may sit at the block's own
    sparsity, ``core.allocation``; those still nest, so the bucket still counts levels)."""
    out = {}
    for f in fields:
        code = torch.zeros(order.shape, dtype=torch.uint8)
        if f.bucket_bits:
            bucket = torch.zeros(order.shape, dtype=torch.uint8)
            for lv in (lv for lv in levels if not lv.is_nm):
                bucket += rule(lv).mask(order).to(torch.uint8)
            code |= bucket << f.bucket_at
        if f.nm_count:
            for t, lv in enumerate(lv for lv in levels if lv.is_nm):
                code |= rule(lv).mask(order).to(torch.uint8) << (f.nm_at + t)
        out[f.name] = _pack(code.t().contiguous(), f.width)  # along the rows of W_t (in, out)
    return out


@dataclass
class ElasticTables:
    """Everything ``make_elastic`` adds, as numpy arrays (see the module docstring)."""

    levels: list[Level]
    fields: list[CodeField]
    codes: dict[str, dict[str, np.ndarray]]  # weight name -> field name -> packed (K/k, N) uint8
    lora_a: dict[str, np.ndarray]  # weight name -> (R_b, in): the adapter rows some level of its block uses
    lora_b_t: dict[str, np.ndarray]  # weight name -> (R_b, out), scale folded
    block_of: dict[str, int]  # weight name -> block
    rank_idx: list[np.ndarray]  # per block (levels + 1, max_r) int64 rows into its R_b, padded with 0
    rank_cnt: list[np.ndarray]  # per block (levels + 1,) int64, >= 1
    factor: list[np.ndarray]  # per block (levels + 1,): 1; 0 for a level with no adapter rows; NaN out of range
    # fp16 exports: lora_a/lora_b_t hold int8 rows and these their per-row float16 scales (R_b,)
    lora_a_scale: dict[str, np.ndarray] | None = None
    lora_b_scale: dict[str, np.ndarray] | None = None

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
        rank_idx, rank_cnt, factor, kept = [], [], [], []
        for b in range(len(elastic.low_flags)):
            global_rows = [elastic.rule(b, lv).rank_rows(r, slot) for lv in levels]
            keep = sorted({x for rows_ in global_rows for x in rows_}) or [0]  # the rows this block ever uses
            local = {x: k for k, x in enumerate(keep)}
            # a level with no rows gathers row 0 times 0; out of range: level 0's rows times NaN
            per_level = [[local[x] for x in rows_] or [0] for rows_ in global_rows]
            per_level.append(per_level[0])
            width = max(len(x) for x in per_level)
            rank_idx.append(np.array([x + [0] * (width - len(x)) for x in per_level], dtype=np.int64))
            rank_cnt.append(np.array([len(x) for x in per_level], dtype=np.int64))
            factor.append(np.array([1.0 if rows_ else 0.0 for rows_ in global_rows] + [np.nan]))
            kept.append(torch.tensor(keep, dtype=torch.long))

        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        sel = torch.tensor([g * r + j for g in used for j in range(r)], dtype=torch.long)
        codes, lora_a, lora_b_t, block_of = {}, {}, {}, {}
        for (i, n), name in initializers.items():
            codes[name] = _codes(elastic.order(i, n), levels, fields, lambda lv, i=i: elastic.rule(i, lv))
            B, A = elastic.lora(i, n)
            A, B = A[sel], B[:, sel] * elastic.scale  # (R, in), (out, R)
            lora_a[name] = A[kept[i]].numpy().astype(np_dtype)  # (R_b, in)
            lora_b_t[name] = B.t()[kept[i]].numpy().astype(np_dtype)  # (R_b, out)
            block_of[name] = i
        factor = [f.astype(np_dtype) for f in factor]
        tables = cls(levels, fields, codes, lora_a, lora_b_t, block_of, rank_idx, rank_cnt, factor)
        if dtype == torch.float16:
            tables.lora_a, tables.lora_a_scale = _int8_rows(lora_a)
            tables.lora_b_t, tables.lora_b_scale = _int8_rows(lora_b_t)
        return tables


INT8_GROUP = 32  # adapter entries per int8 scale (fewer where a row's length is not a multiple)


def _group(n: int) -> int:
    return next(g for g in (INT8_GROUP, 16, 8, 4, 2, 1) if n % g == 0)


def _int8_rows(tables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Symmetric int8 in groups of ``_group(n)`` consecutive entries of a row: (R, n) float rows ->
    (int8 rows, float16 scales (R, n / g, 1)), each scale max |group| / 127. fp16 exports store
    adapters so: 0.56 of the float16 bytes. One scale per whole row was too coarse: an outlier
    entry coarsened the rest of its row and SmolLM2 at 0.7 (56 adapter ranks) failed validate."""
    q, scales = {}, {}
    for name, rows in tables.items():
        r = rows.astype(np.float32)
        R, n = r.shape
        g = _group(n)
        grouped = r.reshape(R, n // g, g)
        scale = (np.abs(grouped).max(axis=2, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        safe = np.where(scale > 0, scale, 1)
        q[name] = np.clip(np.rint(grouped / safe), -127, 127).astype(np.int8).reshape(R, n)
        scales[name] = scale.astype(np.float16)
    return q, scales


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


def _level_index(b: _Builder, n_levels: int) -> str:
    """The row to gather: sparsity_level when it is in [0, n), else n (the out-of-range row: NaN factor)."""
    p, lvl = PREFIX, LEVEL_INPUT
    ge = b.node("GreaterOrEqual", [lvl, b.const(p + "zero_i64", np.array(0, np.int64))], p + "ge0")
    lt = b.node("Less", [lvl, b.const(p + "n_levels", np.array(n_levels, np.int64))], p + "lt_n")
    valid = b.node("And", [ge, lt], p + "valid")
    return b.node("Where", [valid, lvl, p + "n_levels"], p + "idx")


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
        ranks = b.node("Slice", [row, p + "starts", cnt1], f"{p}block{k}/ranks")
        fac = b.node("Gather", [b.const(f"{p}block{k}/factor_table", tables.factor[k]), idx], f"{p}block{k}/factor")
        rows[k] = (ranks, fac)
    return sel, rows


def _weight_subgraph(b: _Builder, tables: ElasticTables, name: str, dense: onnx.TensorProto, sel: dict,
                     rows: tuple[str, str]) -> None:
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
    # rows of A (R_b, in) and of B_t (R_b, out): contiguous gathers; Gemm(transA) = A_sel^T B_sel + W_t
    rows, factor = rows
    a = b.node("Gather", [b.const(name + ".lora_a", tables.lora_a[name]), rows], name + "/a", axis=0)
    bt = b.node("Gather", [b.const(name + ".lora_b_t", tables.lora_b_t[name]), rows], name + "/b", axis=0)
    if tables.lora_a_scale is not None:  # int8 rows: Cast, times their scales by group, (r, n/g, g) -> (r, n)
        for key, scales in (("a", tables.lora_a_scale), ("b", tables.lora_b_scale)):
            sc = scales[name]  # (R, n/g, 1)
            n = (tables.lora_a if key == "a" else tables.lora_b_t)[name].shape[1]
            g = n // sc.shape[1]
            gathered = b.node("Gather", [b.const(f"{name}.lora_{key}_scale", sc), rows], f"{name}/{key}_scale", axis=0)
            raw = b.node("Cast", [a if key == "a" else bt], f"{name}/{key}_f", to=dense.data_type)
            grouped = b.node("Reshape", [raw, b.const(f"{name}.lora_{key}_groups", np.array([0, n // g, g], np.int64))],
                             f"{name}/{key}_grouped")
            scaled = b.node("Mul", [grouped, gathered], f"{name}/{key}_scaled")
            out = b.node("Reshape", [scaled, b.const(f"{name}.lora_{key}_shape", np.array([0, n], np.int64))],
                         f"{name}/{key}_rows")
            a, bt = (out, bt) if key == "a" else (a, out)
    a = b.node("Mul", [a, factor], name + "/a_level")  # x 0 (no adapters at this level) or NaN (out of range)
    merged = b.node("Gemm", [a, bt, dense.name], name + "/merged", transA=1)  # W + A B in one pass over W
    b.node("Mul", [merged, mask], name)  # the tensor the MatMul consumed as an initializer before


def make_elastic(graph: onnx.ModelProto, tables: ElasticTables) -> set[str]:
    """Add the ``sparsity_level`` input and replace every prunable initializer by its run-time
    subgraph (module docstring). Returns the names of the nodes added: the weight builder."""
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    b = _Builder()
    g.input.append(helper.make_tensor_value_info(LEVEL_INPUT, TensorProto.INT64, []))
    idx = _level_index(b, len(tables.levels))
    sel, rows = _selectors(b, tables, idx)
    for name in tables.codes:
        dense = inits[name]
        dense.name = name + ".dense"  # same data, new name: the dense W_t (in, out)
        _weight_subgraph(b, tables, name, dense, sel, rows[tables.block_of[name]])
    # the weight subgraphs must run before their consumers: put them first (they only depend on
    # initializers and sparsity_level)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(b.nodes + rest)
    g.initializer.extend(b.inits)
    return {n.name for n in b.nodes}


PLACEHOLDER = "decoder.weights"  # empty as exported: decoder.onnx's prunable weights point here


def split_graphs(whole: onnx.ModelProto, builder_nodes: set[str], weights: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(weights graph, decoder graph) from the whole dynamic graph, loaded without its external
    data so that both reuse its tensors where they lie (``model.onnx_data``):

    - weights.onnx: ``sparsity_level`` -> every prunable ``W_t`` (in, out), the builder nodes;
    - decoder.onnx: the other nodes, ``sparsity_level`` gone, each ``W_t`` an initializer whose
      external data is ``PLACEHOLDER`` (zero bytes; ``place_decoder_tensors`` gives each its slot):
      a runtime supplies them (ONNX Runtime's ``SessionOptions.add_initializer``); a client that
      does not fails to load it instead of running some other weights."""
    g = whole.graph
    inits = {t.name: t for t in g.initializer}
    types = {}
    for name in weights:
        dense = inits[name + ".dense"]
        types[name] = (dense.data_type, list(dense.dims))

    def used_inits(nodes) -> list[onnx.TensorProto]:
        need = {x for n in nodes for x in n.input}
        return [t for t in g.initializer if t.name in need]

    wnodes = [n for n in g.node if n.name in builder_nodes]
    dnodes = [n for n in g.node if n.name not in builder_nodes]
    level_in = [i for i in g.input if i.name == LEVEL_INPUT]
    wgraph = helper.make_graph(wnodes, "epts_level_weights", level_in,
                               [helper.make_tensor_value_info(n, *types[n]) for n in weights], used_inits(wnodes))
    placeholders = []
    for name in weights:
        dt, dims = types[name]
        t = onnx.TensorProto(name=name, data_type=dt, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
        nbytes = int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(dt).itemsize
        for k, v in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(nbytes))):
            t.external_data.add(key=k, value=v)
        placeholders.append(t)
    dgraph = helper.make_graph(dnodes, g.name or "epts_decoder", [i for i in g.input if i.name != LEVEL_INPUT],
                               list(g.output), used_inits(dnodes) + placeholders, value_info=list(g.value_info))
    out = []
    for graph_proto, role in ((wgraph, "weights"), (dgraph, "decoder")):
        m = helper.make_model(graph_proto, opset_imports=list(whole.opset_import), ir_version=whole.ir_version,
                              producer_name=whole.producer_name, producer_version=whole.producer_version)
        for prop in whole.metadata_props:
            m.metadata_props.add(key=prop.key, value=prop.value)
        m.metadata_props.add(key="epts.role", value=ROLES[role])
        out.append(m)
    return out[0], out[1]


ROLES = {
    "weights": "builds the prunable weights of the level sparsity_level indexes (epts.levels); "
               "feed them to decoder.onnx as initializers",
    "decoder": "the decoder without its prunable weights: supply them from weights.onnx "
               "(onnxruntime SessionOptions.add_initializer), or write one level's weights into "
               "decoder.weights (build_engines.py bake LEVEL) to make it that level's plain graph "
               "(what TensorRT builds from)",
}



_ALIGN = 64


def place_decoder_tensors(decoder: onnx.ModelProto, folder: Path, weights: list[str]) -> dict[str, dict]:
    """Give every tensor of ``decoder`` (from ``split_graphs``) a place in a file, in place: each
    prunable weight its own aligned slot of ``PLACEHOLDER`` (empty as exported, so that
    ``decoder.onnx`` alone does not load; a device writes one level's weights there to build a
    TensorRT engine, ``device.trt.weights.LevelWeights.bake``), each tensor the graph still holds
    inline appended to ``model.onnx_data``. Returns where each tensor lies: name -> {"file",
    "offset", "length", "dtype", "shape"} (files relative to ``folder``), which lets the device read
    any of them without an ONNX parser."""
    from ..device.interface import DATA_FILE

    prunable = set(weights)
    table: dict[str, dict] = {}
    data = Path(folder) / DATA_FILE
    end = {PLACEHOLDER: 0, DATA_FILE: data.stat().st_size}
    with open(data, "ab") as appended:
        for t in decoder.graph.initializer:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            shape = [int(d) for d in t.dims]
            length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if t.data_location == TensorProto.EXTERNAL and t.name not in prunable:
                ext = {e.key: e.value for e in t.external_data}
                table[t.name] = {"file": ext["location"], "offset": int(ext.get("offset", 0)),
                                 "length": int(ext.get("length", length)), "dtype": dtype.name, "shape": shape}
                continue
            where = PLACEHOLDER if t.name in prunable else DATA_FILE
            offset = -(-end[where] // _ALIGN) * _ALIGN
            if where == DATA_FILE:
                raw = numpy_helper.to_array(t).astype(dtype, copy=False).tobytes()
                appended.write(b"\0" * (offset - end[where]) + raw)
                length = len(raw)
            end[where] = offset + length
            ref = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=shape, data_location=TensorProto.EXTERNAL)
            for k, v in (("location", where), ("offset", str(offset)), ("length", str(length))):
                ref.external_data.add(key=k, value=v)
            t.CopyFrom(ref)
            table[t.name] = {"file": where, "offset": offset, "length": length, "dtype": dtype.name, "shape": shape}
    missing = prunable - set(table)
    if missing:
        raise UserError(f"the decoder lacks the prunable weights {sorted(missing)[:3]}: re-export")
    return table
