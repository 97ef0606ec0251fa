"""fp16 groups: the built model computes them in float16 (valid ONNX, float16 weights, one Cast per edge), runs on
ONNX Runtime and OpenVINO close to FP32, costs 16x16 bits in the analytic backend, and a search over the precision
space for a target that runs float16 scores such plans; exports carry them (onnx, json, trtexec) or refuse them."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sensq.build import QDQBuilder
from sensq.errors import SensqError
from sensq.export import export_trial
from sensq.latency.graph import layer_costs
from sensq.plan import PrecisionPlan
from sensq.precision import fp16_islands
from sensq.runtime import make_session
from sensq.search import run_search
from sensq.statistics import collect

from search_helpers import make_tiny, study_records, tiny_settings
from test_exporters import parse_trtexec, pinned_layers, run_script
from tiny_models import conv_relu_conv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = conv_relu_conv(tmp_path_factory.mktemp("fp16") / "m.onnx")
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    builder = QDQBuilder(model, collect(model, iter(feeds), len(feeds), progress=False))
    reference = [make_session(model.SerializeToString()).run(None, f)[0] for f in feeds]
    return model, builder, feeds, reference


def _nsr(model, feeds, reference) -> float:
    sess = make_session(model.SerializeToString())
    return float(np.mean([np.mean((sess.run(None, f)[0] - r) ** 2) / np.mean(r ** 2) for f, r in zip(feeds, reference)]))


def test_fp16_group_computes_in_float16_and_stays_close_to_fp32(tiny):
    model, builder, feeds, reference = tiny
    int8 = builder.build(PrecisionPlan(overflow_fix="none"))
    half = builder.build(PrecisionPlan(fp16_nodes=["conv1", "relu"], overflow_fix="none"))
    onnx.checker.check_model(half, full_check=True)  # topologically sorted, single assignment, types consistent
    nodes = {n.name: n for n in half.graph.node}
    inits = {i.name: i for i in half.graph.initializer}
    assert inits[nodes["conv1"].input[1]].data_type == onnx.TensorProto.FLOAT16  # the weight is stored in float16
    assert "conv1" not in {n.name for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    # one into the island (x) and one out of it (r1, read by conv2's Q/DQ): nothing else is converted
    assert sorted(n.input[0] for n in casts) == ["r1_h", "x"]
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type != onnx.TensorProto.FLOAT16 for i in half.graph.initializer if i.name.startswith("w2"))
    assert _nsr(half, feeds, reference) < _nsr(int8, feeds, reference)
    # the same plan with those nodes float32: fp16 differs from it by float16 rounding only
    fp32_group = builder.build(PrecisionPlan(float_nodes=["conv1", "relu"], overflow_fix="none"))
    a = make_session(half.SerializeToString()).run(None, feeds[0])[0]
    b = make_session(fp32_group.SerializeToString()).run(None, feeds[0])[0]
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


def test_fp16_island_shares_one_cast_and_keeps_float32_readers_of_an_initializer():
    """Two island nodes read one tensor, a float32 node and an island node read one initializer."""
    w = numpy_helper.from_array(np.full((2, 2, 1, 1), 0.5, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="ca"), helper.make_node("Conv", ["x", "w"], ["b"], name="cb"),
             helper.make_node("Relu", ["x"], ["c"], name="rc"), helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Add", ["s", "c"], ["y"], name="out")]
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")], [w]),
                          opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    half, left = fp16_islands(m, ["ca", "rc", "add"])
    onnx.checker.check_model(half, full_check=True)
    assert left == []
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    # x cast once for ca and rc; b (from the float32 conv) into add; s and c out to the float32 Add
    assert sorted(n.input[0] for n in casts) == ["b", "c_h", "s_h", "x"]
    assert {i.name for i in half.graph.initializer} == {"w", "w_fp16"}  # cb keeps the float32 original
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32)
    ref = make_session(m.SerializeToString()).run(None, {"x": x})[0]
    got = make_session(half.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(got, ref, atol=1e-2)


def test_fp16_island_runs_on_openvino_like_onnxruntime(tiny):
    pytest.importorskip("openvino")
    from sensq.runtime_openvino import openvino_session

    model, builder, feeds, _ = tiny
    half = builder.build(PrecisionPlan(fp16_nodes=["conv1", "relu"], overflow_fix="none", target="openvino-cpu"))
    ort_out = make_session(half.SerializeToString()).run(None, feeds[0])[0]
    ov_out = openvino_session(half, 1).run(None, feeds[0])[0]
    assert np.abs(ov_out - ort_out).max() <= 2e-2 * np.abs(ort_out).max()


def test_analytic_cost_counts_fp16_layers_at_16_bits(tiny):
    _, builder, _, _ = tiny
    costs = {c.node: c for c in layer_costs(builder.build(PrecisionPlan(fp16_nodes=["conv1"], float_nodes=["conv2"])))}
    conv1 = next(c for k, c in costs.items() if "conv1" in k)
    conv2 = next(c for k, c in costs.items() if "conv2" in k)
    assert (conv1.weight_bits, conv1.act_bits, conv2.weight_bits, conv2.act_bits) == (16, 16, 32, 32)


def test_plan_keys_and_precedence():
    assert PrecisionPlan().key() == "f81dc18ae12dcdcb"  # no fp16 nodes: the key plans had before the field existed
    assert PrecisionPlan(fp16_nodes=["relu"]).key() != PrecisionPlan().key()
    assert PrecisionPlan(float_nodes=["relu"], fp16_nodes=["relu"]).fp16_nodes == []  # float wins
    p = PrecisionPlan(fp16_nodes=["relu"], a16_nodes=["relu"])
    assert (p.fp16_nodes, p.a16_nodes) == (["relu"], [])  # no Q/DQ at all beats 16-bit Q/DQ


@pytest.fixture(scope="module")
def fp16_search(tmp_path_factory):
    """The tiny model for TensorRT (runs fp16, no a16; analytic cost): budget 12 over 3 groups x 3 precisions."""
    root = tmp_path_factory.mktemp("fp16search")
    tiny = make_tiny(root / "tiny")
    cfg = tiny.config()
    cfg.target = "tensorrt"
    from sensq.quantize import prepare

    workdir = root / "run"
    run_search(prepare(cfg, progress=False), tiny.evaluator(), tiny_settings(workdir, 12, space="precision"),
               progress=False)
    return workdir


def test_search_scores_fp16_plans_and_exports_carry_or_refuse_them(fp16_search, tmp_path):
    recs = [r for r in study_records(fp16_search) if r.full]
    assert not any(r.plan.get("a16_nodes") for r in recs)  # tensorrt runs no 16-bit activations
    mixed = [r for r in recs if r.plan.get("fp16_nodes") and r.plan["float_nodes"] != r.plan["fp16_nodes"]]
    assert mixed, "a budget-12 search over 3 groups x 3 precisions scores some fp16 plan"
    rec = mixed[0]
    n = rec.number
    model = onnx.load(str(export_trial(fp16_search, n, tmp_path / "t.q.onnx", "onnx", progress=False)["output"]))
    halves = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert halves and all(i.endswith("_fp16") for i in halves)
    export_trial(fp16_search, n, tmp_path / "t.json", "json", progress=False)
    assert json.loads((tmp_path / "t.json").read_text())["fp16_nodes"] == rec.plan["fp16_nodes"]
    export_trial(fp16_search, n, tmp_path / "t.trtexec.sh", "trtexec", progress=False)
    trt_model = onnx.load(str(tmp_path / "t.trt.q.onnx"))
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in trt_model.graph.initializer)  # TensorRT casts
    _, precisions = parse_trtexec(run_script(tmp_path / "t.trtexec.sh", tmp_path))
    pinned = pinned_layers([n.name for n in trt_model.graph.node], precisions)
    assert {k for k, v in pinned.items() if v == "fp16"} == set(rec.plan["fp16_nodes"])
    assert {k for k, v in pinned.items() if v == "fp32"} == set(rec.plan["float_nodes"])
    for fmt in ("xquant", "ort-exclude", "nncf"):
        with pytest.raises(SensqError, match=f"in float16, which the {fmt} format cannot express"):
            export_trial(fp16_search, n, tmp_path / f"t.{fmt}", fmt, progress=False)
