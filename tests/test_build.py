"""QDQ builder: the speed-ups over onnxruntime's QDQQuantizer must not change a single byte, plans round-trip, and
float regions really stay float."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantType

from sensq.build import QDQBuilder, prepare_model
from sensq.config import InputParams, QuantizeConfig
from sensq.plan import PrecisionPlan
from sensq.quantize import prepare
from sensq.runtime import make_session
from sensq.statistics import CalibrationStats, TensorStats, float_activation_names
from sensq.targets import get_target
from tests.tiny_models import conv_relu_conv


def _stats_for(model: onnx.ModelProto, seed: int = 0) -> CalibrationStats:
    rng = np.random.default_rng(seed)
    stats = {}
    for name in float_activation_names(model):
        st = TensorStats()
        st.update(rng.normal(0.2, 1.0, 4096).astype(np.float32))
        stats[name] = st
    return CalibrationStats(stats)


def _stock_build(builder: QDQBuilder, plan: PrecisionPlan) -> onnx.ModelProto:
    """What onnxruntime's own QDQQuantizer writes for the same ranges, exclusions and options."""
    target = get_target(plan.target, plan.activation_type)
    model = onnx.ModelProto()
    model.CopyFrom(builder.model)
    ranges = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in builder.ranges(plan).items()})
    fix = plan.overflow_fix or target.overflow_fix
    extra = {"ActivationSymmetric": target.activation_symmetric, "WeightSymmetric": True}
    if fix == "first_layer":
        extra["TensorQuantOverrides"] = {w: [{"reduce_range": True, "axis": 0}] for w in builder.first_layer_weights}
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        q = QDQQuantizer(model, plan.per_channel, fix == "all", QuantType.QInt8,
                         QuantType.QUInt8 if target.activation_type == "uint8" else QuantType.QInt8, ranges, [],
                         list(plan.float_nodes), list(target.resolved_op_types()), extra)
        return q.quantize_model()
    finally:
        logging.getLogger().setLevel(previous)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_fast_builder_matches_stock_quantizer_tiny(tmp_path, per_channel, target):
    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    builder = QDQBuilder(model, _stats_for(prepare_model(model)))
    first = builder.model.graph.node[0].name
    for plan in (PrecisionPlan(method="minmax", per_channel=per_channel, target=target, overflow_fix="all"),
                 PrecisionPlan(method="minmax", per_channel=per_channel, target=target, overflow_fix="first_layer"),
                 PrecisionPlan(method="percentile", percentile=99.9, per_channel=per_channel, target=target, float_nodes=[first])):
        fast = builder.build(plan)  # twice: the second build uses the cached weight parameters
        fast = builder.build(plan)
        assert fast.SerializeToString() == _stock_build(builder, plan).SerializeToString()


def test_fast_builder_matches_stock_quantizer_yolov5n(yolov5n):
    model = onnx.load(str(yolov5n))
    builder = QDQBuilder(model, _stats_for(prepare_model(model), seed=1))
    plans = [PrecisionPlan(method="default"), PrecisionPlan(method="minmax", overflow_fix="all"),
             PrecisionPlan(method="percentile", percentile=99.9,
                           float_nodes=[n for n in builder.node_names if n.startswith(("/model.24/", "/model.2/"))])]
    for plan in plans:
        builder.build(plan)
        assert builder.build(plan).SerializeToString() == _stock_build(builder, plan).SerializeToString()


def test_float_nodes_have_float_weights_and_plan_roundtrip(tmp_path):
    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    builder = QDQBuilder(model, _stats_for(prepare_model(model)))
    convs = [n.name for n in builder.model.graph.node if n.op_type == "Conv"]
    plan = PrecisionPlan(float_nodes=[convs[1]])
    q = builder.build(PrecisionPlan.from_dict(plan.to_dict()))
    assert PrecisionPlan.from_dict(plan.to_dict()).key() == plan.key()
    producers = {o: n for n in q.graph.node for o in n.output}
    weight_is_dequantized = {}
    for n in q.graph.node:
        if n.op_type == "Conv":
            src = producers.get(n.input[1])
            weight_is_dequantized[n.name] = src is not None and src.op_type == "DequantizeLinear"
    assert weight_is_dequantized == {convs[0]: True, convs[1]: False}
    # and the model runs
    sess = make_session(q)
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()


def test_unknown_float_node_is_a_user_error(tmp_path):
    from sensq.errors import SensqError

    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    builder = QDQBuilder(model, _stats_for(prepare_model(model)))
    with pytest.raises(SensqError, match="not in graph"):
        builder.build(PrecisionPlan(float_nodes=["nope"]))


def test_yolov5n_decode_stays_float_and_build_is_deterministic(yolov5n, coco_dir, tmp_path):
    cfg = QuantizeConfig(onnx_model=str(yolov5n), calibration_step=4,
                         inputs=[InputParams(data_list_path=str(coco_dir / "train2017"))])
    ws = prepare(cfg, progress=False)
    assert ws.head is not None and ws.head.kind == "yolov5"
    assert sorted(ws.head.cut_tensors) == [f"/model.24/m.{i}/Conv_output_0" for i in range(3)]
    q1, q2 = ws.build(), ws.build()
    assert q1.SerializeToString() == q2.SerializeToString()
    decode = set(ws.head.float_nodes)
    qdq_inputs = {x for n in q1.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for x in n.input}
    decode_tensors = {o for n in q1.graph.node if n.name in decode for o in n.output}
    assert not (qdq_inputs & decode_tensors), "a decode tensor was quantized"
    assert any(n.op_type == "QuantizeLinear" for n in q1.graph.node)
