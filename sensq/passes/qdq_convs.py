"""The convs of a built QDQ model whose weights a pass may rewrite: each reads an int8 initializer of its own
through a DequantizeLinear with a scale of its own, and has a float twin (same node name) in the float model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class QuantizedConv:
    node: onnx.NodeProto  # in the QDQ model
    ref: onnx.NodeProto  # the float model's conv
    weight_dq: onnx.NodeProto
    q_init: onnx.TensorProto  # int8 weights
    s_init: onnx.TensorProto  # weight scale(s)
    weight: np.ndarray  # the float weights (float64)


@dataclass
class QDQIndex:
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    float_inits: dict[str, onnx.TensorProto]


def quantized_convs(qmodel: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[QDQIndex, Iterator[QuantizedConv]]:
    g = qmodel.graph
    index = QDQIndex({i.name: i for i in g.initializer}, {o: n for n in g.node for o in n.output},
                     {i.name: i for i in float_model.graph.initializer})
    uses: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    float_convs = {n.name: n for n in float_model.graph.node if n.op_type == "Conv"}

    def walk() -> Iterator[QuantizedConv]:
        for node in list(g.node):
            ref = float_convs.get(node.name)
            wdq = index.producer.get(node.input[1]) if node.op_type == "Conv" and ref is not None else None
            if wdq is None or wdq.op_type != "DequantizeLinear" or ref.input[1] not in index.float_inits:
                continue
            q_init, s_init = index.inits.get(wdq.input[0]), index.inits.get(wdq.input[1])
            if (q_init is None or s_init is None or q_init.data_type != onnx.TensorProto.INT8
                    or uses.get(wdq.input[0], 0) != 1 or uses.get(wdq.input[1], 0) != 1):
                continue  # shared weights or scales: rewriting one conv's would change another's
            weight = numpy_helper.to_array(index.float_inits[ref.input[1]]).astype(np.float64)
            yield QuantizedConv(node, ref, wdq, q_init, s_init, weight)

    return index, walk()
