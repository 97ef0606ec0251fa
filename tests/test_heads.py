"""Detector heads: today's Ultralytics float regions pinned, the structural rule finding the same tail without names,
the statistics pass, end-to-end YOLO26 heads, and float nodes on unnamed graphs (what ONNX Runtime really runs)."""
from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.cli import main
from sensq.config import config_from_dict
from sensq.heads import (
    HeadInfo,
    confirm_head,
    detect_head,
    structural_head,
    tail_findings,
    ultralytics_head,
)
from sensq.model import Graph, load_model, name_nodes
from sensq.ort_compat import requantizes_float_weights
from sensq.passes.float_shield import shield_float_nodes
from sensq.quantize import load_and_simplify

# Float regions of the name rule as computed before the structural rule existed (commit f6e5f0d), on the simplified
# model: (kind, head convs, node count, sha256 of the sorted node names, first 16 hex digits).
PINNED = {
    "yolov5n.onnx": ("yolov5", [f"/model.24/m.{i}/Conv" for i in range(3)], 37, "a80c3a7fe2db7d9f"),
    "yolov8n-arch-random.onnx": ("yolov8", [f"/model.22/cv{b}.{i}/cv{b}.{i}.2/Conv" for b in (2, 3) for i in range(3)],
                                 24, "8f350c6018f07cb3"),
    "yolo11n-arch-random.onnx": ("yolov8", [f"/model.23/cv{b}.{i}/cv{b}.{i}.2/Conv" for b in (2, 3) for i in range(3)],
                                 24, "5d2b0ff029d547cb"),
    "yolo26n-arch-random.onnx": ("yolov8", [f"/model.23/cv{b}.{i}/cv{b}.{i}.2/Conv" for b in (2, 3) for i in range(3)],
                                 19, "e867f21ca9893822"),
}
E2E = "yolo26n-e2e-arch-random.onnx"


def _model(data_dir, name):
    path = data_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data")
    return path


def _simplified(path) -> Graph:
    return Graph(load_and_simplify(config_from_dict({"model_parameters": {"onnx_model": str(path)}})))


def _digest(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_ultralytics_float_regions_are_unchanged(data_dir, name):
    kind, convs, n, digest = PINNED[name]
    g = _simplified(_model(data_dir, name))
    head = detect_head(g)
    assert head is not None and head.source == "names" and head.kind == kind
    assert head.cut_tensors == [f"{c}_output_0" for c in convs]
    assert len(head.float_nodes) == n and _digest(head.float_nodes) == digest
    # The structural rule is the general case: without looking at names it finds the same tail.
    assert structural_head(g).float_nodes == head.float_nodes


@pytest.mark.parametrize("name", [*sorted(PINNED), E2E])
def test_structure_finds_the_tail_on_name_stripped_exports(data_dir, name):
    path = _model(data_dir, name)
    named = Graph(load_model(path))
    stripped = load_model(path)
    for i, node in enumerate(stripped.graph.node):  # what older exporters write: '<op>_<index>'
        node.name = f"{node.op_type}_{i}"
    head = detect_head(Graph(stripped))
    reference = ultralytics_head(named)
    index = {n.name: i for i, n in enumerate(named.model.graph.node)}
    assert head is not None and head.source == "structure" and reference is not None
    assert head.float_nodes == {f"{named.nodes[n].op_type}_{index[n]}" for n in reference.float_nodes}
    assert head.kind == ("end2end" if name == E2E else "detector")


def test_classifier_and_plain_models_have_no_head(imagenet_dir, tmp_path):
    from tests.tiny_models import conv_relu_conv, two_input_model

    assert detect_head(Graph(load_model(imagenet_dir / "efficientnet_lite0.onnx"))) is None
    assert detect_head(Graph(load_model(conv_relu_conv(tmp_path / "a.onnx")))) is None
    assert detect_head(Graph(load_model(two_input_model(tmp_path / "b.onnx")))) is None  # two convs, no decode


# ------------------------------------------------------------------------------------------- statistics pass
def _tiny_detector(box_scale: float) -> onnx.ModelProto:
    """Two head convs on one feature map: boxes (conv_b -> reshape -> * box_scale) and scores (conv_c -> reshape
    -> sigmoid), concatenated to [1, 64, 8]: a detector's tail in miniature. Every node is unnamed."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3)
    inits = [w(8, 3, 3, 3), w(4, 8, 1, 1), w(4, 8, 1, 1)]
    for t, name in zip(inits, ("w0", "wb", "wc")):
        t.name = name
    inits += [numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape"),
              numpy_helper.from_array(np.array(box_scale, np.float32), "scale")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["f"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["b"]), helper.make_node("Conv", ["r", "wc"], ["c"]),
             helper.make_node("Reshape", ["b", "shape"], ["b2"]), helper.make_node("Reshape", ["c", "shape"], ["c2"]),
             helper.make_node("Mul", ["b2", "scale"], ["boxes"]), helper.make_node("Sigmoid", ["c2"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["y0"], axis=1),
             helper.make_node("Transpose", ["y0"], ["y"], perm=[0, 2, 1])]
    graph = helper.make_graph(nodes, "tiny_det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what the onnxruntime here reads
    return model


def _stats(model, n=4):
    """min/max of every tensor over n random inputs, straight from onnxruntime (no sensq code)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o for node in m.graph.node for o in node.output]
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    outs = [sess.run(names, {"x": rng.random((1, 3, 8, 8), np.float32)}) for _ in range(n)]
    return {t: SimpleNamespace(min=min(float(o[i].min()) for o in outs), max=max(float(o[i].max()) for o in outs))
            for i, t in enumerate(names)}


def test_structural_tail_is_confirmed_by_ranges_and_probabilities():
    model = _tiny_detector(box_scale=640.0)
    g = Graph(model)
    head = structural_head(g)
    assert head is not None and head.source == "structure"
    assert {g.nodes[n].op_type for n in head.float_nodes} == {"Reshape", "Mul", "Sigmoid", "Concat", "Transpose"}
    stats = _stats(model)
    found = tail_findings(g, head.float_nodes, stats)
    concat = next(n for n in head.float_nodes if g.nodes[n].op_type == "Concat")
    boxes, scores = (max(abs(stats[t].min), abs(stats[t].max)) for t in g.nodes[concat].input)
    assert boxes / scores > 16  # the hand check the rule repeats
    assert any(f.startswith(concat) and f"{boxes / scores:.0f}x" in f for f in found)
    assert any(f.startswith("probabilities") for f in found)
    confirmed = confirm_head(head, g, stats)
    assert confirmed is head and "measured:" in head.reason and concat in head.reason


def test_structural_tail_without_range_problem_is_quantized():
    model = _tiny_detector(box_scale=1.0)
    g = Graph(model)
    stats = _stats(model)
    head = structural_head(g)
    # similar ranges and no probabilities: nothing to protect, so the tail is not kept float
    no_sigmoid = {n for n in head.float_nodes if g.nodes[n].op_type != "Sigmoid"}
    findings = tail_findings(g, no_sigmoid, stats)
    concat = next(n for n in head.float_nodes if g.nodes[n].op_type == "Concat")
    ratio = max(max(abs(stats[t].min), abs(stats[t].max)) for t in g.nodes[concat].input) / \
        min(max(abs(stats[t].min), abs(stats[t].max)) for t in g.nodes[concat].input)
    assert ratio < 16 and findings == []
    assert confirm_head(HeadInfo("detector", head.cut_tensors, no_sigmoid, "x", "structure"), g, stats) is None
    # a tail found by names is the known decode: kept even without a measured problem
    kept = confirm_head(HeadInfo("yolov5", head.cut_tensors, no_sigmoid, "x", "names"), g, stats)
    assert kept is not None and kept.float_nodes == no_sigmoid


# ------------------------------------------------------------------------------------- end-to-end YOLO26 head
def test_end_to_end_head_keeps_topk_tail_float(data_dir, coco_dir, tmp_path, capfd):
    path = _model(data_dir, E2E)
    g = _simplified(path)
    head = detect_head(g)
    assert head.kind == "end2end" and head.layout == "end2end" and head.source == "names"
    ops = {g.nodes[n].op_type for n in head.float_nodes}
    assert {"TopK", "GatherElements", "Concat", "Sigmoid"} <= ops
    assert head.cut_tensors == [f"/model.23/one2one_cv{b}.{i}/one2one_cv{b}.{i}.2/Conv_output_0" for b in (2, 3) for i in range(3)]

    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"{p}\n" for p in sorted((coco_dir / "train2017").glob("*.jpg"))[:4]))
    out = tmp_path / "e2e.q.onnx"
    # --placement fused: what the default picks here (random weights: both placements' errors are 0), without the
    # probe that measures both (tests/test_yolox_int8.py covers it)
    assert main(["quantize", "--model", str(path), "--calib", str(calib), "--no-analysis", "-q", "-o", str(out),
                 "--placement", "fused"]) == 0
    printed = capfd.readouterr().out
    assert f"kept float ({len(head.float_nodes)} nodes): end-to-end" in printed and "TopK" in printed
    q = onnx.load(str(out))
    produced_after = {o for n in head.float_nodes for o in g.nodes[n].output}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 100, "the backbone is quantized"
    assert not {n.input[0] for n in qdq} & produced_after, "Q/DQ on a tensor after the cut"
    q_input = {n.output[0]: n.input[0] for n in qdq if n.op_type == "QuantizeLinear"}
    dequantized = {n.output[0]: q_input.get(n.input[0]) for n in qdq if n.op_type == "DequantizeLinear"}
    read = {dequantized[x] for n in q.graph.node if n.name in head.float_nodes for x in n.input if x in dequantized}
    assert read <= set(head.cut_tensors), "a node after the cut reads a dequantized tensor other than the cut"


# --------------------------------------------------------------------------------- float nodes, unnamed graph
def test_name_nodes_gives_unique_names_and_keeps_given_ones():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
         helper.make_node("Relu", ["b"], ["c"], name="dup"), helper.make_node("Relu", ["c"], ["d"], name="dup")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])]))
    assert name_nodes(m) == 2
    names = [n.name for n in m.graph.node]
    assert names[1:3] == ["Relu_0", "dup"] and len(set(names)) == 4  # given names stay, the rest are unique
    assert name_nodes(m) == 0


def _unnamed_chain(path, n_convs=4, channels=8):
    """x -> (Conv -> SiLU) x n_convs -> y, every node unnamed (as older exporters write them). SiLU (Sigmoid, Mul),
    not Relu: onnxruntime's quantizer folds a Relu after a quantized Conv into the Q, which would change the node
    list with the precision."""
    rng = np.random.default_rng(3)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(n_convs):
        w = rng.standard_normal((channels, cin, 3, 3)).astype(np.float32)
        w *= rng.uniform(0.01, 1.0, (channels, 1, 1, 1)).astype(np.float32)  # unequal channel ranges, as BN folding leaves
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]), helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", channels
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _qdq_view(q: onnx.ModelProto) -> dict:
    """node name -> (op, per input: produced by a DequantizeLinear?, per output: read by a QuantizeLinear?)"""
    prod = {o: n for n in q.graph.node for o in n.output}
    cons = {}
    for n in q.graph.node:
        for x in n.input:
            cons.setdefault(x, []).append(n)
    return {n.name: (n.op_type, tuple(x in prod and prod[x].op_type == "DequantizeLinear" for x in n.input),
                     tuple(any(c.op_type == "QuantizeLinear" for c in cons.get(o, [])) for o in n.output))
            for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}


@pytest.mark.parametrize("naming", ["empty", "op_index"])
def test_float_nodes_on_unnamed_graph_change_exactly_those_nodes(tmp_path, naming):
    from tests.tiny_models import write_arrays

    path = _unnamed_chain(tmp_path / "m.onnx")
    if naming == "op_index":
        m = onnx.load(str(path))
        for i, n in enumerate(m.graph.node):
            n.name = f"{n.op_type}_{i}"
        onnx.save(m, str(path))
    calib = tmp_path / "calib"
    write_arrays(calib, [1, 3, 16, 16], 8)
    base = ["quantize", "--model", str(path), "--calib", str(calib), "--file-type", "npy", "--no-analysis", "-q"]
    assert main([*base, "-o", str(tmp_path / "int8.onnx")]) == 0
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    convs = [n.name for n in int8.graph.node if n.op_type == "Conv"]
    chosen = [convs[1], convs[2]]  # names as the reports print them; the second reads a dequantized tensor
    assert main([*base, "-o", str(tmp_path / "mixed.onnx"), "--float-nodes", *chosen]) == 0
    mixed = onnx.load(str(tmp_path / "mixed.onnx"))

    a, b = _qdq_view(int8), _qdq_view(mixed)
    assert set(a) == set(b), "the same nodes, under the same names"
    changed = sorted(n for n in a if a[n] != b[n])
    assert changed == sorted(chosen)
    inits = {i.name for i in mixed.graph.initializer}
    for n in mixed.graph.node:
        if n.name in chosen:
            assert all(x in inits for x in n.input[1:]), "float weights and bias, no DequantizeLinear"
            assert a[n.name][1][1:] == (True, True), "they were quantized in the all-INT8 build"
    # Outputs: a float node's output is quantized only for a quantized consumer, exactly as in the all-INT8 model.
    assert all(a[n][2] == b[n][2] for n in chosen)


def _conv_io_in_onnxruntime(q: onnx.ModelProto, conv: str, feed):
    """(input, output) of `conv` as onnxruntime computes them with all graph optimizations on."""
    m = onnx.ModelProto()
    m.CopyFrom(q)
    node = next(n for n in m.graph.node if n.name == conv)
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in (node.input[0], node.output[0]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        [node.input[0], node.output[0]], feed), node


def _float_conv(node, weights, x):
    """The same Conv in float32, run alone (the reference)."""
    w, b = weights[node.input[1]], weights[node.input[2]]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_float_conv_runs_in_float_in_onnxruntime(tmp_path):
    """The cause of 'keeping two flagged convs float collapsed the model': onnxruntime >= 1.21 quantizes the float
    weights of a Conv that reads a DequantizeLinear output, per tensor. sensq's built models shield such nodes."""
    from sensq.quantize import prepare
    from tests.tiny_models import write_arrays

    path = _unnamed_chain(tmp_path / "m.onnx")
    write_arrays(tmp_path / "calib", [1, 3, 16, 16], 8)
    cfg = config_from_dict({"model_parameters": {"onnx_model": str(path)},
                            "calibration_parameters": {"input_parametres": [{"file_type": "npy", "data_list_path": str(tmp_path / "calib")}]}})
    ws = prepare(cfg, progress=False)
    conv = [n.name for n in ws.model.graph.node if n.op_type == "Conv"][2]
    plan = ws.base_plan.with_float([conv])
    weights = {i.name: numpy_helper.to_array(i) for i in ws.model.graph.initializer}
    feed = {"x": np.random.default_rng(5).random((1, 3, 16, 16), np.float32)}

    (x, y), node = _conv_io_in_onnxruntime(ws.build(plan), conv, feed)
    np.testing.assert_allclose(y, _float_conv(node, weights, x), rtol=1e-4, atol=1e-5)

    raw = ws.builder.build(plan)  # the builder's model without the shield
    (x2, y2), node2 = _conv_io_in_onnxruntime(raw, conv, feed)
    err = np.abs(y2 - _float_conv(node2, weights, x2)).max() / np.abs(y2).max()
    if not requantizes_float_weights():  # onnxruntime 1.20
        assert err < 1e-4  # the unshielded float conv already runs in float
        return
    assert err > 1e-3, ("onnxruntime no longer re-quantizes float Conv weights behind a DequantizeLinear; "
                        "sensq.passes.float_shield.shield_float_nodes may be unnecessary now")
    assert shield_float_nodes(raw, plan.float_nodes) == 1 and shield_float_nodes(raw, plan.float_nodes) == 0
