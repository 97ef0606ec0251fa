"""Precision per layer group: int8 (the target's 8-bit activations), a16 (16-bit activations, int8 weights), fp16
(no Q/DQ; weights and arithmetic in half precision) or fp32.

A plan lists the nodes of its a16 groups (`PrecisionPlan.a16_nodes`); the builder turns them into onnxruntime
TensorQuantOverrides: each such node's outputs get the 16-bit type, and onnxruntime's own mixed-precision fixer
(MixedPrecisionTensorQuantOverridesFixer, written for its QNN provider, generic over QDQ graphs) adds the type
conversions at the boundaries (an 8-bit tensor read by a 16-bit node is re-quantized to 16 bits, and back).

fp16 groups (`PrecisionPlan.fp16_nodes`) are left without Q/DQ like float groups, and the built model's nodes of those
groups are then converted to float16 by onnxruntime's own converter (onnxruntime.transformers.float16, with every other
node on its block list): Cast nodes at the island's edges, its float initializers stored as float16.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnxruntime.quantization.quant_utils import QuantType

from .errors import SensqError

PRECISIONS = ("int8", "a16", "fp16", "fp32")
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16, "int16": QuantType.QInt16}
WIDE = {"uint8": "uint16", "int8": "int16", "uint16": "uint16", "int16": "int16"}


def target_precisions(target) -> tuple[str, ...]:
    """The group precisions a target runs: a16 only where it takes the 16-bit counterpart of its activation type,
    fp16 only where it runs float16 (Target.fp16)."""
    a16 = WIDE[target.activation_type] in target.activation_types
    return tuple(p for p in PRECISIONS if (p != "a16" or a16) and (p != "fp16" or target.fp16))


# Ops an fp16 island converts: their float inputs all take float16 (the type constraint T of every input), except
# the listed float-only inputs (Resize's roi and scales are float32 whatever the data type). Other ops of an fp16
# group stay float32, with a Cast at each edge.
FP16_OPS = {"Conv": (), "ConvTranspose": (), "Gemm": (), "MatMul": (), "Add": (), "Sub": (), "Mul": (), "Div": (),
            "Sigmoid": (), "Relu": (), "LeakyRelu": (), "HardSigmoid": (), "HardSwish": (), "Clip": (), "Tanh": (),
            "Concat": (), "Split": (), "Slice": (), "Reshape": (), "Transpose": (), "Flatten": (), "Squeeze": (),
            "Unsqueeze": (), "MaxPool": (), "AveragePool": (), "GlobalAveragePool": (), "Pad": (), "Identity": (),
            "Softmax": (), "Resize": (1, 2), "BatchNormalization": ()}


def fp16_islands(model: onnx.ModelProto, fp16_nodes: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The built model with `fp16_nodes` (float nodes, no Q/DQ of their own) computing in float16: their float
    initializers stored as float16 (a copy where another node also reads one), one Cast to float16 per tensor
    entering an island and one back per tensor leaving it; graph inputs and outputs keep their types. Returns the
    model and the fp16 nodes left float32 (ops outside FP16_OPS)."""
    from onnx import numpy_helper

    nodes = {n.name: n for n in model.graph.node}
    missing = [n for n in fp16_nodes if n not in nodes]
    if missing:
        raise SensqError(f"fp16 node {missing[0]!r} not in graph", "regenerate the plan for this model")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    island = {n.name for n in g.node if n.name in set(fp16_nodes) and n.op_type in FP16_OPS}
    left = sorted(set(fp16_nodes) - island)
    inits = {i.name: i for i in g.initializer}
    typed = onnx.shape_inference.infer_shapes(model).graph  # the type of every tensor (DQ outputs carry none)
    float_t = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    float_t |= {v.name for v in list(typed.input) + list(typed.value_info) + list(typed.output)
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    produced_in = {o: n.name in island for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in g.output}
    new_nodes, half = [], {}  # half: float32 tensor -> its float16 name

    def to_half(t: str) -> str:
        if t not in half:
            if t in inits:  # a float16 copy of the initializer (the original stays for float32 readers)
                arr = numpy_helper.to_array(inits[t]).astype(np.float16)
                g.initializer.append(numpy_helper.from_array(arr, t + "_fp16"))
            else:
                new_nodes.append(onnx.helper.make_node("Cast", [t], [t + "_fp16"], to=onnx.TensorProto.FLOAT16,
                                                       name=t + "_to_fp16"))
            half[t] = t + "_fp16"
        return half[t]

    for n in g.node:
        if n.name not in island:
            continue
        for i, t in enumerate(n.input):
            if t and t in float_t and not produced_in.get(t, False) and i not in FP16_OPS[n.op_type]:
                n.input[i] = to_half(t)
        for i, t in enumerate(n.output):  # island outputs are float16 under a new name; readers outside get a Cast
            n.output[i] = t + "_h"
            outside = [r for r in readers.get(t, []) if r.name not in island] or t in graph_outputs
            for r in readers.get(t, []):
                if r.name in island:
                    r.input[:] = [t + "_h" if x == t else x for x in r.input]
            if outside:
                new_nodes.append(onnx.helper.make_node("Cast", [t + "_h"], [t], to=onnx.TensorProto.FLOAT,
                                                       name=t + "_to_fp32"))
    g.node.extend(new_nodes)
    used = {t for n in g.node for t in n.input}
    kept = [i for i in g.initializer if i.name in used]  # initializers only islands read are now float16 copies
    del g.initializer[:]
    g.initializer.extend(kept)
    renamed = {t for n in g.node if n.name in island for t in n.output}
    stale = [v for v in g.value_info if v.name + "_h" in renamed]
    for v in stale:
        g.value_info.remove(v)  # its type was float32; the float32 name is now the Cast's output (untyped is fine)
    _sort_nodes(g)
    return out, left


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Stable topological order of graph.node (each node after the producers of its inputs)."""
    from graphlib import TopologicalSorter

    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = {i: {producer[t] for t in n.input if t in producer} for i, n in enumerate(graph.node)}
    ts = TopologicalSorter(deps)
    ts.prepare()
    order: list[int] = []
    while ts.is_active():
        ready = sorted(ts.get_ready())  # lowest original index first: the order of the original graph where it can
        order.extend(ready)
        ts.done(*ready)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def wide_type(activation_type: str) -> str:
    return WIDE[activation_type]


def a16_overrides(model: onnx.ModelProto, a16_nodes: list[str], quantized: set[str], activation_type: str,
                  symmetric: bool) -> dict[str, list[dict]]:
    """TensorQuantOverrides putting the activations of `a16_nodes` on the 16-bit grid (`quantized`: the tensors
    that get Q/DQ at all). `model` must be shape-inferred; the result holds ORT QuantType values."""
    from onnxruntime.quantization.execution_providers.qnn.mixed_precision_overrides_utils import \
        MixedPrecisionTensorQuantOverridesFixer
    from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

    default, wide = QUANT_TYPES[activation_type], QUANT_TYPES[WIDE[activation_type]]
    if default == wide:
        return {}
    nodes = {n.name: n for n in model.graph.node}
    missing = [n for n in a16_nodes if n not in nodes]
    if missing:
        raise SensqError(f"a16 node {missing[0]!r} not in graph", "regenerate the plan for this model")
    initial = {t: [{"quant_type": wide}] for n in a16_nodes for t in nodes[n].output if t in quantized}
    if not initial:
        return {}
    helper = TensorQuantOverridesHelper(initial)
    try:
        fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(helper, model, default)
        fixer.apply(default, symmetric)
    except ValueError as e:
        raise SensqError(f"cannot mix 8- and 16-bit activations here: {e}", "keep these groups int8 or fp32") from e
    return helper.get_dict()


def wide_tensors(overrides: dict[str, list[dict]]) -> set[str]:
    """Tensors quantized on the 16-bit grid (their own type, not a conversion of an 8-bit one)."""
    wide = (QuantType.QInt16, QuantType.QUInt16)
    return {t for t, o in overrides.items() if o and o[0].get("quant_type") in wide}
