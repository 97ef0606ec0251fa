"""Weight ranges beyond min/max: per-channel MSE clipping of INT8 weights (AIMET's and Quark's MSE weight range).

onnxruntime's quantizer gives each weight channel the scale max|w| / qmax: one outlier weight stretches the step for
the whole channel. Searching the clipping ratio a in [MIN_RATIO, 1] per channel for the smallest ||w - deq(q(w))||²
trades a clipped outlier against finer steps for the rest. It works on the built QDQ model: the weight's int8 values
and scale are rewritten, and the conv's int32 bias is re-quantized to the new bias scale (input scale x weight scale).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .qdq_convs import quantized_convs

RATIOS = np.linspace(0.5, 1.0, 26)


def mse_scales(w: np.ndarray, qmax: int) -> np.ndarray:
    """Per output channel (axis 0): the scale a·max|w|/qmax with the smallest squared rounding + clipping error."""
    flat = np.abs(w.reshape(w.shape[0], -1)).astype(np.float64)
    absmax = flat.max(axis=1)
    safe = np.where(absmax > 0, absmax, 1.0)
    best, best_err = safe / qmax, np.full(len(safe), np.inf)
    for a in RATIOS:
        s = (a * safe / qmax)[:, None]
        err = ((np.clip(np.round(flat / s), 0, qmax) * s - flat) ** 2).sum(axis=1)  # |w| suffices: symmetric grid
        better = err < best_err
        best, best_err = np.where(better, s[:, 0], best), np.where(better, err, best_err)
    return best


def clip_weights_mse(qmodel: onnx.ModelProto, float_model: onnx.ModelProto) -> list[str]:
    """Rewrite every per-channel int8 conv weight of qmodel with MSE scales; returns the changed conv names."""
    index, convs = quantized_convs(qmodel, float_model)
    inits, producer, float_inits = index.inits, index.producer, index.float_inits
    done = []
    for c in convs:
        node, ref, q_init, s_init, w = c.node, c.ref, c.q_init, c.s_init, c.weight
        scale = numpy_helper.to_array(s_init).astype(np.float64)
        if scale.ndim != 1 or len(scale) < 2:
            continue  # per-tensor weights: one scale for all channels, left to onnxruntime
        qmax = int(np.abs(numpy_helper.to_array(q_init)).max())  # 127, or 63 for 7-bit (overflow fix) weights
        new_s = np.minimum(mse_scales(w, qmax), scale)  # never coarser than min/max
        shape = (-1,) + (1,) * (w.ndim - 1)
        q = np.clip(np.round(w / new_s.reshape(shape)), -qmax, qmax).astype(np.int8)
        q_init.CopyFrom(numpy_helper.from_array(q, q_init.name))
        s_init.CopyFrom(numpy_helper.from_array(new_s.astype(numpy_helper.to_array(s_init).dtype), s_init.name))
        if len(node.input) > 2 and node.input[2]:
            _requantize_bias(inits, producer.get(node.input[2]), scale, new_s, float_inits, ref)
        done.append(node.name)
    return done


def _requantize_bias(inits, bdq, old_w_scale, new_w_scale, float_inits, ref) -> None:
    """The int32 bias's scale is input scale x weight scale: follow the new weight scale."""
    if bdq is None or bdq.op_type != "DequantizeLinear" or bdq.input[1] not in inits or len(ref.input) < 3:
        return
    bs_init, bq_init = inits[bdq.input[1]], inits[bdq.input[0]]
    bias = numpy_helper.to_array(float_inits[ref.input[2]]).astype(np.float64)
    bs = numpy_helper.to_array(bs_init).astype(np.float64) * (new_w_scale / old_w_scale)
    info = np.iinfo(np.int32)
    bq = np.clip(np.round(bias / bs), info.min, info.max).astype(np.int32)
    bs_init.CopyFrom(numpy_helper.from_array(bs.astype(numpy_helper.to_array(bs_init).dtype), bs_init.name))
    bq_init.CopyFrom(numpy_helper.from_array(bq, bq_init.name))
