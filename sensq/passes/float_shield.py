"""Float nodes inside a QDQ model, as ONNX Runtime runs them.

onnxruntime >= 1.21 (graph optimizer WeightBiasQuantization, level 1) quantizes the float weight and bias of every
Conv / ConvTranspose / Gemm whose activation input comes from a DequantizeLinear with a per-tensor scale, to
symmetric *per-tensor* int8. A node a plan keeps float would then run with coarser weights than the INT8 default;
`shield_float_nodes` makes the builder's output immune to it (Workspace.build applies it to every plan).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

log = logging.getLogger("sensq")

WEIGHT_REQUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")


def activation_channel_axis(node: onnx.NodeProto, weight: onnx.TensorProto) -> tuple[int, int]:
    """(axis, size) of the activation input's channel axis this node reduces over, read from the weight's shape."""
    dims = list(weight.dims) + [0, 0]
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "Gemm":
        return (0 if attrs.get("transA") else 1), (dims[1] if attrs.get("transB") else dims[0])
    if node.op_type == "ConvTranspose":  # weight [C, M/group, k...]
        return 1, dims[0]
    return 1, dims[1] * attrs.get("group", 1)  # Conv weight [M, C/group, k...]


def shield_float_nodes(qmodel: onnx.ModelProto, float_nodes) -> int:
    """Keep ONNX Runtime from re-quantizing the float weights of `float_nodes` in a QDQ model, in place.

    The activation input of each such node is read through its own DequantizeLinear with a per-axis scale (the
    per-tensor scale repeated along the channel axis): the same values exactly, which the optimizer does not match.
    Returns the number of nodes shielded; applying it twice changes nothing.
    """
    from onnx import helper, numpy_helper

    float_nodes = set(float_nodes)
    graph = qmodel.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.value_info) + list(graph.input) if v.type.tensor_type.HasField("shape")}
    made: dict[tuple, str] = {}
    inserts: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    shielded = 0
    for node in graph.node:
        if node.name not in float_nodes or node.op_type not in WEIGHT_REQUANTIZED_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[0])
        if node.input[1] not in inits or dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size != 1:
            continue  # already per-axis
        shape = dims.get(dq.output[0]) or []
        axis, n = activation_channel_axis(node, inits[node.input[1]])
        if n <= 1:  # a single channel: any other axis of known size > 1 works as well
            axis, n = next(((i, d) for i, d in enumerate(shape) if d > 1), (axis, n))
        if n <= 1:
            log.debug("cannot shield float node %s: no input axis of known size > 1", node.name)
            continue
        key = (dq.output[0], axis, n)
        if key not in made:
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
            base = f"{dq.output[0]}_per_axis{axis}"
            graph.initializer.append(numpy_helper.from_array(np.full(n, scale.reshape(()), scale.dtype), base + "_scale"))
            inputs = [dq.input[0], base + "_scale"]
            if zp is not None:
                graph.initializer.append(numpy_helper.from_array(np.full(n, zp.reshape(()), zp.dtype), base + "_zero_point"))
                inputs.append(base + "_zero_point")
            inserts.append((dq, helper.make_node("DequantizeLinear", inputs, [base], name=f"{dq.name}_per_axis{axis}", axis=axis)))
            made[key] = base
        node.input[0] = made[key]
        shielded += 1
    for after, new in inserts:  # right after the per-tensor DQ: the graph stays topologically sorted
        graph.node.insert(list(graph.node).index(after) + 1, new)
    return shielded

