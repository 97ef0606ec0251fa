"""Learned rounding (passes/learned_rounding.py, passes/rounding_stages.py): per-layer reconstruction error against
an independent computation (ORT running each conv alone), no worse than nearest rounding on every conv it changed;
the stage order; the cache (one learning per weight setting, a search's float groups reuse it)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.build import QDQBuilder, prepare_model
from sensq.passes.rounding_stages import RoundingSource, conv_levels
from sensq.plan import PrecisionPlan
from sensq.statistics import collect

CONVS = ("c1", "dw", "pw", "side")


def _model(seed: int = 0) -> onnx.ModelProto:
    """x -> c1 (3x3, 3->8, pad 1) -> Relu -> dw (3x3 depthwise, stride 2) -> pw (1x1, 8->6) -> y, and a side conv on
    the Relu output (same stage as dw) added to nothing but its own output z."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale=0.4):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wd", "bd"], ["d"], name="dw", group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "wp", "bp"], ["y"], name="pw"),
             helper.make_node("Conv", ["r", "ws", "bs"], ["z"], name="side", pads=[0, 0, 0, 0])]
    inits = [init("w1", [8, 3, 3, 3]), init("b1", [8], 0.1), init("wd", [8, 1, 3, 3], 0.6), init("bd", [8], 0.1),
             init("wp", [6, 8, 1, 1]), init("bp", [6], 0.1), init("ws", [4, 8, 1, 1]), init("bs", [4], 0.1)]
    g = helper.make_graph(nodes, "lr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = prepare_model(_model())
    rng = np.random.default_rng(5)
    feeds = [{"x": (rng.standard_normal((1, 3, 12, 12)) + 0.5).astype(np.float32)} for _ in range(12)]
    builder = QDQBuilder(model, collect(model, feeds, len(feeds), progress=False))
    builder.rounding = RoundingSource(lambda: feeds, set(), 600.0, tmp_path_factory.mktemp("cache"), progress=False)
    return model, builder, feeds


def _outputs(model: onnx.ModelProto, names, feeds) -> list[dict]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in m.graph.output})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [dict(zip(names, sess.run(list(names), f))) for f in feeds]


def _deq(q: onnx.ModelProto, tensor: str) -> np.ndarray:
    """A DequantizeLinear'd initializer (weight or bias) of the QDQ model, as ORT computes it."""
    producer = {o: n for n in q.graph.node for o in n.output}
    dq = producer[tensor]
    m = helper.make_model(helper.make_graph([dq], "dq", [], [onnx.ValueInfoProto(name=tensor)],
                                            [i for i in q.graph.initializer if i.name in dq.input]),
                          opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


def _conv_alone(node: onnx.NodeProto, w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    n = helper.make_node("Conv", ["x", "w", "b"], ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    g = helper.make_graph([n], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_stages_put_a_conv_after_every_conv_it_reads(setup):
    model, _, _ = setup
    assert conv_levels(model, set(CONVS)) == [["c1"], ["dw", "side"], ["pw"]]


def test_learned_rounding_reconstructs_each_conv_no_worse_than_nearest(setup):
    """For every conv the pass changed, with the inputs the learned model feeds it: ||conv(x̃; W, b) - conv(x̃; Ŵ, b)||²
    over all calibration positions (W the float weights, Ŵ the int8 weights as ORT dequantizes them) is <= the same
    with nearest rounding's weights; it changed some; biases are the nearest model's."""
    model, builder, feeds = setup
    nearest = builder.build(PrecisionPlan(method="minmax"))
    learned = builder.build(PrecisionPlan(method="minmax", rounding="learned"))
    result = builder.rounding.result_for(builder, PrecisionPlan(method="minmax", rounding="learned"))
    assert result.weights and set(result.weights) <= set(CONVS)
    q_nodes = {n.name: n for n in learned.graph.node}
    f_nodes = {n.name: n for n in model.graph.node}
    f_inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x_tilde = _outputs(learned, [q_nodes[c].input[0] for c in CONVS if q_nodes[c].input[0] != "x"], feeds)
    improved = 0
    for c in result.weights:
        node_in = q_nodes[c].input[0]
        w_float, b_float = f_inits[f_nodes[c].input[1]], f_inits[f_nodes[c].input[2]]
        errs = {}
        for label, q in (("nearest", nearest), ("learned", learned)):
            node = {n.name: n for n in q.graph.node}[c]
            w = _deq(q, node.input[1])
            errs[label] = sum(float(np.sum((_conv_alone(f_nodes[c], w, b_float, x[node_in] if node_in in x else f["x"])
                                            - _conv_alone(f_nodes[c], w_float, b_float,
                                                          x[node_in] if node_in in x else f["x"])) ** 2))
                              for x, f in zip(x_tilde, feeds))
        assert errs["learned"] <= errs["nearest"] * (1 + 1e-5) + 1e-9, (c, errs)
        improved += errs["learned"] < errs["nearest"] * 0.999
        assert np.array_equal(_deq(learned, q_nodes[c].input[2]),
                              _deq(nearest, {n.name: n for n in nearest.graph.node}[c].input[2]))
    assert improved >= 1
    producer = {o: n for n in learned.graph.node for o in n.output}
    inits = {i.name: i for i in learned.graph.initializer}
    assert all(inits[producer[q_nodes[c].input[1]].input[0]].data_type == TensorProto.INT8 for c in result.weights)


def test_learning_runs_once_per_weight_setting_and_float_groups_reuse_it(setup):
    model, builder, feeds = setup
    plan = PrecisionPlan(method="minmax", rounding="learned")
    a = builder.build(plan)
    memo = dict(builder.rounding._memo)
    b = builder.build(plan.with_float(["pw"]))  # a search's float group: the same weight setting
    assert builder.rounding._memo == memo
    assert a.SerializeToString() == builder.build(plan).SerializeToString()  # deterministic, from the memo
    b_inits = {i.name for i in b.graph.initializer}
    assert "wp" in b_inits  # pw is float in b: its original weight, not learned
    fresh = RoundingSource(lambda: feeds, set(), 600.0, builder.rounding.cache, progress=False)
    cached = fresh.result_for(builder, plan)  # from disk: same weights without learning again
    ref = builder.rounding.result_for(builder, plan)
    assert set(cached.weights) == set(ref.weights)
    assert all(np.array_equal(cached.weights[k], ref.weights[k]) for k in ref.weights)
    assert len(builder.rounding._memo) == len(memo)
    other = builder.build(plan.with_float([], method="percentile"))  # another activation grid: learned afresh
    assert len(builder.rounding._memo) == len(memo) + 1 and other is not None


def test_rounding_is_a_plan_and_cli_option():
    from sensq.cli import build_parser

    args = build_parser().parse_args(["quantize", "--model", "m.onnx", "--calib", "c", "--rounding", "learned",
                                      "--rounding-budget", "120"])
    assert args.rounding == "learned" and args.rounding_budget == 120
    assert PrecisionPlan(rounding="nearest").rounding is None
    assert PrecisionPlan(rounding="learned").key() != PrecisionPlan().key()
    with pytest.raises(Exception, match="rounding"):
        PrecisionPlan(rounding="adaround")


def test_act_order_keeps_each_column_in_place():
    """With uncorrelated inputs (diagonal H) no column's error can be fed to another: GPTQ in any column order is
    nearest rounding, so a wrong inverse permutation (columns returned shuffled) shows; with correlated inputs the
    reordered solve still lands on the grid and beats nearest rounding on ||(W - Ŵ)x̃||²."""
    from sensq.passes.learned_rounding import gptq

    rng = np.random.default_rng(3)
    g, rows, k = 4, 5, 9  # a grouped conv: each group its own column order
    w = rng.normal(size=(g, rows, k))
    scale = rng.uniform(0.05, 0.2, size=(g, rows))
    nearest = np.clip(np.round(w / scale[..., None]), -127, 127) * scale[..., None]
    diag = np.zeros((g, k, k))
    diag[:, np.arange(k), np.arange(k)] = rng.uniform(0.1, 10.0, size=(g, k))  # distinct orders per group
    np.testing.assert_allclose(gptq(w, diag, scale, 127), nearest, atol=1e-12)

    x = rng.normal(size=(g, 400, k)) @ rng.normal(size=(g, k, k)) * rng.uniform(0.1, 3.0, size=(g, 1, k))
    h = np.einsum("gnk,gnl->gkl", x, x) + 1e-6 * np.eye(k)
    learned = gptq(w, h, scale, 127)
    codes = learned / scale[..., None]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)

    def err(q):
        return float(np.einsum("grk,gkl,grl->", q - w, h, q - w))

    assert err(learned) < err(nearest)
