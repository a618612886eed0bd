"""Explicit quantization of a traced float32 graph: Q/DQ pairs around every prunable MatMul.

For each prunable weight ``W_t`` (in, out) that feeds MatMul as input B:

    W_t_quantized (int8, in x out) --DequantizeLinear(axis=1, per output channel)--> W_t --> MatMul.B
    x --QuantizeLinear(per tensor)--> x_quantized --DequantizeLinear--> x_dequantized --> MatMul.A

This is TensorRT's recommended placement for explicit quantization: Q/DQ on both inputs of the
weighted layer, so that the MatMul runs with INT8 inputs (its fused kernel takes int8 A and B and
writes the layer's output type) and nothing else changes precision. The weights are stored as
int8 (1 byte a weight), scales as float32, zero points as int8 zeros (TensorRT requires 0). Norms,
softmax, the residual stream and the logits stay in floating point.

Each MatMul has its own Q/DQ pair, also where several read one tensor (q, k, v): ONNX Runtime
(1.32) fuses Q -> DQ -> MatMul into its integer kernel (MatMulIntegerToFloat, VNNI on x86) only
when the Q feeds that one MatMul, and its common-subexpression pass merges identical Q nodes, so
the scales of a tensor's second and third readers sit one and two float32 ulps above the first's
(``recipe.build_recipe``): numerically the same quantization, three Q nodes that stay apart.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .math import quantize_weight

QUANTIZED, SCALE, ZERO, DEQUANTIZED = "_quantized", "_scale", "_zero_point", "_dequantized"


def quantize_graph(graph: onnx.ModelProto, weights: dict[str, str], act_scales: dict[str, float]) -> dict:
    """Rewrite ``graph`` in place (see the module docstring). ``weights``: initializer name ->
    module path; ``act_scales``: module path -> its input's scale (``Int8Recipe.act_scale``).
    Returns {"weights": n, "activations": n}."""
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_inits: list[TensorProto] = []
    weight_nodes: list[onnx.NodeProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}  # id(MatMul) -> the Q/DQ pair of its input
    for name, module in weights.items():
        users = consumers.get(name, [])
        if name not in inits or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != name:
            raise RuntimeError(f"{name} does not feed one MatMul directly as its weight: the graph cannot be quantized")
        w_t = numpy_helper.to_array(inits[name])
        q, scale = quantize_weight(torch.from_numpy(w_t.astype(np.float32)))
        new_inits += [numpy_helper.from_array(q.numpy(), name + QUANTIZED),
                      numpy_helper.from_array(scale.numpy().astype(np.float32), name + SCALE),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + ZERO)]
        weight_nodes.append(helper.make_node("DequantizeLinear", [name + QUANTIZED, name + SCALE, name + ZERO], [name],
                                             name=f"{name}/DequantizeLinear", axis=1))
        mm, base = users[0], f"{module}.input"
        new_inits += [numpy_helper.from_array(np.array(act_scales[module], np.float32), base + SCALE),
                      numpy_helper.from_array(np.array(0, np.int8), base + ZERO)]
        before[id(mm)] = [
            helper.make_node("QuantizeLinear", [mm.input[0], base + SCALE, base + ZERO], [base + QUANTIZED],
                             name=f"{base}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [base + QUANTIZED, base + SCALE, base + ZERO], [base + DEQUANTIZED],
                             name=f"{base}/DequantizeLinear")]
        mm.input[0] = base + DEQUANTIZED
    kept = [t for t in g.initializer if t.name not in weights]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    nodes = list(weight_nodes)
    for node in g.node:
        nodes += before.get(id(node), [])
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return {"weights": len(weights), "activations": len(before)}


def check_quantized(graph: onnx.ModelProto, weights: dict[str, str], reference: dict[str, object]) -> dict:
    """Does the graph quantize exactly as the reference does? For every prunable weight: its int8
    tensor and per-channel scales equal the reference's (``quant.fake.FakeQuantLinear``: ``q_t``,
    ``w_scale``), it reaches its MatMul through DequantizeLinear(axis=1), and the MatMul's other
    input is Q -> DQ of the float activation at the reference's scale, zero points 0.
    ``reference``: module path -> FakeQuantLinear. Returns {"passed", "layers", "failures"}."""
    inits = {t.name: t for t in graph.graph.initializer}
    producer = {o: n for n in graph.graph.node for o in n.output}
    matmul_of = {n.input[1]: n for n in graph.graph.node if n.op_type == "MatMul" and len(n.input) == 2}  # by weight
    failures: list[str] = []

    def array(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for name, module in weights.items():
        ref = reference[module]
        q, s, z = array(name + QUANTIZED), array(name + SCALE), array(name + ZERO)
        dq = producer.get(name)
        if q is None or s is None or dq is None or dq.op_type != "DequantizeLinear" or list(dq.input[:1]) != [name + QUANTIZED]:
            failures.append(f"{name}: not an int8 initializer behind DequantizeLinear")
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if q.dtype != np.int8 or axis != 1 or (z is not None and z.any()):
            failures.append(f"{name}: int8 {q.dtype}, axis {axis}, zero points {'0' if z is None or not z.any() else 'not 0'}")
        elif not np.array_equal(q, ref.q_t.numpy()) or not np.array_equal(s, ref.w_scale.numpy()):
            diff = int((q != ref.q_t.numpy()).sum()) if q.shape == tuple(ref.q_t.shape) else q.size
            failures.append(f"{name}: {diff} int8 weights or their scales differ from the reference's")
        mm = matmul_of.get(name)
        act_dq = producer.get(mm.input[0]) if mm is not None else None
        act_q = producer.get(act_dq.input[0]) if act_dq is not None and act_dq.op_type == "DequantizeLinear" else None
        if act_q is None or act_q.op_type != "QuantizeLinear":
            failures.append(f"{name}: its MatMul's input is not QuantizeLinear -> DequantizeLinear")
            continue
        a_s, a_z = array(act_q.input[1]), array(act_q.input[2]) if len(act_q.input) > 2 else None
        if a_s is None or a_s.size != 1 or np.float32(a_s) != np.float32(ref.scale) or (a_z is not None and (a_z.dtype != np.int8 or a_z.any())):
            failures.append(f"{name}: activation scale {None if a_s is None else float(a_s)} vs the reference's {ref.scale}, "
                            "or a zero point that is not int8 0")
        elif list(act_dq.input[1:]) != list(act_q.input[1:]):
            failures.append(f"{name}: the activation's Q and DQ use different scales")
    return {"passed": not failures, "layers": len(weights), "failures": failures}
