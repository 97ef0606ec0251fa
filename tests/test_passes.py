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
