"""Learned weight rounding: per conv, the INT8 weights and bias that best reproduce the FP32 conv's output from the
inputs the quantized model actually feeds it, on calibration data (no labels).

Objective per conv (and per group of a grouped conv): min ||y - Ŵ x̃||² over Ŵ on the weight grid, where y is the
FP32 model's conv output and x̃ the quantized model's conv input (im2col rows, a random subset of output positions
per image). The asymmetric target is AdaQuant's and AIMET's Sequential MSE's: Ŵ also absorbs the error upstream
activation quantization put into x̃. The rounding itself is GPTQ's (Frantar et al. 2022, after Optimal Brain
Quantization): columns are rounded one at a time and each one's error is fed back into the columns not rounded yet,
through the inverse of H = x̃ᵀx̃. The bias is the last column and is never rounded, so it ends at the best value for
the rounded weights: empirical bias correction, with the quantized predecessors in place. Everything reads the
moments H, x̃ᵀy, yᵀy; no activation is stored, numpy only.

Honesty check per conv: calibration images alternate between a fitting half A and a checking half B. A conv keeps
its learned weights only if its reconstruction error is no larger than nearest rounding's on A and on B; otherwise
it keeps nearest rounding (reported). Weight scales are the built model's (min/max or --weight-range mse); only the
int8 values and the int32 bias change. Gemm/MatMul layers keep nearest rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .qdq_convs import quantized_convs

POSITIONS_PER_IMAGE = 1024  # output positions sampled per image and conv (all of them when fewer)
DAMPING = 0.01  # of H's mean diagonal, as in GPTQ: keeps the inverse finite for dead or collinear inputs


@dataclass
class ConvSite:
    """One quantized conv of the built model and where its tensors are."""

    name: str
    group: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    float_output: str  # in the float model
    q_input: str  # in the quantized model: what the conv reads (a DequantizeLinear output)
    weight_init: str  # int8 initializer
    weight_scale: np.ndarray  # [O] or scalar
    qmax: int
    weight_float: np.ndarray  # [O, C/g, kh, kw]
    bias_float: np.ndarray | None  # [O], None when the conv has no bias
    bias_init: str | None = None  # int32 initializer (quantized bias) or float initializer
    bias_scale: np.ndarray | None = None  # None: float bias


@dataclass
class Moments:
    """Sufficient statistics of one conv on one half of the calibration images, per group g."""

    h: np.ndarray  # [g, K+1, K+1]: x̃ᵀx̃ with a ones column last (the bias)
    b: np.ndarray  # [g, K+1, O/g]: x̃ᵀy
    yy: float = 0.0


@dataclass
class RoundingResult:
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # conv -> int8 weights
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # conv -> float bias the int32 bias is made from
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # conv -> {"nearest": e, "learned": e} (A+B)
    kept_nearest: list[str] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    truncated: bool = False  # the time budget stopped it: not cached

    def summary(self) -> str:
        total = len(self.weights) + len(self.kept_nearest)
        gain = [e["learned"] / e["nearest"] for e in self.errors.values() if e["nearest"] > 0 and e["learned"] < e["nearest"]]
        med = f", median error ratio {np.median(gain):.3f} of nearest" if gain else ""
        return (f"learned rounding: {len(self.weights)}/{total} convs changed ({len(self.kept_nearest)} kept nearest: "
                f"no better on both calibration halves){med}; {self.images} images, {self.seconds:.1f} s")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return tuple(a.ints) if a.ints else a.i
    return default


def find_sites(qmodel: onnx.ModelProto, float_model: onnx.ModelProto) -> list[ConvSite]:
    """2-D convs whose weight the quantized model reads through an int8 DequantizeLinear of its own."""
    index, convs = quantized_convs(qmodel, float_model)
    sites = []
    for c in convs:
        node, ref, w = c.node, c.ref, c.weight
        if w.ndim != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", 0, "NOTSET"):
            continue  # 1-D/3-D convs and SAME_* padding (rare in exports): left to nearest rounding
        qmax = 63 if int(np.abs(numpy_helper.to_array(c.q_init)).max()) <= 64 else 127
        site = ConvSite(node.name, int(_attr(node, "group", 1)), tuple(w.shape[2:]), tuple(_attr(node, "strides", (1, 1))),
                        tuple(_attr(node, "pads", (0, 0, 0, 0))), tuple(_attr(node, "dilations", (1, 1))), ref.output[0],
                        node.input[0], c.q_init.name, numpy_helper.to_array(c.s_init).astype(np.float64), qmax, w, None)
        if len(ref.input) > 2 and ref.input[2] in index.float_inits and len(node.input) > 2 and node.input[2]:
            site.bias_float = numpy_helper.to_array(index.float_inits[ref.input[2]]).astype(np.float64)
            bdq = index.producer.get(node.input[2])
            if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in index.inits and bdq.input[1] in index.inits:
                site.bias_init, site.bias_scale = bdq.input[0], numpy_helper.to_array(index.inits[bdq.input[1]]).astype(np.float64)
            elif node.input[2] in index.inits:
                site.bias_init = node.input[2]
            else:
                site.bias_float = None
        sites.append(site)
    return sites


def nearest_weights(qmodel: onnx.ModelProto, site: ConvSite) -> np.ndarray:
    q = numpy_helper.to_array(next(i for i in qmodel.graph.initializer if i.name == site.weight_init))
    return q.astype(np.float64) * per_row(site.weight_scale, q.ndim)


def per_row(scale: np.ndarray, ndim: int) -> np.ndarray:
    return np.reshape(scale, (-1,) + (1,) * (ndim - 1)) if np.ndim(scale) else scale


# moments ---------------------------------------------------------------------------------------------------------
def patches(x: np.ndarray, site: ConvSite, positions: np.ndarray, out_w: int) -> np.ndarray:
    """im2col rows of x [C, H, W] at the given flat output positions: [g, n, (C/g)·kh·kw], the weight's order."""
    pt, pl, pb, pr = site.pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr)))
    oh, ow = positions // out_w, positions % out_w
    rows = oh[:, None] * site.strides[0] + np.arange(site.kernel[0]) * site.dilations[0]
    cols = ow[:, None] * site.strides[1] + np.arange(site.kernel[1]) * site.dilations[1]
    p = xp[:, rows[:, :, None], cols[:, None, :]]  # [C, n, kh, kw]
    c, n = p.shape[:2]
    p = p.reshape(site.group, c // site.group, n, -1).transpose(0, 2, 1, 3)
    return p.reshape(site.group, n, -1)


def accumulate(m: Moments | None, site: ConvSite, x_q: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Moments:
    """Add one image: x_q [C, H, W] the quantized model's conv input, y [O, OH, OW] the FP32 conv output."""
    out_ch, out_h, out_w = y.shape
    total = out_h * out_w
    pos = np.sort(rng.choice(total, POSITIONS_PER_IMAGE, replace=False)) if total > POSITIONS_PER_IMAGE else np.arange(total)
    x = patches(x_q.astype(np.float32), site, pos, out_w)
    x = np.concatenate([x, np.ones(x.shape[:2] + (1,), np.float32)], axis=2)  # the bias column
    t = y.reshape(site.group, out_ch // site.group, total)[:, :, pos].transpose(0, 2, 1).astype(np.float32)
    h, b = np.matmul(x.transpose(0, 2, 1), x), np.matmul(x.transpose(0, 2, 1), t)
    if m is None:
        m = Moments(np.zeros(h.shape), np.zeros(b.shape))
    m.h += h
    m.b += b
    m.yy += float(np.square(t, dtype=np.float64).sum())
    return m


def error(w_aug: np.ndarray, m: Moments) -> float:
    """||y - Ŵ x̃||² from the moments, Ŵ = [W | b] as [g, O/g, K+1]."""
    quad = np.einsum("grk,gkl,grl->", w_aug, m.h, w_aug)
    return float(m.yy - 2.0 * np.einsum("grk,gkr->", w_aug, m.b) + quad)


# solve -----------------------------------------------------------------------------------------------------------
def gptq(w_aug: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round columns 0..K-1 of w_aug [g, r, K+1] onto the grid (scale per row [g, r]), feeding each column's error
    into the later ones through the upper Cholesky factor of H⁻¹; the bias column K absorbs what is left."""
    w = w_aug.copy()
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # H⁻¹ = UᵀU, U upper
    for i in range(w.shape[2] - 1):
        col = w[:, :, i]
        q = np.clip(np.round(col / scale), -qmax, qmax) * scale
        err = (col - q) / u[:, i, i][:, None]
        w[:, :, i:] -= err[:, :, None] * u[:, None, i, i:]
        w[:, :, i] = q  # exact, not left to the subtraction's rounding
    return w


def damped(h: np.ndarray) -> np.ndarray:
    diag = np.einsum("gkk->gk", h)
    lam = DAMPING * np.maximum(diag.mean(axis=1), 1e-12)
    out = h + lam[:, None, None] * np.eye(h.shape[1])
    dead = diag <= 0  # an input channel that is always 0 (ReLU'd, padded): any weight is as good as another
    if dead.any():
        out[np.where(dead)[0], np.where(dead)[1], np.where(dead)[1]] += 1.0
    return out


def solve(site: ConvSite, w_nearest: np.ndarray, fit: Moments, check: Moments) -> tuple[np.ndarray, np.ndarray, dict]:
    """Best of {nearest, nearest + refit bias, GPTQ from the float weights, GPTQ from the least-squares weights}
    by the fitting half, kept only where no worse than nearest on both halves. Returns (weights, bias, errors)."""
    g = site.group
    rows = site.weight_float.shape[0] // g
    shape = site.weight_float.shape
    has_bias = site.bias_float is not None
    k1 = fit.h.shape[1] if has_bias else fit.h.shape[1] - 1
    hf, hc = Moments(fit.h[:, :k1, :k1], fit.b[:, :k1], fit.yy), Moments(check.h[:, :k1, :k1], check.b[:, :k1], check.yy)

    def aug(w4, bias):
        w = w4.reshape(g, rows, -1)
        return np.concatenate([w, bias.reshape(g, rows, 1)], axis=2) if has_bias else w

    bias0 = site.bias_float if has_bias else np.zeros(shape[0])
    nearest = aug(w_nearest, bias0)
    scale = np.broadcast_to(site.weight_scale, (shape[0],)).reshape(g, rows) if np.ndim(site.weight_scale) else \
        np.full((g, rows), float(site.weight_scale))
    h = damped(hf.h)
    candidates = [nearest]
    if has_bias:  # weights as rounded, bias refit: b = (x̃ᵀy - x̃ᵀX W)/n per row, the last row of the normal equations
        refit = nearest.copy()
        refit[:, :, -1] = (hf.b[:, -1, :] - np.einsum("gk,grk->gr", hf.h[:, -1, :-1], nearest[:, :, :-1])) / hf.h[:, -1, -1][:, None]
        candidates.append(refit)
    lsq = np.linalg.solve(h, hf.b).transpose(0, 2, 1)  # [g, r, K+1]: the float weights best for x̃
    for start in (aug(site.weight_float, bias0), lsq):
        if has_bias:
            candidates.append(gptq(start, h, scale, site.qmax))
        else:
            w = np.concatenate([start, np.zeros(start.shape[:2] + (1,))], axis=2)
            hh = np.pad(h, ((0, 0), (0, 1), (0, 1)))
            hh[:, -1, -1] = 1.0
            candidates.append(gptq(w, hh, scale, site.qmax)[:, :, :-1])
    e_fit = [error(c, hf) for c in candidates]
    e_check = [error(c, hc) for c in candidates]
    ok = [i for i in range(len(candidates)) if e_fit[i] <= e_fit[0] and e_check[i] <= e_check[0]]
    best = min(ok, key=lambda i: e_fit[i] + e_check[i])
    w = candidates[best]
    weights = w[:, :, :-1] if has_bias else w
    errors = {"nearest": e_fit[0] + e_check[0], "learned": e_fit[best] + e_check[best], "choice": best}
    return weights.reshape(shape), (w[:, :, -1].reshape(-1) if has_bias else None), errors


def apply_rounding(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, result: RoundingResult,
                   sites: list[ConvSite] | None = None) -> list[str]:
    """Write learned int8 weights and biases into qmodel (any plan built on the same weight scales); returns the
    convs changed. A conv kept float in this plan, or whose weight scale differs, is skipped. `sites`: qmodel's,
    when the caller has them already (find_sites otherwise)."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    done = []
    for s in find_sites(qmodel, float_model) if sites is None else sites:
        q = result.weights.get(s.name)
        if q is None or q.shape != s.weight_float.shape:
            continue
        inits[s.weight_init].CopyFrom(numpy_helper.from_array(q, s.weight_init))
        bias = result.biases.get(s.name)
        if bias is not None and s.bias_init is not None:
            init = inits[s.bias_init]
            if s.bias_scale is not None:
                info = np.iinfo(np.int32)
                bq = np.clip(np.round(bias / s.bias_scale), info.min, info.max).astype(np.int32)
                init.CopyFrom(numpy_helper.from_array(bq, s.bias_init))
            else:
                init.CopyFrom(numpy_helper.from_array(bias.astype(numpy_helper.to_array(init).dtype), s.bias_init))
        done.append(s.name)
    return done
