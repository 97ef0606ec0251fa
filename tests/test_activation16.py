"""16-bit activations (A16W8): the Q/DQ pairs carry 16-bit zero points at opset 21, ONNX Runtime runs them, and the
outputs are closer to FP32 than the INT8 model's on the same inputs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.quant_utils import QuantType, get_qmin_qmax_for_qType

from sensq.build import QDQBuilder
from sensq.errors import SensqError
from sensq.latency import fusion_report
from sensq.plan import PrecisionPlan
from sensq.ranges import Grid, compute_range
from sensq.runtime import make_session
from sensq.statistics import TensorStats, collect
from sensq.targets import get_target
from tests.tiny_models import conv_relu_conv

ZP_TYPES = {"uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16, "uint16": onnx.TensorProto.UINT16}


def _activation_zero_points(model: onnx.ModelProto) -> list[int]:
    """Element types of the zero points of the Q nodes (activations only: weights are initializers read by DQ)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"]


def _nsr(outputs, reference) -> float:
    return float(np.mean([np.mean((a - b) ** 2) / np.mean(b ** 2) for a, b in zip(outputs, reference)]))


def _run(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    sess = make_session(model.SerializeToString())
    return [sess.run(None, f)[0] for f in feeds]


@pytest.mark.parametrize("qtype", [QuantType.QInt16, QuantType.QUInt16])
def test_grids_match_onnxruntime(qtype):
    dtype = "int16" if qtype == QuantType.QInt16 else "uint16"
    qmin, qmax = get_qmin_qmax_for_qType(qtype.tensor_type, symmetric=False)
    g = Grid.for_activation(dtype, False)
    assert (g.qmin, g.qmax) == (int(qmin), int(qmax)) and g.wide
    assert g.zero_point_dtype == (np.int16 if dtype == "int16" else np.uint16)
    assert not Grid.for_activation("uint8", False).wide


def test_default_rule_is_minmax_on_a_wide_grid():
    st = TensorStats()
    st.update(np.random.default_rng(0).standard_normal(200_000).astype(np.float32))
    wide = compute_range(st, "default", Grid.for_activation("int16", False))
    narrow = compute_range(st, "default", Grid.for_activation("uint8", False))
    assert wide == (st.min, st.max)
    assert narrow[1] < st.max  # the 8-bit rule clips at the 99.99th percentile


def test_tiny_model_a16w8_closer_to_fp32(tmp_path):
    model = onnx.load(str(conv_relu_conv(tmp_path / "m.onnx")))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    held_out = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    builder = QDQBuilder(model, collect(model, iter(calib), len(calib), progress=False))
    reference = _run(model, held_out)
    errors = {}
    for dtype in ("uint8", "int16", "uint16"):
        q = builder.build(PrecisionPlan(activation_type=None if dtype == "uint8" else dtype, overflow_fix="none"))
        zps = _activation_zero_points(q)
        assert zps and all(t == ZP_TYPES[dtype] for t in zps), (dtype, zps)
        opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == (17 if dtype == "uint8" else 21)  # 16-bit Q/DQ are standard ONNX from opset 21
        errors[dtype] = _nsr(_run(q, held_out), reference)
    # weights stay int8, so 16-bit activations remove most but not all of the error
    assert errors["int16"] < errors["uint8"] / 1.5 and errors["uint16"] < errors["uint8"] / 1.5, errors


def test_yolov5n_a16w8_closer_to_fp32(yolov5n_ws):
    ws = yolov5n_ws
    feeds = ws.samples(2)
    reference = _run(ws.model, feeds)
    int8 = ws.build(replace(ws.base_plan, overflow_fix="none"))
    a16 = ws.build(replace(ws.base_plan, activation_type="int16"))
    zps = _activation_zero_points(a16)
    assert len(zps) > 100 and set(zps) == {onnx.TensorProto.INT16}
    assert set(_activation_zero_points(int8)) == {onnx.TensorProto.UINT8}
    e8, e16 = _nsr(_run(int8, feeds), reference), _nsr(_run(a16, feeds), reference)
    assert e16 < e8 / 2, (e8, e16)
    report = fusion_report(a16)
    assert report["fused_ops"] == 0 and report["unfused_q16"] == report["q16"] > 100  # ORT CPU: fake-quant only


def test_tensorrt_refuses_16bit():
    with pytest.raises(SensqError, match="does not take int16"):
        get_target("tensorrt", "int16")
    with pytest.raises(SensqError, match="not supported"):
        get_target("ort-cpu", "int4")
    assert get_target("ort-cpu", "int16").activation_symmetric is False
