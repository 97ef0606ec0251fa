"""Cross-layer equalization against the model itself: ReLU / identity / depthwise pairs keep the function exactly."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from sensq.passes.equalization import equalize, find_pairs


def _chain(acts: list[str], seed: int = 0) -> onnx.ModelProto:
    """x -> conv0 -act0-> conv1 -act1-> ... ; conv k is depthwise when acts[k-1] ends in '/dw'. Channel ranges are
    made to span 100x so that equalization has something to move."""
    rng = np.random.default_rng(seed)
    c, nodes, inits, t = 6, [], [], "x"
    n_convs = len(acts) + 1
    depthwise = [False] + [a.endswith("/dw") for a in acts]
    for k in range(n_convs):
        w_shape = [c, 1, 3, 3] if depthwise[k] else [c, c if k else 3, 3, 3]
        w = rng.standard_normal(w_shape) * np.logspace(-1, 1, c).reshape(-1, 1, 1, 1)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"b{k}")]
        attrs = {"pads": [1, 1, 1, 1], **({"group": c} if depthwise[k] else {})}
        nodes.append(helper.make_node("Conv", [t, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", **attrs))
        t = f"c{k}"
        if k < len(acts):
            act = acts[k].split("/")[0]
            if act == "relu":
                nodes.append(helper.make_node("Relu", [t], [f"a{k}"], name=f"relu{k}"))
                t = f"a{k}"
            elif act == "silu":
                nodes += [helper.make_node("Sigmoid", [t], [f"s{k}"], name=f"sig{k}"),
                          helper.make_node("Mul", [t, f"s{k}"], [f"a{k}"], name=f"mul{k}")]
                t = f"a{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ranges(model, name, axis):
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def test_exact_pairs_keep_the_function_and_balance_the_ranges():
    model = _chain(["relu", "none", "relu/dw", "relu"])
    eq, n = equalize(model, "exact")
    assert n == 4
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, got = _run(model, x), _run(eq, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the last pair converged: conv3's output channels and conv4's input channels have equal ranges
    r1, r2 = _ranges(eq, "w3", 0), _ranges(eq, "w4", 1)
    np.testing.assert_allclose(r1, r2, rtol=0.05)
    before = _ranges(model, "w0", 0)
    assert before.max() / before.min() > 10 > _ranges(eq, "w0", 0).max() / _ranges(eq, "w0", 0).min()


def test_silu_and_relu6_pairs_are_left_alone():
    """Not homogeneous: equalizing across them changes the float model (measured: yolov5n all-INT8 0.2962 -> 0.0633)."""
    model = _chain(["silu", "relu"])
    assert [(a.name, b.name) for a, b in find_pairs(model)] == [("conv1", "conv2")]


def test_shared_weights_and_branching_outputs_are_left_alone():
    model = _chain(["relu", "relu"])
    extra = helper.make_tensor_value_info("a0", onnx.TensorProto.FLOAT, None)
    model.graph.output.append(extra)  # conv0's activation is also a model output: scaling it would change it
    pairs = find_pairs(model)
    assert [(a.name, b.name) for a, b in pairs] == [("conv1", "conv2")]


def test_equalize_option_reaches_the_calibrated_model(tmp_path):
    """--equalize exact: the workspace's model is the equalized one (statistics follow it) and the plan says so."""
    from sensq.defaults import build_config
    from sensq.quantize import prepare
    from tests.tiny_models import write_arrays

    path = tmp_path / "m.onnx"
    onnx.save(_chain(["relu", "relu"]), str(path))
    write_arrays(tmp_path / "d", [1, 3, 8, 8], 4)
    cfg = build_config(model=path, calib=[str(tmp_path / "d")], file_type="npy", equalize="exact", skip_simplify=True,
                       cache_dir=str(tmp_path / "cache"))
    ws = prepare(cfg, progress=False)
    eq, _ = equalize(onnx.load(str(path)), "exact")
    w = {i.name: numpy_helper.to_array(i) for i in ws.model.graph.initializer}
    np.testing.assert_array_equal(w["w0"], numpy_helper.to_array(eq.graph.initializer[0]))
    assert any("equalization (exact)" in n for n in ws.base_plan.notes)
