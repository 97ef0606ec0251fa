"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization"; AIMET's and NNCF's CLE) on the float model.

For two convs joined by a positively homogeneous function f (ReLU, or nothing), f(x / s) = f(x) / s for s > 0, so
scaling output channel c of the first conv by 1/s_c and input channel c of the second by s_c leaves the model's
function unchanged while moving weight range between them. s_c = sqrt(r1_c / r2_c) (r = per-channel |w| max) gives
both the same range sqrt(r1_c r2_c), which per-channel INT8 weights quantize with less relative error where one
layer's channels span orders of magnitude (depthwise convs above all).

Only such pairs are equalized. SiLU and ReLU6 are not homogeneous: equalizing across them (an "approx" mode, tried
and removed) changed the float model itself - all-INT8 mAP 0.2962 -> 0.0633 on yolov5n and 0.2810 -> 0.0007 on
YOLOX-Nano, whose channel scales span 100x (bench/bench_ptq.py). So on the shared models only EfficientNet-Lite0's
two conv -> conv pairs qualify. The pass runs before calibration (it changes the activation ranges), so the
statistics key follows the equalized model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

EQUALIZE_MODES = ("none", "exact")
ITERATIONS = 8  # chains (conv-relu-conv-relu-conv) converge in a few sweeps, as in AIMET


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def find_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(first conv, second conv) pairs joined by nothing or a ReLU, with no other consumer."""
    g = model.graph
    cons = _consumers(g)
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    shared = {t for t, us in cons.items() if t in inits and len(us) > 1}
    pairs = []
    for a in g.node:
        if a.op_type != "Conv" or a.input[1] not in inits or a.input[1] in shared or a.output[0] in outputs:
            continue
        t, users = a.output[0], cons.get(a.output[0], [])
        if len(users) == 1 and users[0].op_type == "Relu":
            t = users[0].output[0]
        elif not (len(users) == 1 and users[0].op_type == "Conv"):
            continue
        nxt = cons.get(t, []) if t else []
        if t in outputs or len(nxt) != 1 or nxt[0].op_type != "Conv" or nxt[0].input[0] != t:
            continue
        b = nxt[0]
        if b.input[1] not in inits or b.input[1] in shared:
            continue
        pairs.append((a, b))
    return pairs


def _scale_pair(a, b, arrays: dict[str, np.ndarray]) -> float:
    """Equalize one pair in place (arrays: initializer name -> float64 array); returns the largest log2 change."""
    w1, w2 = arrays[a.input[1]], arrays[b.input[1]]
    c = w1.shape[0]
    depthwise_b = _group(b) == c and w2.shape[1] == 1
    if not depthwise_b and (_group(b) != 1 or w2.shape[1] != c):
        return 0.0  # grouped convs other than depthwise: channel correspondence not one-to-one
    r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
    r2 = np.abs(w2.reshape(c, -1)).max(axis=1) if depthwise_b else np.abs(np.moveaxis(w2, 1, 0).reshape(c, -1)).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones(c)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    shape1 = (c,) + (1,) * (w1.ndim - 1)
    arrays[a.input[1]] = w1 / s.reshape(shape1)
    if len(a.input) > 2 and a.input[2] in arrays:
        arrays[a.input[2]] = arrays[a.input[2]] / s
    if depthwise_b:
        arrays[b.input[1]] = w2 * s.reshape(shape1)
    else:
        arrays[b.input[1]] = w2 * s.reshape((1, c) + (1,) * (w2.ndim - 2))
    return float(np.abs(np.log2(s)).max())


def equalize(model: onnx.ModelProto, mode: str = "exact") -> tuple[onnx.ModelProto, int]:
    """A copy of model with every eligible conv pair equalized; returns it and the number of pairs."""
    if mode == "none":
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = find_pairs(out)
    if not pairs:
        return out, 0
    inits = {i.name: i for i in out.graph.initializer}
    names = {t for a, b in pairs for t in (a.input[1], b.input[1], *a.input[2:3])}
    arrays = {n: numpy_helper.to_array(inits[n]).astype(np.float64) for n in names if n in inits}
    for _ in range(ITERATIONS):
        if max(_scale_pair(a, b, arrays) for a, b in pairs) < 1e-3:
            break
    for n, arr in arrays.items():
        inits[n].CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(inits[n]).dtype), n))
    return out, len(pairs)
