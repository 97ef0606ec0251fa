"""Per-channel quantization of a depthwise conv's input activation.

A depthwise conv mixes no channels, so a scale per input channel is exact: DequantizeLinear(axis=1) gives each
channel its own step and the conv reads them unchanged. It matters because the channels of these inputs can differ
by 100x in range (YOLOX-Nano's first depthwise input: scales 0.0125 to 1.25); one per-tensor scale rounds the small
channels to a few codes (NSR 0.013 at that conv's output against 0.0002 per channel). NNCF quantizes these inputs
per channel for the same reason.

Who runs it as INT8 is the target's business (targets/*.py: `depthwise_per_channel`): OpenVINO folds per-channel
FakeQuantize into its kernels; ONNX Runtime's QLinearConv takes one input scale, so ORT runs the conv in float
after a per-channel DequantizeLinear (a measured trade, not a default there).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ranges import Grid


def quantize_depthwise_inputs_per_channel(qmodel: onnx.ModelProto, channels: dict[str, tuple[np.ndarray, np.ndarray]],
                                          depthwise: dict[str, str], grid: Grid) -> int:
    """Give each depthwise conv (activation input -> node name, statistics.depthwise_inputs) whose input is read
    through a Q/DQ pair its own per-channel pair; returns how many convs changed. Convs kept float are left alone."""
    g = qmodel.graph
    producer = {o: n for n in g.node for o in n.output}
    nodes = {n.name: n for n in g.node}
    zero_type = grid.zero_point_dtype
    changed = 0
    for tensor, name in depthwise.items():
        conv = nodes.get(name)
        if conv is None or tensor not in channels:
            continue
        dq = producer.get(conv.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] != tensor:
            continue  # the conv reads a float tensor (kept float) or something sensq did not write
        scale, zero = grid.scale_zero_point(*channels[tensor])  # per channel, the same rule as onnxruntime's
        s_name, z_name = f"{name}_input_pc_scale", f"{name}_input_pc_zero_point"
        g.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), s_name),
                              numpy_helper.from_array(np.asarray(zero).astype(zero_type), z_name)])
        q_out, dq_out = f"{name}_input_pc_quantized", f"{name}_input_pc_dequantized"
        pair = [helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out], name=f"{name}_input_pc_q", axis=1),
                helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{name}_input_pc_dq", axis=1)]
        at = list(g.node).index(conv)
        for k, node in enumerate(pair):
            g.node.insert(at + k, node)
        conv.input[0] = dq_out  # the per-tensor pair stays for the tensor's other readers (pruned if it has none)
        changed += 1
    _drop_unread(qmodel)
    return changed


def _drop_unread(qmodel: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes (and their initializers) nothing reads any more."""
    g = qmodel.graph
    while True:
        read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = {x for n in g.node for x in n.input}
    keep = [i for i in g.initializer if i.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)
