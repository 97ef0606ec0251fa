"""Latency backends: exact MAC/BOP arithmetic, QDQ detection on real quantizer output, ORT timing, cmd parsing, tables."""
from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.errors import SensqError
from sensq.latency import (LatencyBackend, LatencyResult, available_latency_backends, bops, layer_costs, macs_per_node,
                           make_latency_backend, parse_latency_ms, quantized_nodes, random_inputs)

from references import median_interval

PY = shlex.quote(sys.executable)

CONV1_MACS = 8 * 16 * 16 * 3 * 3 * 3  # Cout x H x W x Cin x kH x kW
DW_MACS = 8 * 16 * 16 * 1 * 3 * 3  # depthwise: Cin/groups = 1
FC_MACS = 1 * 10 * (8 * 16 * 16)  # M x N x K


def _init(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=17, check=True) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if check:  # the checker wants shapes on graph outputs; the MAC test leaves them to inference
        onnx.checker.check_model(m)
    return m


def tiny_cnn(batch="N") -> onnx.ModelProto:
    """conv1 (3->8, 3x3) -> sigmoid -> depthwise conv2 -> sigmoid -> flatten -> fc (Gemm 2048->10), 16x16 input."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        helper.make_node("Conv", ["s1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Sigmoid", ["c2"], ["s2"], name="sig2"),
        helper.make_node("Flatten", ["s2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
                  [_init(rng, "w1", [8, 3, 3, 3]), _init(rng, "b1", [8]), _init(rng, "w2", [8, 1, 3, 3]),
                   _init(rng, "wg", [10, 8 * 16 * 16]), _init(rng, "bg", [10])])


def _quantize(model: onnx.ModelProto, tmp_path, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "float.onnx", tmp_path / f"qdq_{'_'.join(exclude) or 'all'}.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, nodes_to_exclude=exclude)
    return onnx.load(str(dst))


@pytest.fixture(scope="module")
def float_model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def qdq_all(float_model, tmp_path_factory):
    return _quantize(float_model, tmp_path_factory.mktemp("qall"), [])


@pytest.fixture(scope="module")
def qdq_no_conv2(float_model, tmp_path_factory):
    return _quantize(float_model, tmp_path_factory.mktemp("qex"), ["conv2"])


# ---------------------------------------------------------------- MACs


def test_macs_conv_depthwise_gemm(float_model):
    assert macs_per_node(float_model) == {"conv1": CONV1_MACS, "conv2": DW_MACS, "fc": FC_MACS}


def test_macs_strided_conv_transposed_gemm_batched_matmul_convtranspose():
    rng = np.random.default_rng(0)
    nodes = [
        # 3->4, 5x5, stride 2, no pad on 17x17: out 7x7
        helper.make_node("Conv", ["x", "w"], ["c"], name="strided", strides=[2, 2]),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),  # (1, 196) via data propagation
        helper.make_node("Gemm", ["rt", "wg"], ["g"], name="gemm_tA"),  # A stored transposed: (196, 1)
        helper.make_node("MatMul", ["a3", "b2"], ["mm"], name="batched"),  # (2,4,5) x (5,6)
        helper.make_node("ConvTranspose", ["x", "wt"], ["ct"], name="deconv", strides=[2, 2]),  # 3->6, 2x2
    ]
    for n in nodes:
        if n.name == "gemm_tA":
            n.attribute.append(helper.make_attribute("transA", 1))
    inits = [_init(rng, "w", [4, 3, 5, 5]), numpy_helper.from_array(np.array([1, 196], np.int64), "shape"),
             _init(rng, "wg", [196, 7]), _init(rng, "b2", [5, 6]), _init(rng, "wt", [3, 6, 2, 2])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 17, 17]),
                       helper.make_tensor_value_info("rt", TensorProto.FLOAT, [196, 1]),
                       helper.make_tensor_value_info("a3", TensorProto.FLOAT, [2, 4, 5])],
               [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("r", "g", "mm", "ct")], inits,
               check=False)
    assert macs_per_node(m) == {
        "strided": 4 * 7 * 7 * 3 * 5 * 5,
        "gemm_tA": 1 * 7 * 196,
        "batched": 2 * 4 * 6 * 5,
        "deconv": (3 * 17 * 17) * 6 * 2 * 2,
    }


def test_symbolic_batch_counts_as_one_unless_given(float_model):
    assert macs_per_node(float_model)["conv1"] == CONV1_MACS
    assert macs_per_node(float_model, input_shapes={"x": [4, 3, 16, 16]})["conv1"] == 4 * CONV1_MACS
    with pytest.raises(SensqError, match="dims"):
        macs_per_node(float_model, input_shapes={"x": [4, 3, 16]})


# ---------------------------------------------------------------- QDQ detection and BOPs


def test_quantized_nodes_reads_qdq_graph(float_model, qdq_all, qdq_no_conv2):
    assert quantized_nodes(float_model) == set()
    assert quantized_nodes(qdq_all) == {"conv1", "sig1", "conv2", "sig2", "flat", "fc"}
    # conv2 still reads a DQ output (ORT re-routes all consumers of a quantized tensor) but keeps its float weight
    excluded = {n.name: n for n in qdq_no_conv2.graph.node}["conv2"]
    assert excluded.input[0].endswith("_DequantizeLinear_Output") and excluded.input[1] == "w2"
    assert quantized_nodes(qdq_no_conv2) == {"conv1", "sig1", "sig2", "flat", "fc"}


def test_bops_float_and_qdq_exact(float_model, qdq_all, qdq_no_conv2):
    total_macs = CONV1_MACS + DW_MACS + FC_MACS
    assert bops(float_model) == total_macs * 32 * 32
    assert bops(qdq_all) == total_macs * 8 * 8
    assert bops(qdq_no_conv2) == (CONV1_MACS + FC_MACS) * 8 * 8 + DW_MACS * 32 * 32
    # MACs are a property of the architecture, not of the quantization
    assert macs_per_node(qdq_no_conv2) == macs_per_node(float_model)
    bits = {c.node: (c.weight_bits, c.act_bits, c.quantized) for c in layer_costs(qdq_no_conv2)}
    assert bits == {"conv1": (8, 8, True), "conv2": (32, 32, False), "fc": (8, 8, True)}


def test_bops_backend_reports_gbops(qdq_no_conv2, tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(qdq_no_conv2, path)
    backend = make_latency_backend("bops")
    r = backend.measure(str(path))  # paths and protos give the same answer
    assert backend.unit == r.unit == "GBOPs"
    assert r.value == pytest.approx(bops(qdq_no_conv2) / 1e9) and r.value == backend.measure(qdq_no_conv2).value
    assert r.spread == 0.0 and r.ci == (r.value, r.value) and r.details["n_quantized_layers"] == 2 and r.details["n_layers"] == 3
    assert r.details["unknown_shape_nodes"] == []


def test_bits_follow_integer_type_behind_dq(float_model):
    # A hand-written QDQ graph with an int4 weight and uint8 activation: bits come from the tensors, not a constant.
    m = onnx.ModelProto()
    m.CopyFrom(float_model)
    g = m.graph
    w1 = next(i for i in g.initializer if i.name == "w1")
    g.initializer.remove(w1)
    g.initializer.extend([
        helper.make_tensor("w1_q", TensorProto.INT4, [8, 3, 3, 3], np.zeros(8 * 27, np.int8).tolist()),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
    ])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp_u8"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp_u8"], ["xdq"], name="xdq"),
             helper.make_node("DequantizeLinear", ["w1_q", "s"], ["w1dq"], name="wdq")]
    conv1 = g.node[0]
    conv1.input[0], conv1.input[1] = "xdq", "w1dq"
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    m.opset_import[0].version = 21  # int4 DequantizeLinear
    m.ir_version = 10
    costs = {c.node: c for c in layer_costs(m)}
    assert (costs["conv1"].weight_bits, costs["conv1"].act_bits) == (4, 8)
    assert costs["conv2"].weight_bits == 32


# ---------------------------------------------------------------- registry


def test_registry_and_spec_parsing():
    assert {"ort", "bops", "cmd", "table"} <= set(available_latency_backends())
    ort = make_latency_backend("ort:threads=1,warmup=2,min_seconds=0.01")
    assert isinstance(ort, LatencyBackend) and (ort.threads, ort.warmup, ort.min_seconds) == (1, 2, 0.01)
    assert make_latency_backend("ort:threads=1", threads=2).threads == 2  # keyword options win
    assert make_latency_backend("  ORT ").name == "ort"
    with pytest.raises(SensqError, match="unknown latency backend 'fast'"):
        make_latency_backend("fast")
    with pytest.raises(SensqError, match="unknown option.*thread") as e:
        make_latency_backend("ort:thread=2")
    assert "threads" in e.value.fix
    with pytest.raises(SensqError, match="key=value"):
        make_latency_backend("ort:2")
    with pytest.raises(SensqError, match="needs a command"):
        make_latency_backend("cmd:")


# ---------------------------------------------------------------- ort


def test_ort_backend_median_and_spread(float_model):
    backend = make_latency_backend("ort", threads=1, warmup=2, min_repeats=20, min_seconds=0.05)
    r = backend.measure(float_model)
    assert isinstance(r, LatencyResult) and r.backend == "ort" and r.unit == "ms"
    assert r.value > 0 and 0 <= r.spread <= r.value
    assert r.repeats >= 20 and r.details["min_ms"] <= r.value and r.ci[0] <= r.ci[1]
    assert len(r.details["block_medians_ms"]) == r.details["blocks"] >= 5
    assert r.details["threads"] == 1
    json.dumps(r.to_dict())  # results go into the study's JSON records


def test_ort_spinning_option(float_model):
    assert make_latency_backend("ort").spinning is False  # robust to background load by default
    assert make_latency_backend("ort:spinning=true").session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"
    backend = make_latency_backend("ort:spinning=false,threads=1,warmup=1,min_repeats=5,min_seconds=0,blocks=1")
    assert backend.spinning is False
    assert backend.session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    r = backend.measure(float_model)
    assert r.details["spinning"] is False and r.repeats == 5 and r.details["blocks"] == 1 and r.value > 0
    with pytest.raises(SensqError, match="not a boolean"):
        make_latency_backend("ort:spinning=2")


def test_random_inputs_deterministic_and_shaped(float_model):
    a, b = random_inputs(float_model, seed=0), random_inputs(float_model, seed=0)
    assert list(a) == ["x"] and a["x"].shape == (1, 3, 16, 16) and a["x"].dtype == np.float32  # symbolic N -> 1
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], random_inputs(float_model, seed=1)["x"])
    assert random_inputs(float_model, input_shapes={"x": [2, 3, 16, 16]})["x"].shape == (2, 3, 16, 16)


def test_ort_missing_model_is_user_error(tmp_path):
    with pytest.raises(SensqError, match="not found"):
        make_latency_backend("ort").measure(tmp_path / "nope.onnx")


# ---------------------------------------------------------------- cmd


def _cmd(code: str, tail: str = "") -> str:
    return f"{PY} -c {shlex.quote(code)}{tail}"


def test_cmd_reads_ms_line():
    r = make_latency_backend("cmd:" + _cmd("print('warming up 3 runs'); print('latency: 12.5 ms')")).measure(tiny_cnn())
    assert r.value == 12.5 and r.unit == "ms" and r.repeats == 1 and r.spread is None and r.backend == "cmd"


def test_cmd_substitutes_model_path(float_model, tmp_path):
    # The command reports the model's file size as its "latency", proving it received the model file.
    code = "import os, sys; print(f'size {os.path.getsize(sys.argv[1])} ms')"
    r = make_latency_backend("cmd:" + _cmd(code, " {model}")).measure(float_model)  # proto -> temp file
    assert r.value == float(len(float_model.SerializeToString()))
    path = tmp_path / "model with space.onnx"
    onnx.save(float_model, path)
    r = make_latency_backend(f'cmd:"{_cmd(code)}"').measure(str(path))  # no {model}: appended, quoted form of spec
    assert r.value == float(path.stat().st_size)
    assert r.details["command"].endswith(shlex.quote(str(path.resolve())))


def test_cmd_repeats_take_median(tmp_path, float_model):
    counter = tmp_path / "n"
    code = (f"import pathlib; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) if p.exists() else 0; "
            "p.write_text(str(n + 1)); print(f'{[10, 30, 20][n]}ms')")
    r = make_latency_backend("cmd:" + _cmd(code), repeats=3).measure(float_model)
    assert r.details["runs"] == [10.0, 30.0, 20.0] and r.value == 20.0 and r.spread == 10.0


TRTEXEC = """[I] === Performance summary ===
[I] Throughput: 812.3 qps
[I] Latency: min = 1.4 ms, max = 2.1 ms, mean = 1.6 ms, median = 1.55 ms, percentile(90%) = 1.7 ms
[I] Enqueue Time: min = 0.2 ms, max = 0.4 ms, mean = 0.25 ms, median = 0.24 ms
[I] GPU Compute Time: min = 1.2 ms, max = 1.5 ms, mean = 1.3 ms, median = 1.25 ms, percentile(99%) = 1.45 ms
[I] D2H Latency: min = 0.01 ms, max = 0.03 ms, mean = 0.02 ms, median = 0.02 ms
[I] Total Host Walltime: 3.0 s
"""


def test_parse_latency_formats():
    assert parse_latency_ms(TRTEXEC) == 1.25  # GPU compute median, not the last median (D2H)
    assert parse_latency_ms(TRTEXEC.replace("GPU Compute Time", "Compute")) == 0.02  # plain last median
    assert parse_latency_ms("total 40 ms\nlatency_ms=12.3\nbye 1 ms") == 12.3
    assert parse_latency_ms('log 5 ms\n{"latency_ms": 7.25, "runs": 10}\n') == 7.25
    assert parse_latency_ms("a 1.5ms b 2e1 ms; 300 items") == 20.0
    assert parse_latency_ms("took 12 msec") is None and parse_latency_ms("") is None
    assert parse_latency_ms("avg=3.5 us; p50=4.0", pattern=r"p50=([\d.]+)") == 4.0
    assert parse_latency_ms("t 9 ms", pattern=r"p50=([\d.]+)") is None  # a custom pattern never falls back


def test_cmd_trtexec_output_and_pattern():
    code = f"print({TRTEXEC!r})"
    assert make_latency_backend("cmd:" + _cmd(code)).measure(tiny_cnn()).value == 1.25
    # the last match counts: this pattern also matches "D2H Latency" ...
    assert make_latency_backend("cmd:" + _cmd(code), pattern=r"Latency: min = ([\d.]+)").measure(tiny_cnn()).value == 0.01
    # ... so anchor it to pick the end-to-end latency line
    r = make_latency_backend("cmd:" + _cmd(code), pattern=r"(?m)^\[I\] Latency: min = (?P<ms>[\d.]+)").measure(tiny_cnn())
    assert r.value == 1.4


def test_cmd_errors_are_user_errors(float_model):
    with pytest.raises(SensqError, match="no latency in milliseconds.*hello") as e:
        make_latency_backend("cmd:" + _cmd("print('hello')")).measure(float_model)
    assert "latency_ms" in e.value.fix
    with pytest.raises(SensqError, match="exited with code 3.*boom"):
        # a number on stdout does not rescue a failing command
        make_latency_backend("cmd:" + _cmd("import sys; print('1 ms'); sys.stderr.write('boom'); sys.exit(3)")).measure(float_model)
    with pytest.raises(SensqError, match="timed out after 1 s"):
        make_latency_backend("cmd:" + _cmd("import time; time.sleep(30)"), timeout=1).measure(float_model)
    with pytest.raises(SensqError, match="not a valid regular expression"):
        make_latency_backend("cmd:echo 1 ms", pattern="(")


# ---------------------------------------------------------------- table


def _write_table(tmp_path, rows, header="node,op_type,float_ms,int8_ms"):
    path = tmp_path / "layers.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


TABLE_ROWS = ["conv1,Conv,4.0,1.0", "sig1,Sigmoid,0.5,0.25", "conv2,Conv,2.0,0.5", "sig2,Sigmoid,0.5,0.25",
              "fc,Gemm,3.0,0.75"]  # flat is missing


def test_table_sums_float_or_int8_per_node(tmp_path, float_model, qdq_all, qdq_no_conv2):
    backend = make_latency_backend(f"table:{_write_table(tmp_path, TABLE_ROWS)}")
    f = backend.measure(float_model)
    assert f.value == 4.0 + 0.5 + 2.0 + 0.5 + 3.0 and f.details["n_int8"] == 0
    assert f.details["missing_nodes"] == ["flat"] and f.details["n_missing_nodes"] == 1
    q = backend.measure(qdq_all)
    assert q.value == 1.0 + 0.25 + 0.5 + 0.25 + 0.75 and q.details["n_int8"] == 5
    assert q.details["missing_nodes"] == ["flat"]  # Q/DQ nodes are not "missing"
    ex = backend.measure(qdq_no_conv2)
    assert ex.value == 1.0 + 0.25 + 2.0 + 0.25 + 0.75  # only conv2 switches back to its float cost
    assert ex.spread == 0.0 and ex.unit == "ms"


def test_table_errors(tmp_path, float_model):
    with pytest.raises(SensqError, match="not found"):
        make_latency_backend(f"table:{tmp_path / 'none.csv'}")
    with pytest.raises(SensqError, match="lacks column.*int8_ms"):
        make_latency_backend("table:" + str(_write_table(tmp_path, ["conv1,4.0"], header="node,float_ms")))
    with pytest.raises(SensqError, match="not numbers"):
        make_latency_backend("table:" + str(_write_table(tmp_path, ["conv1,Conv,fast,1"])))
    with pytest.raises(SensqError, match="twice"):
        make_latency_backend("table:" + str(_write_table(tmp_path, ["conv1,Conv,1,1", "conv1,Conv,2,1"])))
    other = make_latency_backend("table:" + str(_write_table(tmp_path, ["/model.0/conv/Conv,Conv,1,1"])))
    with pytest.raises(SensqError, match="match no node"):
        other.measure(float_model)
    typo = make_latency_backend("table:" + str(_write_table(tmp_path, TABLE_ROWS + ["extra_head,Conv,9.0,9.0"])))
    with pytest.raises(SensqError, match="1 row.*match no node.*extra_head"):  # a typo would silently cost 0
        typo.measure(float_model)
    with pytest.raises(SensqError, match="needs a CSV"):
        make_latency_backend("table:")


def test_table_matches_rows_by_output_tensor_name(tmp_path, float_model, qdq_all):
    """Exporters leave nodes unnamed; a table keyed by output tensor names must cost those nodes (not 0)."""
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(float_model)
    for node in unnamed.graph.node:
        node.name = ""
    rows = ["c1,Conv,4.0,1.0", "s1,Sigmoid,0.5,0.25", "c2,Conv,2.0,0.5", "s2,Sigmoid,0.5,0.25", "y,Gemm,3.0,0.75"]
    backend = make_latency_backend("table:" + str(_write_table(tmp_path, rows)))
    assert backend.measure(unnamed).value == 4.0 + 0.5 + 2.0 + 0.5 + 3.0
    assert backend.measure(qdq_all).value == 1.0 + 0.25 + 0.5 + 0.25 + 0.75  # output names survive QDQ


# ---------------------------------------------------------------- paired measurement and provenance


def test_median_ci_is_the_binomial_order_statistic_interval():
    from math import comb

    from sensq.latency import median_ci

    values = [9.0, 1.0, 5.0, 7.0, 3.0, 11.0, 2.0, 8.0, 4.0, 12.0, 6.0, 10.0]  # 1..12 shuffled
    lo, hi = median_ci(values)
    assert (lo, hi) == (3.0, 10.0)  # x_(3), x_(10) for n = 12
    coverage = 1 - 2 * sum(comb(12, i) for i in range(3)) / 2 ** 12  # P(x_(3) <= median <= x_(10))
    assert coverage >= 0.95 and 1 - 2 * sum(comb(12, i) for i in range(4)) / 2 ** 12 < 0.95  # and the tightest
    assert median_ci([4.0, 1.0, 3.0]) == (1.0, 4.0)  # too few values for 95 %: the whole range


def test_paired_ort_ratio_of_a_model_to_itself_contains_one(float_model):
    from sensq.latency import Reference, measure_paired

    backend = make_latency_backend("ort", threads=1, warmup=2)
    ref = Reference(backend, float_model)
    p = measure_paired(backend, float_model, ref, rounds=12, runs=2)
    ref.close()
    ratios = p.details["round_ratios"]
    assert p.rounds == 12 and len(ratios) == 12 and p.unit == "ms"
    # the interval is the textbook order-statistic interval of the round ratios (3rd and 10th of 12) ...
    assert p.ratio_ci == pytest.approx(median_interval(ratios), abs=1e-5)
    # ... and a model timed against itself has ratio 1 inside the range of its rounds (misses with probability
    # 2 / 2^12 when the rounds are exchangeable; a systematic bias of the alternation would show here)
    assert min(ratios) <= 1.0 <= max(ratios)
    assert p.value > 0 and p.ref_value > 0 and p.value_ci[0] <= p.value <= p.value_ci[1]
    assert p.ratio == pytest.approx(float(np.median(p.details["round_ratios"])), abs=1e-4)  # stored rounded


def test_paired_ort_ratio_tracks_a_slower_model(float_model):
    """A model doing 4x the work is measured slower than its reference, with the interval above 1."""
    from sensq.latency import Reference, measure_paired

    heavy = tiny_cnn()
    heavy.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32  # conv layers on 4x the pixels
    heavy.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 32
    heavy.graph.node[-1].op_type = "ReduceMean"  # drop the size-bound Gemm
    del heavy.graph.node[-1].input[1:]
    del heavy.graph.node[-1].attribute[:]
    heavy.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    backend = make_latency_backend("ort", threads=1, warmup=2)
    ref = Reference(backend, float_model)
    p = measure_paired(backend, heavy, ref)
    assert p.ratio_ci[0] > 1.0 and p.value > p.ref_value


def test_paired_bops_is_exact(float_model, qdq_all):
    from sensq.latency import Reference, measure_paired

    backend = make_latency_backend("bops")
    p = measure_paired(backend, qdq_all, Reference(backend, float_model))
    assert p.ratio == pytest.approx(bops(qdq_all) / bops(float_model)) and p.ratio_ci == (p.ratio, p.ratio)
    assert p.unit == "GBOPs" and p.value == pytest.approx(bops(qdq_all) / 1e9)


def test_structure_key_ignores_values_not_wiring(float_model, qdq_all, qdq_no_conv2):
    from sensq.latency import structure_key

    rescaled = onnx.ModelProto()
    rescaled.CopyFrom(qdq_all)
    scale = next(i for i in rescaled.graph.initializer if i.name.endswith("_scale"))
    arr = numpy_helper.to_array(scale) * 2
    scale.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), scale.name))
    assert structure_key(rescaled) == structure_key(qdq_all)  # other calibration, same graph: one latency
    assert len({structure_key(float_model), structure_key(qdq_all), structure_key(qdq_no_conv2)}) == 3


def test_machine_info_names_isa_and_runtime():
    from sensq.latency import machine_id, machine_info

    info = machine_info(threads=2)
    assert info["threads"] == 2 and info["runtime_version"] and info["machine_id"] == machine_id(info)
    assert machine_id({**info, "threads": 1}) != info["machine_id"]  # other thread count: other machine
    assert machine_id({**info, "date": "2000-01-01"}) == info["machine_id"]  # the date is provenance, not identity


# ------------------------------------------------------------------------------------------------ machine lock
def _hold(lock_dir, exclusive, held, release):
    from sensq.latency import evaluation_lock, measurement_lock

    with (measurement_lock if exclusive else evaluation_lock)(lock_dir):
        held.set()
        release.wait(20)


def _acquires_within(lock, lock_dir, seconds) -> bool:
    """Whether this process gets `lock` within `seconds` (tried on a thread, released at once)."""
    import threading

    got = threading.Event()

    def take():
        with lock(lock_dir):
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    ok = got.wait(seconds)
    return ok, t


@pytest.mark.parametrize("other_exclusive,mine_exclusive,waits", [
    (False, True, True),    # another worker evaluates: a timing waits for it
    (True, False, True),    # another worker times: an evaluation waits for it
    (True, True, True),     # two timings never overlap
    (False, False, False),  # evaluations run side by side
], ids=["timing-waits-for-evaluation", "evaluation-waits-for-timing", "timings-serialized", "evaluations-share"])
def test_machine_lock_across_processes(tmp_path, other_exclusive, mine_exclusive, waits, forkserver):
    from sensq.latency import evaluation_lock, measurement_lock

    ctx = forkserver  # a clean process (no lock or file of this one), as spawn gives, without its imports each time
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), other_exclusive, held, release))
    other.start()
    try:
        assert held.wait(30), "the other process never took its lock"
        ok, thread = _acquires_within(measurement_lock if mine_exclusive else evaluation_lock, tmp_path, 0.5)
        assert ok is (not waits)
        release.set()
        thread.join(10)
        assert not thread.is_alive()  # once the other process lets go, this one gets it
    finally:
        release.set()
        other.join(10)


def test_timing_inside_an_evaluation_is_exclusive_and_goes_back_to_shared(tmp_path, forkserver):
    """Re-entrant within a process: a timing inside this process's own evaluation does not wait for itself, holds
    the machine exclusively (another process cannot evaluate meanwhile), and leaves the shared hold as it was."""
    from sensq.latency import evaluation_lock, measurement_lock

    ctx = forkserver  # not fork: a forked child would share this process's flock
    with evaluation_lock(tmp_path):
        with measurement_lock(tmp_path):
            held, release = ctx.Event(), ctx.Event()
            other = ctx.Process(target=_hold, args=(str(tmp_path), False, held, release))
            other.start()
            assert not held.wait(1.0)  # the other evaluation waits for this timing
        assert held.wait(20)  # back to shared: it may evaluate alongside this one now
        release.set()
        other.join(10)
