"""ONNX graph work after tracing: loading, saving, naming, and the sparsity check.

Dynamic mode's surgery (the ``sparsity_level`` input and the weight-building subgraphs) is in
``onnx.dynamic``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.levels import Level
from ..core.masks import keep_count
from ..errors import UserError, one_line
from ..device.interface import DATA_FILE
from ..quant.qdq import QUANTIZED

EXTERNAL_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB, with room for the graph itself


def load(path: Path) -> onnx.ModelProto:
    """Load a graph and its external data; UserError for a file that is not a readable ONNX model."""
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {one_line(e)})") from None


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


def save_references(graph: onnx.ModelProto, path: Path) -> None:
    """Write a graph whose tensors already point into an external data file beside ``path``
    (``onnx.dynamic.split_graphs``), as it is: no tensor data is written or moved."""
    from ..fsutil import write_bytes

    write_bytes(path, graph.SerializeToString())
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
    """name -> array of the weights ``names``; for an int8 graph, the int8 tensor behind each one
    (``<name>_quantized``, whose zeros are the weight's zeros: ``quant.qdq``)."""
    want = set(names)
    out = {}
    for t in graph.graph.initializer:
        if t.name in want:
            out[t.name] = numpy_helper.to_array(t)
        elif t.name.endswith(QUANTIZED) and t.name[: -len(QUANTIZED)] in want:
            out[t.name[: -len(QUANTIZED)]] = numpy_helper.to_array(t)
    return out


def weight_sparsity(graph: onnx.ModelProto, weights: dict[str, str]) -> float:
    """Fraction of exact zeros over the prunable weight initializers."""
    zeros = total = 0
    for arr in _initializers(graph, weights).values():
        zeros += int((arr == 0).sum())
        total += arr.size
    return zeros / max(total, 1)


def check_sparsity(graph: onnx.ModelProto, weights: dict[str, str], level: Level,
                   expected_zeros: dict[str, np.ndarray] | None = None, own: dict[str, Level] | None = None) -> dict:
    """Does sparsity survive in a baked graph? For every prunable weight initializer ``W_t`` (in, out):

    - it feeds MatMul directly as input B, and nothing else (no Reshape/Concat/Mul hiding it);
    - unstructured: each output column has at least the pruned count of zeros;
      N:M: every group of M consecutive elements along axis 0 (the reduction axis) has at most N non-zeros;
    - with ``expected_zeros`` (name -> bool (in, out), from the materialized PyTorch weights):
      exactly those zeros;
    - ``own``: name -> the level a weight's block prunes to under a layer-wise allocation
      (``core.allocation``); the others are checked against ``level``.

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
        if (q_users := cons.get(name + QUANTIZED)) is not None and any(n.op_type != "DequantizeLinear" or i != 0 for n, i in q_users):
            failures.append(f"{name}{QUANTIZED}: feeds something other than its DequantizeLinear")
        w = arrays[name]
        zeros += int((w == 0).sum())
        total += w.size
        users = cons.get(name, [])
        bad = [f"{n.op_type}[{i}]" for n, i in users if not (n.op_type == "MatMul" and i == 1)]
        if not users or bad:
            failures.append(f"{name}: consumed by {', '.join(bad) or 'nothing'}, not directly by MatMul as its weight")
        k, n_out = w.shape
        level_w = (own or {}).get(name, level)
        if level_w.is_nm:
            if k % level.m:
                failures.append(f"{name}: reduction axis {k} is not a multiple of {level.m}")
            else:
                nz = (w != 0).reshape(k // level.m, level.m, n_out).sum(axis=1)
                if (nz > level.n).any():
                    failures.append(f"{name}: {int((nz > level.n).sum())} groups along axis 0 have more than {level.n} of {level.m} non-zeros")
        else:
            need = k - keep_count(k, level_w.sparsity)
            short = int(((w == 0).sum(axis=0) < need).sum())
            if short:
                failures.append(f"{name}: {short} output columns have fewer than {need} zeros of {k}")
        if expected_zeros is not None and name in expected_zeros:
            diff = int(((w == 0) != expected_zeros[name]).sum())
            if diff:
                failures.append(f"{name}: {diff} weights differ from the materialized zero pattern")
    return {"ok": not failures, "weights": len(weights), "measured_sparsity": round(zeros / max(total, 1), 6),
            "failures": failures}
