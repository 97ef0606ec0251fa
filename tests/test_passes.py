"""Graph passes on built QDQ models, against numpy references: fast bias correction."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from sensq.build import QDQBuilder, prepare_model
from sensq.plan import PrecisionPlan
from sensq.statistics import collect
from tests.tiny_models import conv_relu_conv


def _dq(inits, producer, tensor):
    dq = producer[tensor]
    q, s = (numpy_helper.to_array(inits[x]).astype(np.float64) for x in dq.input[:2])
    z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
    shape = [-1] + [1] * (q.ndim - 1) if np.ndim(s) else [1]
    return (q - np.reshape(z, shape if np.ndim(z) else [1])) * np.reshape(s, shape)


def test_fast_bias_correction_makes_the_mean_output_equal_fp32s(tmp_path):
    """conv2 (1x1, no padding) with its quantized weights and corrected bias, fed the FP32 inputs of the calibration
    set, has FP32's mean output per channel (to the bias' int32 step); uncorrected it does not."""
    model = prepare_model(onnx.load(conv_relu_conv(tmp_path / "m.onnx")))
    rng = np.random.default_rng(3)
    feeds = [{"x": (rng.standard_normal((1, 3, 8, 8)) + 1.5).astype(np.float32)} for _ in range(16)]
    stats = collect(model, feeds, len(feeds), progress=False)
    builder = QDQBuilder(model, stats)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name="r1"))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    r1, y = zip(*[(o[1], o[0]) for o in (sess.run(["y", "r1"], f) for f in feeds)])
    fp32_mean = np.mean([v.mean(axis=(0, 2, 3)) for v in y], axis=0)
    r1_mean = np.mean([v.mean(axis=(0, 2, 3)) for v in r1], axis=0)
    errors = {}
    for bc in (None, "fast"):
        q = builder.build(PrecisionPlan(method="minmax", per_channel=False, bias_correction=bc))
        inits = {i.name: i for i in q.graph.initializer}
        producer = {o: n for n in q.graph.node for o in n.output}
        conv2 = next(n for n in q.graph.node if n.name == "conv2")
        w, b = _dq(inits, producer, conv2.input[1]), _dq(inits, producer, conv2.input[2])
        q_mean = w[:, :, 0, 0] @ r1_mean + b  # a 1x1 conv is linear: its mean output is W·E[x] + b
        errors[bc] = np.abs(q_mean - fp32_mean)
        step = numpy_helper.to_array(inits[producer[conv2.input[2]].input[1]])
    assert np.all(errors["fast"] <= step * 0.5 + 1e-6)
    assert errors[None].max() > 4 * errors["fast"].max()


def test_mse_weight_clipping_lowers_each_channels_weight_error_and_keeps_the_bias_scale_relation(tmp_path):
    """Against a brute-force per-channel search: every clipped channel's squared weight error is the smallest on the
    ratio grid and no larger than min/max's; the int32 bias scale stays input scale x weight scale (QLinearConv's)."""
    from sensq.passes.weight_clipping import RATIOS

    model = prepare_model(onnx.load(conv_relu_conv(tmp_path / "m.onnx")))
    w_float = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w_float["w2"][0, 0, 0, 0] *= 20  # an outlier: min/max stretches channel 0's step for it
    for init in model.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(w_float["w2"].astype(np.float32), "w2"))
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    builder = QDQBuilder(model, collect(model, feeds, len(feeds), progress=False))
    built = {wr: builder.build(PrecisionPlan(method="minmax", weight_range=wr)) for wr in (None, "mse")}
    errors = {}
    for wr, q in built.items():
        inits = {i.name: i for i in q.graph.initializer}
        producer = {o: n for n in q.graph.node for o in n.output}
        conv = next(n for n in q.graph.node if n.name == "conv2")
        w_deq = _dq(inits, producer, conv.input[1])
        errors[wr] = ((w_deq - w_float["w2"]) ** 2).reshape(len(w_deq), -1).sum(axis=1)
        x_scale = numpy_helper.to_array(inits[producer[conv.input[0]].input[1]]).astype(np.float64)
        w_scale = numpy_helper.to_array(inits[producer[conv.input[1]].input[1]]).astype(np.float64)
        b_scale = numpy_helper.to_array(inits[producer[conv.input[2]].input[1]]).astype(np.float64)
        np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=3e-5)  # float32 scales
    absmax = np.abs(w_float["w2"]).reshape(len(w_float["w2"]), -1).max(axis=1)
    brute = []
    for c, row in enumerate(np.abs(w_float["w2"]).reshape(len(absmax), -1)):
        errs = [((np.clip(np.round(row / (a * absmax[c] / 127)), 0, 127) * a * absmax[c] / 127 - row) ** 2).sum()
                for a in RATIOS]
        brute.append(min(errs))
    assert np.all(errors["mse"] <= errors[None] + 1e-12)
    np.testing.assert_allclose(errors["mse"], brute, rtol=1e-4)  # float32 scales
    # At 8 bits clipping rarely pays (an outlier clipped costs more than the finer step saves); on a 4-bit grid
    # (qmax 7) a Gaussian 3x3x32 kernel is clipped, and its error falls
    from sensq.passes.weight_clipping import mse_scales

    w = np.random.default_rng(5).standard_normal((4, 32, 3, 3))
    s, minmax = mse_scales(w, 7), np.abs(w).reshape(4, -1).max(axis=1) / 7
    err = lambda c, sc: ((np.clip(np.round(w[c] / sc), -7, 7) * sc - w[c]) ** 2).sum()
    assert all(s[c] < 0.9 * minmax[c] and err(c, s[c]) < 0.8 * err(c, minmax[c]) for c in range(4))
