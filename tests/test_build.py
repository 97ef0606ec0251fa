"""QDQ builder: the speed-ups over onnxruntime's QDQQuantizer must not change a single byte, plans round-trip, and
float regions really stay float."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantType

from sensq.build import QDQBuilder, prepare_model
from sensq.plan import PrecisionPlan
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


def _stock_build(builder: QDQBuilder, plan: PrecisionPlan, first_convs: list[str]) -> onnx.ModelProto:
    """onnxruntime's own QDQQuantizer with the same ranges and float nodes, its options written here from what a
    plan means (not copied from sensq.build; only the op-type list comes from the target): `first_convs` are the convs reading the image, whose weights get 7 bits
    under overflow_fix "first_layer", per channel (Conv's output-channel axis 0) only if the plan is per channel."""
    model = onnx.ModelProto()
    model.CopyFrom(builder.model)
    ranges = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in builder.ranges(plan).items()})
    int8_activations = plan.target == "tensorrt"
    # 7-bit weights: none on CPUs with VNNI (this rule is the target's), first_layer / all when the plan says so
    fix = plan.overflow_fix
    extra = {"ActivationSymmetric": int8_activations, "WeightSymmetric": True}
    if int8_activations:  # TensorRT takes float biases and Q/DQ on layer inputs only (Model Optimizer's placement)
        extra["QuantizeBias"] = False
        extra["OpTypesToExcludeOutputQuantization"] = list(get_target("tensorrt").no_output_quantization)
    if fix == "first_layer":
        weights = {n.input[1] for n in builder.model.graph.node if n.name in first_convs}
        extra["TensorQuantOverrides"] = {w: [{"reduce_range": True, "axis": 0} if plan.per_channel else {"reduce_range": True}]
                                         for w in weights}
    # which op types run in INT8 is the target's data (tested with the targets), not an option mapping
    op_types = list(get_target(plan.target).resolved_op_types())
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        q = QDQQuantizer(model, per_channel=plan.per_channel, reduce_range=fix == "all", weight_qType=QuantType.QInt8,
                         activation_qType=QuantType.QInt8 if int8_activations else QuantType.QUInt8, tensors_range=ranges,
                         nodes_to_quantize=[], nodes_to_exclude=list(plan.float_nodes),
                         op_types_to_quantize=op_types, extra_options=extra)
        return q.quantize_model()
    finally:
        logging.getLogger().setLevel(previous)


def _weight_dq(model: onnx.ModelProto, conv: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, scale) of a conv's DequantizeLinear in a QDQ model."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == conv)
    dq = producers[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    return inits[dq.input[0]], inits[dq.input[1]]


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_fast_builder_matches_stock_quantizer_tiny(tmp_path, per_channel, target):
    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    builder = QDQBuilder(model, _stats_for(prepare_model(model)))
    first = builder.model.graph.node[0].name
    for plan in (PrecisionPlan(method="minmax", per_channel=per_channel, target=target, overflow_fix="all"),
                 PrecisionPlan(method="minmax", per_channel=per_channel, target=target, overflow_fix="first_layer"),
                 PrecisionPlan(method="percentile", percentile=99.9, per_channel=per_channel, target=target,
                               overflow_fix="none", float_nodes=[first])):
        fast = builder.build(plan)  # twice: the second build uses the cached weight parameters
        fast = builder.build(plan)
        assert fast.SerializeToString() == _stock_build(builder, plan, [first]).SerializeToString()


def test_fast_builder_matches_stock_quantizer_yolov5n(yolov5n):
    model = onnx.load(str(yolov5n))
    builder = QDQBuilder(model, _stats_for(prepare_model(model), seed=1))
    plans = [PrecisionPlan(method="default", overflow_fix="none"), PrecisionPlan(method="minmax", overflow_fix="all"),
             PrecisionPlan(method="default", overflow_fix="first_layer", per_channel=False),
             PrecisionPlan(method="percentile", percentile=99.9, overflow_fix="none",
                           float_nodes=[n for n in builder.node_names if n.startswith(("/model.24/", "/model.2/"))])]
    for plan in plans:
        builder.build(plan)
        assert builder.build(plan).SerializeToString() == _stock_build(builder, plan, ["/model.0/conv/Conv"]).SerializeToString()


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


def test_yolov5n_decode_stays_float_and_build_is_deterministic(yolov5n_ws):
    ws = yolov5n_ws
    assert ws.head is not None and ws.head.kind == "yolov5"
    assert sorted(ws.head.cut_tensors) == [f"/model.24/m.{i}/Conv_output_0" for i in range(3)]
    q1, q2 = ws.build(), ws.build()
    assert q1.SerializeToString() == q2.SerializeToString()
    decode = set(ws.head.float_nodes)
    qdq_inputs = {x for n in q1.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for x in n.input}
    decode_tensors = {o for n in q1.graph.node if n.name in decode for o in n.output}
    assert not (qdq_inputs & decode_tensors), "a decode tensor was quantized"
    assert any(n.op_type == "QuantizeLinear" for n in q1.graph.node)


# ------------------------------------------------------------------------------------------------ overflow fix
@pytest.mark.parametrize("per_channel", [False, True])
def test_first_layer_fix_keeps_the_plans_weight_granularity(tmp_path, per_channel):
    """overflow_fix first_layer gives the first conv 7-bit weights ([-64, 64]) and nothing else: with per-tensor
    weights its DequantizeLinear has one scale, with per-channel weights one per output channel (4)."""
    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    builder = QDQBuilder(model, _stats_for(prepare_model(model)))
    q = builder.build(PrecisionPlan(method="minmax", per_channel=per_channel, overflow_fix="first_layer"))
    for conv, out_channels, bits_max in (("conv1", 4, 64), ("conv2", 2, 127)):
        w, scale = _weight_dq(q, conv)
        assert scale.size == (out_channels if per_channel else 1), (conv, scale.shape)
        assert int(np.abs(w.astype(np.int32)).max()) == bits_max, conv  # the largest weight maps to the grid's end
        ref = numpy_helper.to_array(next(i for i in builder.model.graph.initializer if i.name == node_input(builder, conv, 1)))
        if per_channel:  # by hand: per output channel, scale = max|w| / bits_max
            expected = np.abs(ref).reshape(out_channels, -1).max(axis=1) / bits_max
        else:
            expected = np.abs(ref).max() / bits_max
        assert np.allclose(scale.ravel(), np.ravel(expected), rtol=1e-6), conv


def node_input(builder: QDQBuilder, node: str, i: int) -> str:
    return next(n for n in builder.model.graph.node if n.name == node).input[i]


def _first_layer_model(path, first: str) -> onnx.ModelProto:
    """x [1,3,8,8] in 0-255 -> (Div 255 -> Sub 0.5 | nothing) -> conv1 -> Relu -> Flatten -> (Gemm transB | MatMul)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    nodes, x = [], "x"
    if first == "normalised":
        nodes += [helper.make_node("Div", ["x", "k255"], ["xn"], name="div"), helper.make_node("Sub", ["xn", "half"], ["xs"], name="sub")]
        x = "xs"
    nodes += [helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
              helper.make_node("Flatten", ["r1"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="gemm", transB=1)]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "k255"), numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(rng.normal(0, 0.01, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (5, 256)).astype(np.float32), "wg"),
             numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "bg")]
    graph = helper.make_graph(nodes, "first", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_first_layer_found_through_in_graph_normalisation():
    """A conv behind (x / 255 - 0.5) still reads the image's dense 0-255 uint8 codes: it is a first layer."""
    from sensq.build import first_layer_weights

    assert first_layer_weights(_first_layer_model(None, "raw")) == {"w1": 0}
    assert first_layer_weights(_first_layer_model(None, "normalised")) == {"w1": 0}


def test_first_layer_gemm_uses_onnxruntimes_channel_axis():
    """The 7-bit override of a Gemm (transB=1) weight keeps the axis onnxruntime picks for it by itself."""
    from onnx import TensorProto, helper

    from sensq.build import first_layer_weights

    rng = np.random.default_rng(4)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b")])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert first_layer_weights(model) == {"w": 0}
    builder = QDQBuilder(model, _stats_for(model))
    axis = {}
    for fix in ("none", "first_layer"):
        q = builder.build(PrecisionPlan(method="minmax", overflow_fix=fix))
        dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w"))
        axis[fix] = next((a.i for a in dq.attribute if a.name == "axis"), None)
        w, scale = _weight_dq(q, "gemm")
        assert scale.size == 3 and int(np.abs(w.astype(np.int32)).max()) == (64 if fix == "first_layer" else 127)
    assert axis["first_layer"] == axis["none"]


# ------------------------------------------------------------------------------------------------ range cache
def test_range_cache_is_invalidated_by_a_change_of_the_range_code(tmp_path, monkeypatch):
    import json

    import sensq.build as sbuild
    import sensq.ranges as sranges

    model = onnx.load(conv_relu_conv(tmp_path / "m.onnx"))
    stats = _stats_for(prepare_model(model))
    cache = tmp_path / "r.ranges.json"
    plan = PrecisionPlan(method="kl")
    first = QDQBuilder(model, stats, range_cache=cache).ranges(plan)
    assert json.loads(cache.read_text())["version"] == sranges.ALGORITHM_VERSION

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return (-1.0, 1.0)

    monkeypatch.setattr(sbuild, "compute_range", counting)
    assert QDQBuilder(model, stats, range_cache=cache).ranges(plan) == first and not calls  # same code: cache hit
    monkeypatch.setattr(sranges, "ALGORITHM_VERSION", "other code")
    assert set(QDQBuilder(model, stats, range_cache=cache).ranges(plan).values()) == {(-1.0, 1.0)}
    assert len(calls) == len(first)  # every kl range recomputed
    # a cache written by v0.1 (a bare list of rows, no version) is not trusted either
    cache.write_text(json.dumps([[n, "kl", 0, 255, False, 0.0, 0.5] for n in first]))
    calls.clear()
    QDQBuilder(model, stats, range_cache=cache).ranges(plan)
    assert len(calls) == len(first)


# ------------------------------------------------------------------------------------------------ raw 0-255 inputs
def _twin_models():
    """The raw-pixel model (x in 0-255 straight into conv1) and its normalised twin (x / 255 into conv1 with 255x
    larger weights): the same function, so both must quantize equally well."""
    raw = _first_layer_model(None, "raw")
    twin = onnx.ModelProto()
    twin.CopyFrom(raw)
    w1 = next(i for i in twin.graph.initializer if i.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * np.float32(255.0), "w1"))
    return raw, twin


def _pixel_feeds(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    feeds = [rng.integers(0, 256, (1, 3, 8, 8)).astype(np.float32) for _ in range(n)]
    feeds[0][0, 0, 0, 0], feeds[0][0, 0, 0, 1] = 0.0, 255.0  # the full pixel range is seen
    return feeds


def _output_snr(float_model, qmodel, xs) -> float:
    f = [make_session(float_model).run(None, {"x": x})[0] for x in xs]
    q = [make_session(qmodel).run(None, {"x": x})[0] for x in xs]
    return float(sum(((a - b) ** 2).sum() for a, b in zip(q, f)) / sum((b ** 2).sum() for b in f))


def test_raw_pixel_input_quantizes_like_a_normalised_one():
    from sensq.statistics import collect

    raw, twin = _twin_models()
    pixels = _pixel_feeds()
    snr = {}
    for name, model, xs in (("raw", raw, pixels), ("normalised", twin, [p / np.float32(255.0) for p in pixels])):
        model = prepare_model(model)
        builder = QDQBuilder(model, collect(model, iter({"x": x} for x in xs), len(xs), progress=False))
        # the default range rule (minmax at model inputs) with this machine's default overflow fix: without VNNI,
        # ORT's u8s8 kernels saturate on 0-255 codes times full 8-bit weights, in both twins alike
        plan = PrecisionPlan(overflow_fix=get_target("ort-cpu").overflow_fix)
        q = builder.build(plan)
        lo, hi = builder.ranges(plan)["x"]
        assert (lo, hi) == ((0.0, 255.0) if name == "raw" else (0.0, 1.0))
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        qx = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        # by hand: (255 - 0) / 255 = 1 per code for raw pixels, zero point 0: integer pixels are quantized exactly
        assert float(inits[qx.input[1]]) == pytest.approx(1.0 if name == "raw" else 1 / 255) and int(inits[qx.input[2]]) == 0
        snr[name] = _output_snr(model, q, xs)
    assert snr["raw"] < 1e-2
    assert snr["raw"] == pytest.approx(snr["normalised"], rel=0.05)


def test_raw_pixel_first_layer_gets_7_bit_weights_without_vnni(monkeypatch):
    """On x86 without VNNI the default ort-cpu plan gives the conv reading raw pixels 7-bit weights, and only it."""
    import sensq.targets.base as tbase

    monkeypatch.setattr(tbase, "cpu_needs_reduced_range", lambda: True)
    assert get_target("ort-cpu").overflow_fix == "first_layer"
    model = prepare_model(_first_layer_model(None, "raw"))
    builder = QDQBuilder(model, _stats_for(model))
    q = builder.build(PrecisionPlan())
    assert int(np.abs(_weight_dq(q, "conv1")[0].astype(np.int32)).max()) == 64
    assert int(np.abs(_weight_dq(q, "gemm")[0].astype(np.int32)).max()) == 127
