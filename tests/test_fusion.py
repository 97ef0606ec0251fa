"""Fusion sanity (sensq.latency.fusion): Q/DQ that ORT leaves unfused, and float nodes ORT quantizes by itself.

Expected counts are derived by hand from the graph: conv1 -> act1 -> conv2 -> act2 -> conv3 with every activation
quantized fuses into three int8 convs; only the model's input Q and output DQ remain. A float island
{conv2, act2} in the middle adds one DQ (into the island) and one Q (out of it) that run on every inference.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.build import QDQBuilder, prepare_model
from sensq.latency.fusion import fusion_report
from sensq.ort_compat import requantizes_float_weights
from sensq.plan import PrecisionPlan
from sensq.statistics import CalibrationStats, TensorStats, float_activation_names


def chain(act: str) -> onnx.ModelProto:
    """x [1,3,16,16] -> conv1 -> Relu -> conv2 -> `act` -> conv3 (1x1) -> y [1,4,16,16]."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node(act, ["c2"], ["a2"], name="act2"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [w("w1", [8, 3, 3, 3]), w("b1", [8]), w("w2", [8, 8, 3, 3]), w("b2", [8]),
                               w("w3", [4, 8, 1, 1]), w("b3", [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def builder(model: onnx.ModelProto) -> QDQBuilder:
    rng = np.random.default_rng(1)
    stats = {}
    for name in float_activation_names(prepare_model(model)):
        st = TensorStats()
        st.update(np.abs(rng.normal(0.2, 1.0, 4096)).astype(np.float32))
        stats[name] = st
    return QDQBuilder(model, CalibrationStats(stats))


@pytest.mark.parametrize("level", ["extended", "all"])
def test_all_int8_chain_fuses_except_the_model_boundary(level):
    b = builder(chain("Sigmoid"))
    r = fusion_report(b.build(PrecisionPlan()), reference=b.model, level=level)
    assert (r["unfused_q"], r["unfused_dq"]) == (1, 1)  # quantize x, dequantize y
    assert (r["island_q"], r["island_dq"], r["unfused_pairs"]) == (0, 0, 0)
    assert r["fused_ops"] >= 3  # three QLinearConv (+ QLinearSigmoid)
    assert r["requantized_float_nodes"] == [] and r["casts_added"] == 0


def test_float_island_adds_one_dequantize_and_one_quantize():
    b = builder(chain("Sigmoid"))
    q = b.build(PrecisionPlan(float_nodes=["conv2", "act2"]))
    r = fusion_report(q, reference=b.model)
    assert (r["island_q"], r["island_dq"]) == (1, 1)
    assert (r["unfused_q"], r["unfused_dq"]) == (2, 2)
    assert r["requantized_float_nodes"] == []
    assert r["q"] == sum(n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_float_conv_between_dq_and_q_is_requantized_by_ort():
    """conv2 float, its Relu quantized: ORT quantizes conv2's weights itself (the float island does not exist at run
    time). Checked independently: outputs differ from a session without that optimizer."""
    b = builder(chain("Relu"))
    q = b.build(PrecisionPlan(float_nodes=["conv2"]))
    r = fusion_report(q, reference=b.model)
    if not requantizes_float_weights():  # onnxruntime 1.20: the float island runs float, and is reported so
        assert r["requantized_float_nodes"] == []
        return
    assert r["requantized_float_nodes"] == ["conv2"]
    assert (r["island_q"], r["island_dq"]) == (0, 0)
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    data = q.SerializeToString()
    default = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    kept_float = ort.InferenceSession(data, providers=["CPUExecutionProvider"],
                                      disabled_optimizers=["WeightBiasQuantization"]).run(None, {"x": x})[0]
    assert not np.array_equal(default, kept_float)


def test_yolov5n_decode_head_is_not_reported_as_requantized(yolov5n_ws):
    """ORT duplicates DQs and moves Q/DQ across the head's Reshape/Transpose; neither is weight re-quantization.
    Independent check: disabling WeightBiasQuantization leaves the outputs bit-identical."""
    ws = yolov5n_ws
    q = ws.build()
    r = fusion_report(q, reference=ws.model)
    assert r["requantized_float_nodes"] == [] and r["island_q"] == 0
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    data = q.SerializeToString()
    name = ws.model.graph.input[0].name
    a = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    b = ort.InferenceSession(data, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["WeightBiasQuantization"]).run(None, {name: x})[0]
    assert np.array_equal(a, b)
