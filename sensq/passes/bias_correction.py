"""Fast bias correction (Nagel et al. 2019, "Data-Free Quantization"; NNCF's FastBiasCorrection): rounding a conv's
weights shifts its output mean by ΔW·E[x]; adding the opposite to the bias makes the quantized conv's mean output
equal the float conv's for the calibration inputs' mean (exactly, away from zero padding).

It works on the built QDQ model, so the weight error is the one onnxruntime's quantizer actually made (per-channel
or per-tensor, 7-bit first layers): ΔW = DequantizeLinear(W_q) - W; the int32 bias moves by round(-ΔW·E[x] / s_b).
E[x] per input channel comes from the calibration pass (CalibrationStats.means of the FP32 conv inputs).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _dequantized(inits: dict, dq: onnx.NodeProto) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if np.ndim(s):
        shape[axis] = -1
    return (q - np.reshape(z, shape)) * np.reshape(s, shape)


def output_shift(w_float: np.ndarray, w_deq: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    """ΔW·E[x] per output channel of a (grouped) conv: the mean output error weight rounding adds."""
    out_ch, in_per_group = w_float.shape[:2]
    dw = (w_deq - w_float).sum(axis=tuple(range(2, w_float.ndim)))  # [O, I/g]: kernel taps see the same mean
    groups = mean.reshape(group, in_per_group)
    per_out = np.repeat(groups, out_ch // group, axis=0)  # the input channels each output channel reads
    return (dw * per_out).sum(axis=1)


def correct_biases(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, means: dict[str, np.ndarray]) -> list[str]:
    """Shift the int32 bias of every quantized conv whose input mean is known; returns the corrected conv names."""
    g = qmodel.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    float_convs = {n.name: n for n in float_model.graph.node if n.op_type == "Conv"}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    done = []
    for node in g.node:
        ref = float_convs.get(node.name)
        if node.op_type != "Conv" or ref is None or len(node.input) < 3 or ref.input[0] not in means:
            continue
        wdq, bdq = producer.get(node.input[1]), producer.get(node.input[2])
        if not (wdq is not None and bdq is not None and wdq.op_type == bdq.op_type == "DequantizeLinear"
                and wdq.input[0] in inits and bdq.input[0] in inits and ref.input[1] in float_inits):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = numpy_helper.to_array(float_inits[ref.input[1]]).astype(np.float64)
        shift = output_shift(w, _dequantized(inits, wdq), np.asarray(means[ref.input[0]], np.float64), group)
        qb = inits[bdq.input[0]]
        scale = numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)
        new = numpy_helper.to_array(qb).astype(np.int64) - np.round(shift / scale).astype(np.int64)
        info = np.iinfo(np.int32)
        qb.CopyFrom(numpy_helper.from_array(np.clip(new, info.min, info.max).astype(np.int32), qb.name))
        done.append(node.name)
    return done
