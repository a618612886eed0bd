"""ONNX graph work after tracing: naming, saving, the sparsity check, and dynamic-mode surgery.

Dynamic mode (``make_elastic``) replaces each prunable initializer ``W_t`` (in, out) by a
subgraph that builds the selected level's weight on every run:

    keep = AND over code fields of  (packed << shl[level]) >= thr[level]      (uint8)
    W_t  = Gemm(A[ranks(level)]^T, B_t[ranks(level)], W_dense_t) * Cast(keep)

The codes hold every exported level's mask in a few bits per weight, in two fields: "bucket"
counts the unstructured levels that keep the weight (masks are nested, so "kept at the j-th
least sparse level" is "bucket >= j"; 2 bits for 3 levels, 4 bits for up to 15), and "nm" has
one bit per N:M level. Each field is packed ``8 // width`` slots per byte along axis 0, so one
shift (a uint8 Mul by 2**shl) over a broadcast (k, K/k, N) view, one compare and a free Reshape unpack it. ``shl`` and
``thr`` select one level's bits (thr 0: the field does not constrain that level). The adapters
are the stacked A/B_t of the groups some exported level uses (scale folded into B_t);
``ranks(level)`` lists a block's ranks for the level (none for a low-group level in a block
whose low-group check failed), padded with a zero rank and cut by ``Slice``. Gemm adds A B to W
in one pass; the mask is applied with Mul (ONNX Runtime's Where is several times slower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserError
from ..core.levels import Level, active_groups, unstructured_group
from ..core.masks import keep_count, nm_mask

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


def share_transposed(graph: onnx.ModelProto, min_elements: int = 1024) -> int:
    """Store a weight once when the graph holds it twice, as W and W^T: the tracer's constant
    folding turns a tied lm_head into a second, transposed copy of the embedding. The copy
    becomes ``Transpose(W)`` (folded again by ONNX Runtime and TensorRT at load time), as in
    optimum's exports. Returns the bytes saved."""
    by_shape: dict[tuple, list] = {}
    for t in graph.graph.initializer:
        if len(t.dims) == 2 and math.prod(t.dims) >= min_elements:
            by_shape.setdefault(tuple(t.dims), []).append(t)
    drop, nodes, saved = set(), [], 0
    for (a, b), tensors in by_shape.items():
        if a >= b:
            continue
        for copy in tensors:
            for orig in by_shape.get((b, a), []):
                if orig.name in drop or copy.name in drop:
                    continue
                if orig.data_type == copy.data_type and np.array_equal(numpy_helper.to_array(orig).T, numpy_helper.to_array(copy)):
                    nodes.append(helper.make_node("Transpose", [orig.name], [copy.name], name=f"{copy.name}/shared", perm=[1, 0]))
                    drop.add(copy.name)
                    saved += _nbytes(copy)
    if drop:
        kept = [t for t in graph.graph.initializer if t.name not in drop]
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(kept)
        rest = list(graph.graph.node)
        del graph.graph.node[:]
        graph.graph.node.extend(nodes + rest)
    return saved


def finalize(graph: onnx.ModelProto, weights: dict[str, str], metadata: dict[str, str]) -> None:
    """Strip the tracing wrapper's prefix from initializer names, check that every prunable
    weight is an initializer feeding MatMul directly, store tied weights once, and set producer
    and metadata."""
    _rename(graph, {t.name: t.name[2:] for t in graph.graph.initializer if t.name.startswith("m.")})
    share_transposed(graph)
    names = {t.name for t in graph.graph.initializer}
    missing = [w for w in weights if w not in names]
    if missing:  # e.g. deduplicated by value during export: identical weights cannot keep their own names
        raise RuntimeError(f"export lost the names of {len(missing)} prunable weights, first {missing[0]}")
    graph.producer_name = "epts-export"
    from .. import __version__

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


@dataclass
class ElasticTables:
    """Everything ``make_elastic`` adds, as numpy arrays (see the module docstring)."""

    levels: list[Level]
    fields: list[CodeField]
    codes: dict[str, dict[str, np.ndarray]]  # weight name -> field name -> packed (K/k, N) uint8
    lora_a: dict[str, np.ndarray]  # weight name -> (R+1, in), last row zero
    lora_b_t: dict[str, np.ndarray]  # weight name -> (R+1, out), scale folded, last row zero
    block_of: dict[str, int]  # weight name -> block
    rank_idx: list[np.ndarray]  # per block (levels, max_r) int64, padded with R (the zero rank)
    rank_cnt: list[np.ndarray]  # per block (levels,) int64, >= 1

    @classmethod
    @torch.no_grad()
    def build(cls, em, levels: list[Level], weights: dict[str, str], fam, dtype: torch.dtype) -> "ElasticTables":
        from ..artifact.folder import tensor_key

        art = em.artifact
        groups = art.groups
        unstructured = sorted((lv for lv in levels if not lv.is_nm), key=lambda lv: lv.sparsity)
        nm_levels = [lv for lv in levels if lv.is_nm]
        if len(nm_levels) > 8 or len(unstructured) > 255:
            raise UserError("dynamic mode serves at most 255 unstructured and 8 N:M levels in one graph")
        rows = {em.dense[key].shape[1] for key in em.dense}  # in_features = rows of W_t
        L = len(levels)
        fields = []
        if unstructured:
            ub = len(unstructured).bit_length()  # "kept at how many unstructured levels": 0..u
            w = _slot_width(ub, rows)
            k = 8 // w
            shl = np.zeros((L, k, 1, 1), np.uint8)
            shl[:, :, 0, 0] = [8 - j * w - ub for j in range(k)]
            thr = np.array([0 if lv.is_nm else (unstructured.index(lv) + 1) << (8 - ub) for lv in levels], np.uint8)
            fields.append(CodeField("bucket", w, shl, thr))
        if nm_levels:
            w = _slot_width(len(nm_levels), rows)
            k = 8 // w
            shl = np.zeros((L, k, 1, 1), np.uint8)
            for idx, lv in enumerate(levels):
                t = nm_levels.index(lv) if lv.is_nm else 0
                shl[idx, :, 0, 0] = [8 - j * w - t - 1 for j in range(k)]
            thr = np.array([128 if lv.is_nm else 0 for lv in levels], np.uint8)
            fields.append(CodeField("nm", w, shl, thr))

        # adapters: keep only the groups some exported level uses, in a compact rank layout
        rank = em.rank
        used = sorted({g for lv in levels for g in active_groups(groups, lv)})
        pos = {g: k for k, g in enumerate(used)}  # group -> compact slot
        R = len(used) * rank
        in_low = [not lv.is_nm and unstructured_group(groups, lv.sparsity) == 0 for lv in levels]
        rank_idx, rank_cnt = [], []
        for b in range(len(em.low_flags)):
            per_level = []
            for idx, lv in enumerate(levels):
                gs = [] if (in_low[idx] and not em.low_flags[b]) else active_groups(groups, lv)
                per_level.append([pos[g] * rank + j for g in gs for j in range(rank)] or [R])
            width = max(len(r) for r in per_level)
            rank_idx.append(np.array([r + [R] * (width - len(r)) for r in per_level], dtype=np.int64))
            rank_cnt.append(np.array([len(r) for r in per_level], dtype=np.int64))

        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        sel = torch.tensor([g * rank + j for g in used for j in range(rank)], dtype=torch.long)
        codes, lora_a, lora_b_t, block_of = {}, {}, {}, {}
        by_module = {module: name for name, module in weights.items()}
        for (i, n) in em.dense:
            name = by_module[f"{fam.blocks}.{i}.{n}"]
            order = em.tensors[tensor_key(i, n, "order")]  # (out, in)
            codes[name] = {}
            if unstructured:
                bucket = torch.zeros(order.shape, dtype=torch.uint8)
                for lv in unstructured:
                    bucket += (order < keep_count(order.shape[1], lv.sparsity)).to(torch.uint8)
                codes[name]["bucket"] = _pack(bucket.t().contiguous(), fields[0].width)
            if nm_levels:
                bits = torch.zeros(order.shape, dtype=torch.uint8)
                for t, lv in enumerate(nm_levels):
                    bits |= nm_mask(order, lv.n, lv.m).to(torch.uint8) << t
                codes[name]["nm"] = _pack(bits.t().contiguous(), fields[-1].width)
            A = em.tensors[tensor_key(i, n, "lora_A")][sel]  # (R, in)
            B = em.tensors[tensor_key(i, n, "lora_B")][:, sel] * em.scale  # (out, R)
            a = torch.cat([A, torch.zeros(1, A.shape[1])], dim=0)  # (R+1, in)
            b_t = torch.cat([B.t(), torch.zeros(1, B.shape[0])], dim=0)  # (R+1, out)
            lora_a[name], lora_b_t[name] = a.numpy().astype(np_dtype), b_t.numpy().astype(np_dtype)
            block_of[name] = i
        return cls(levels, fields, codes, lora_a, lora_b_t, block_of, rank_idx, rank_cnt)


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
    sel = {}
    for f in tables.fields:
        pow2 = (np.uint16(1) << f.shl.astype(np.uint16)).astype(np.uint8)  # 2**shl; shl <= 7
        sel[f.name] = (node("Gather", [const(f"{p}{f.name}/mul_table", pow2), idx], f"{p}{f.name}/mul"),
                       node("Gather", [const(f"{p}{f.name}/thr_table", f.thr), idx], f"{p}{f.name}/thr"))
    const(p + "starts", np.array([0], np.int64))
    const(p + "axis0", np.array([0], np.int64))
    ranks = {}
    for b, (ri, rc) in enumerate(zip(tables.rank_idx, tables.rank_cnt)):
        row = node("Gather", [const(f"{p}block{b}/rank_idx_table", ri), idx], f"{p}block{b}/rank_idx_row")
        cnt = node("Gather", [const(f"{p}block{b}/rank_cnt_table", rc), idx], f"{p}block{b}/rank_cnt")
        cnt1 = node("Unsqueeze", [cnt, p + "axis0"], f"{p}block{b}/rank_cnt_1d")
        ranks[b] = node("Slice", [row, p + "starts", cnt1], f"{p}block{b}/ranks")

    for name, packed in tables.codes.items():
        dense = inits[name]
        dense.name = name + ".dense"  # same data, new name: the dense W_t (in, out)
        shape = const(name + ".shape", np.array(list(dense.dims), np.int64))
        keeps = []
        for f in tables.fields:
            shl, thr = sel[f.name]
            c = node("Unsqueeze", [const(f"{name}.{f.name}", packed[f.name]), p + "axis0"], f"{name}/{f.name}_1")  # (1, K/k, N)
            # p << shl as p * 2**shl: uint8 Mul wraps like a shift and runs vectorized (BitShift does not)
            top = node("Mul", [c, shl], f"{name}/{f.name}_top")  # (k, K/k, N): slot j in the top bits
            keep = node("GreaterOrEqual", [top, thr], f"{name}/{f.name}_keep")
            keeps.append(node("Reshape", [keep, shape], f"{name}/{f.name}_keep2d"))  # (K, N): row j*K/k + c
        keep = keeps[0] if len(keeps) == 1 else node("And", keeps, name + "/keep")
        mask = node("Cast", [keep], name + "/mask", to=dense.data_type)
        # rows of A (R+1, in) and of B_t (R+1, out): contiguous gathers; Gemm(transA) = A_sel^T B_sel + W_t
        a = node("Gather", [const(name + ".lora_a", tables.lora_a[name]), ranks[tables.block_of[name]]], name + "/a", axis=0)
        bt = node("Gather", [const(name + ".lora_b_t", tables.lora_b_t[name]), ranks[tables.block_of[name]]], name + "/b", axis=0)
        merged = node("Gemm", [a, bt, dense.name], name + "/merged", transA=1)  # W + A B in one pass over W
        node("Mul", [merged, mask], name)  # the tensor the MatMul consumed as an initializer before

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
