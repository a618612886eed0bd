"""Refit: one TensorRT engine for every unstructured level, and the ONNX weights that switch it.

TensorRT has no kernels for unstructured sparsity, so an unstructured level runs the same dense
math as any other and differs only in its weight values. A bundle therefore builds one refittable
engine for all its unstructured levels (``builder.EngineSpec.refit_from``) and the runtime switches
level by refitting the weights of that level's baked graph (``TrtDecoder.set_level``).

Host side, when the bundle is written: ``refit_plan`` checks that the levels' graphs are the same
graph with other weights (same nodes, same initializer names, shapes and types) and names the
initializers whose bytes differ, the ones the builder marks refittable (REFIT_INDIVIDUAL).
Runtime side: ``read_initializers`` loads the named initializers of a graph, and only those (for
TensorRT 8.x, which has no ONNX refitter: ``Refitter.set_named_weights``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class RefitPlan:
    """Levels that one refittable engine can serve: ``weights`` differ between them, nothing else does."""

    levels: tuple[str, ...]
    weights: tuple[str, ...]  # initializer names whose values differ between the levels


class RefitMismatch(Exception):
    """The graphs are not one graph with other weights (why, in the message)."""


def _load_proto(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, unreadable file
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}): re-export the level") from None


def _external(t) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _tensor_digest(t, folder: Path) -> str:
    """sha256 of an initializer's stored bytes: inline fields, or its slice of the external data file."""
    import onnx

    h = hashlib.sha256()
    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = _external(t)
        offset, length = int(ext.get("offset", 0)), ext.get("length")
        with open(folder / ext["location"], "rb") as fh:
            fh.seek(offset)
            remaining = int(length) if length is not None else None
            while remaining is None or remaining > 0:
                chunk = fh.read(1 << 20 if remaining is None else min(1 << 20, remaining))
                if not chunk:
                    break
                h.update(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
    else:  # raw_data for torch's exports; the typed fields (with the name, equal across levels) otherwise
        h.update(t.raw_data if t.raw_data else t.SerializeToString())
    return h.hexdigest()


def _structure(model) -> tuple:
    """Everything of a graph but its initializer values: nodes (with attributes), inputs, outputs,
    initializer names, shapes and types. Metadata (the level name) is left out."""
    g = model.graph
    nodes = tuple(n.SerializeToString() for n in g.node)
    io = tuple(v.SerializeToString() for v in (*g.input, *g.output))
    inits = tuple((t.name, tuple(t.dims), t.data_type) for t in g.initializer)
    return nodes, io, inits, tuple(o.SerializeToString() for o in model.opset_import)


def _first_difference(a: tuple, b: tuple) -> str:
    names = ("nodes", "inputs/outputs", "initializers", "opsets")
    for name, x, y in zip(names, a, b):
        if x != y:
            if name == "initializers":
                extra = sorted(set(x) ^ set(y))[:1]
                return f"initializers differ ({extra[0][0] if extra else 'order'})"
            return f"{name} differ"
    return "unknown"


def refit_plan(graphs: dict[str, Path]) -> RefitPlan:
    """The plan for level name -> baked graph (two or more levels, in serving order). RefitMismatch
    when the graphs differ in more than weight values; UserError when one is unreadable."""
    if len(graphs) < 2:
        raise ValueError("a refit plan needs two levels or more")
    first_name, first = None, None
    digests: dict[str, dict[str, str]] = {}
    for name, path in graphs.items():
        path = Path(path)
        model = _load_proto(path)
        shape = _structure(model)
        if first is None:
            first_name, first = name, shape
        elif shape != first:
            raise RefitMismatch(f"the graphs of levels {first_name} and {name} are not the same graph with other "
                                f"weights: {_first_difference(first, shape)}")
        digests[name] = {t.name: _tensor_digest(t, path.parent) for t in model.graph.initializer}
    base = digests[first_name]
    changed = [w for w in base if any(d[w] != base[w] for d in digests.values())]
    return RefitPlan(tuple(graphs), tuple(changed))


def read_initializers(path: Path, names, require: bool = True) -> dict:
    """name -> numpy array for the initializers ``names`` of the graph at ``path`` (external data
    read for those only). With ``require``, UserError naming what the graph lacks; else those are
    left out."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    path = Path(path)
    model = _load_proto(path)
    want = set(names)
    out = {}
    for t in model.graph.initializer:
        if t.name in want:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                external_data_helper.load_external_data_for_tensor(t, str(path.parent))
            out[t.name] = numpy_helper.to_array(t)
    missing = sorted(want - set(out))
    if missing and require:
        raise UserError(f"{path} has no initializer {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + ": it is not a graph of the levels this engine serves")
    return out
