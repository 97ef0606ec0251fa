"""Reading a QDQ graph: which nodes run quantized, and their MACs and bit widths (used by bops and table)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import SensqError
from .base import ModelLike, load_model

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FREE_OPS = QDQ_OPS + ("Constant",)  # never costed: Q/DQ belong to the layer they wrap, Constant is folded


def node_key(node: onnx.NodeProto) -> str:
    """Name used for a node everywhere in sensq. Exporters name nodes; for unnamed ones the first output name is
    stable across QDQ quantization (the quantizer re-routes inputs and appends Q nodes, it keeps compute outputs)."""
    return node.name or node.output[0]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    cons: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                cons.setdefault(name, []).append(node)
    return cons


def _from_dq(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    producer = producers.get(name)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _is_quantized(node, producers, consumers) -> bool:
    if node.op_type in FREE_OPS or not node.input or not _from_dq(node.input[0], producers):
        return False
    if node.op_type in COMPUTE_OPS:
        # Data alone is not enough: ORT re-routes *every* consumer of a quantized tensor to the DQ output, so an
        # excluded Conv still reads a DQ output but keeps its float weight (and runs in float).
        return len(node.input) > 1 and _from_dq(node.input[1], producers)
    # Other ops run in int8 when wrapped DQ -> op -> Q (the QDQ "node unit" ORT writes for MaxPool, Concat, ...).
    return any(c.op_type == "QuantizeLinear" for out in node.output for c in consumers.get(out, []))


def quantized_nodes(model: ModelLike) -> set[str]:
    """Keys (node_key) of the original nodes that run quantized in a QDQ model.

    Conv/ConvTranspose/Gemm/MatMul: data input (0) and weight (1) both come from a DequantizeLinear.
    Other ops: first input comes from a DequantizeLinear and an output feeds a QuantizeLinear.
    A float model gives the empty set."""
    graph = load_model(model).graph
    producers, consumers = _producers(graph), _consumers(graph)
    return {node_key(n) for n in graph.node if _is_quantized(n, producers, consumers)}


# ---------------------------------------------------------------------------------------------------------------
# Analytic cost: MACs and BOPs
# ---------------------------------------------------------------------------------------------------------------

_TP = onnx.TensorProto
_BITS_BY_NAME = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "FLOAT16": 16,
                 "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8,
                 "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4}
_ELEM_BITS = {getattr(_TP, k): v for k, v in _BITS_BY_NAME.items() if hasattr(_TP, k)}  # older onnx lacks int4/fp4


@dataclass
class LayerCost:
    node: str
    op_type: str
    macs: int
    weight_bits: int
    act_bits: int
    quantized: bool
    shape_known: bool = True

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


def _with_static_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """Copy of the model whose graph inputs have concrete dims (override, else symbolic -> 1), only if needed."""
    input_shapes = input_shapes or {}
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    needs = any(i.name in input_shapes or any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
                for i in inputs)
    if not needs:
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name in input_shapes:
            wanted = list(input_shapes[inp.name])
            if len(wanted) != len(dims):
                raise SensqError(f"input shape {wanted} for {inp.name!r} has {len(wanted)} dims, the model input has {len(dims)}",
                                 "give one size per dimension of that input")
            for d, v in zip(dims, wanted):
                d.dim_value = int(v)
        else:
            for d in dims:
                if not d.HasField("dim_value"):
                    d.dim_value = 1
    return fixed


def _shapes_and_types(model: onnx.ModelProto, input_shapes=None) -> tuple[dict[str, list[int]], dict[str, int]]:
    shapes: dict[str, list[int]] = {}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_with_static_inputs(model, input_shapes), data_prop=True)
    except SensqError:
        raise
    except Exception:  # inference fails on some custom-domain graphs; fall back to declared shapes only
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            # symbolic dims left after inference (data-dependent) count as 1, like the ORT backend's inputs
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _node_macs(node, shape) -> int | None:
    """MACs of one compute node from its tensor shapes; None when a needed shape is unknown."""
    op = node.op_type
    if op == "Conv":
        out, w = shape(node.output[0]), shape(node.input[1])
        if out is None or w is None:
            return None
        return math.prod(out) * math.prod(w[1:])  # out elems x (Cin/groups) x kernel volume
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        if x is None or w is None:
            return None
        return math.prod(x) * math.prod(w[1:])  # every input elem meets (Cout/groups) x kernel volume weights
    if op == "Gemm":
        a, b = shape(node.input[0]), shape(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        attrs = {at.name: at.i for at in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * n * k
    if op == "MatMul":
        a, b = shape(node.input[0]), shape(node.input[1])
        if a is None or b is None or not a or not b:
            return None
        a = a if len(a) >= 2 else [1] + a
        b = b if len(b) >= 2 else b + [1]
        try:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        except ValueError:
            return None
        return math.prod(batch) * a[-2] * a[-1] * b[-1]
    return 0


def layer_costs(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> list[LayerCost]:
    """Per compute node (graph order): MACs and the bits of its weight and data inputs, read from the QDQ graph.

    Quantized nodes (see quantized_nodes) take the bit width of the integer tensor behind each DequantizeLinear
    (8 for int8/uint8, 16 for int16, 4 for int4); other nodes the width of their float inputs (32 for float32).
    Shapes come from one onnx shape inference; symbolic input dims are 1 unless `input_shapes` gives them."""
    model = load_model(model)
    graph = model.graph
    shapes, types = _shapes_and_types(model, input_shapes)
    producers, consumers = _producers(graph), _consumers(graph)

    def shape(name: str) -> list[int] | None:
        if name in shapes:
            return shapes[name]
        producer = producers.get(name)  # a DQ output has the shape of its integer input (e.g. the int8 initializer)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return shapes.get(producer.input[0])
        return None

    def dq_bits(name: str) -> int:
        dq = producers[name]
        elem = types.get(dq.input[0]) or (types.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None)
        return _ELEM_BITS.get(elem, 8)  # Q without zero point defaults to uint8

    def float_bits(name: str) -> int:
        return _ELEM_BITS.get(types.get(name), 32)

    costs = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        macs = _node_macs(node, shape)
        quant = _is_quantized(node, producers, consumers)
        bits = dq_bits if quant else float_bits
        costs.append(LayerCost(node_key(node), node.op_type, macs or 0, bits(node.input[1]), bits(node.input[0]),
                               quant, macs is not None))
    return costs


def macs_per_node(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """MACs of every Conv/ConvTranspose/Gemm/MatMul by node key; other ops cost 0 and are left out."""
    return {c.node: c.macs for c in layer_costs(model, input_shapes)}


def bops(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> float:
    """Bit operations: sum over compute layers of MACs x weight bits x activation bits (float layers are 32x32)."""
    return float(sum(c.bops for c in layer_costs(model, input_shapes)))



def structure_key(model: ModelLike) -> str:
    """Hash of what a runtime executes, not of the numbers it executes with: nodes (op, domain, wiring, attributes)
    and initializers by name, type and shape, but not their values (scales, zero points, weights).

    Two builds that differ only in calibration ranges share a key, and so share one latency measurement."""
    import hashlib

    model = load_model(model)
    g = model.graph
    h = hashlib.sha256()
    for node in g.node:
        attrs = sorted((a.name, a.SerializeToString()) for a in node.attribute)
        h.update(repr((node.op_type, node.domain, list(node.input), list(node.output), attrs)).encode())
    for init in sorted(g.initializer, key=lambda i: i.name):
        h.update(repr((init.name, init.data_type, list(init.dims))).encode())
    for vi in list(g.input) + list(g.output):
        h.update(vi.SerializeToString())
    return h.hexdigest()[:16]
