"""Fusion sanity of a built QDQ model on ONNX Runtime's CPU provider: what stays unfused after ORT's optimizer.

ORT fuses DequantizeLinear -> op -> QuantizeLinear into QLinear/int8 kernels. Whatever Q/DQ survives its graph
optimizations is a float<->int8 conversion executed on every run: at the model's inputs and outputs that is
inherent, inside the graph it is the price of a float island (a DQ into the island, a Q out of it) or of a node ORT
cannot fuse. Cast nodes are counted the same way. 16-bit Q/DQ (A16W8) are never fused on ORT CPU (no 16-bit
kernels): they run as fake-quant around float ops, slower than FP32; OpenVINO's CPU plugin likewise keeps 16-bit
FakeQuantize as float subgraphs and runs the convs in its float inference precision (measured with OpenVINO 2026.4). The counts come from the optimized graph ORT itself writes
(SessionOptions.optimized_model_filepath), not from a re-implementation of its fusion rules.

ORT (1.2x, transformer WeightBiasQuantization, from the basic level on) also quantizes the float weights of a Conv,
Gemm or MatMul that reads a DequantizeLinear and feeds a QuantizeLinear: such a "float" node runs in int8 on ORT
after all. `requantized_float_nodes` names them, read from the basic-level graph where node names are still intact.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from ..runtime import DEFAULT_THREADS
from .base import ModelLike

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _proto(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model))


def optimized_graph(model: ModelLike, level: str = "all") -> onnx.ModelProto:
    """The graph ORT's CPU provider runs after its optimizations at `level` ("basic", "extended" or "all")."""
    proto = _proto(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = DEFAULT_THREADS
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="sensq-fusion-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def _conversions(graph: onnx.GraphProto) -> dict[str, int]:
    """Q and DQ nodes, split into those at the model boundary (Q of a graph input, DQ into a graph output) and inside."""
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    ops = Counter(n.op_type for n in graph.node)
    boundary_q = sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inputs)
    boundary_dq = sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs)
    producer = {o: n.op_type for n in graph.node for o in n.output}
    pairs = sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and producer.get(n.input[0]) == "QuantizeLinear")
    wide = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16)}
    q16 = sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in wide)
    return {"q": ops["QuantizeLinear"], "dq": ops["DequantizeLinear"], "boundary_q": boundary_q,
            "boundary_dq": boundary_dq, "qdq_pairs": pairs, "casts": ops["Cast"], "q16": q16}


def requantized_float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose float weights ORT quantizes itself: Conv/ConvTranspose/Gemm/MatMul reading a DequantizeLinear of
    an initializer that ORT created (Q/DQ that ORT only duplicates or moves across Reshape/Transpose read tensors
    the model has, or node outputs)."""
    own = {i.name for i in model.graph.initializer}
    opt = optimized_graph(model, "basic")
    new_inits = {i.name for i in opt.graph.initializer} - own
    added = {o for n in opt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in new_inits for o in n.output}
    return sorted({n.name for n in opt.graph.node if n.op_type in WEIGHT_OPS and any(i in added for i in n.input)})


def fusion_report(model: ModelLike, reference: ModelLike | None = None, level: str = "all") -> dict:
    """Small dict for a trial's record:

    q, dq                 QuantizeLinear / DequantizeLinear nodes in the built model
    unfused_q/_dq         of those, still present after ORT's optimizations (each runs on every inference)
    island_q/_dq          unfused ones inside the graph (not quantizing a model input / dequantizing a model output)
    unfused_pairs         Q -> DQ pairs left as they are (not folded into an int8 kernel)
    fused_ops             nodes of ORT's int8 kernels (QLinear*, ConvInteger, MatMulInteger, QGemm, ...)
    casts, casts_added    Cast nodes after optimization, and how many more than the FP32 `reference` (or than the
                          built model had before optimization when no reference is given)
    requantized_float_nodes  nodes left float by the plan whose weights ORT quantized anyway (see module doc)
    q16, unfused_q16      16-bit QuantizeLinear nodes before / after optimization: ORT 1.31's CPU provider has no
                          16-bit kernels, so each one that survives is a fake-quant step around a float op
    """
    proto = _proto(model)
    before = _conversions(proto.graph)
    opt = optimized_graph(proto, level)
    after = _conversions(opt.graph)
    fused = sum(1 for n in opt.graph.node if n.op_type.startswith(("QLinear", "QGemm", "DynamicQuantize"))
                or n.op_type in ("ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QAttention"))
    baseline = _conversions(optimized_graph(reference, level).graph)["casts"] if reference is not None else before["casts"]
    return {"level": level, "q": before["q"], "dq": before["dq"], "unfused_q": after["q"], "unfused_dq": after["dq"],
            "island_q": after["q"] - after["boundary_q"], "island_dq": after["dq"] - after["boundary_dq"],
            "unfused_pairs": after["qdq_pairs"], "fused_ops": fused, "casts": after["casts"],
            "casts_added": after["casts"] - baseline, "q16": before["q16"], "unfused_q16": after["q16"],
            "requantized_float_nodes": requantized_float_nodes(proto)}
