"""Learned weight rounding: per conv, the INT8 weights that best reproduce the conv's float weights on the inputs the
quantized model actually feeds it, on calibration data (no labels).

Objective per conv (and per group of a grouped conv): min ||(W - Ŵ) x̃||² over Ŵ on the weight grid, where x̃ is the
quantized model's conv input (im2col rows, a random subset of output positions per image) and the bias stays as it
is: AdaRound's and GPTQ's layer-wise objective. The rounding is GPTQ's (Frantar et al. 2022, after Optimal Brain
Quantization): columns are rounded one at a time and each one's error is fed back into the columns not rounded yet,
through the inverse of H = x̃ᵀx̃. Everything reads H alone; no activation is stored, numpy only.

Why not the asymmetric target (FP32 outputs y, min ||y - Ŵ x̃||², the weights and bias absorbing upstream error, as
AdaQuant and AIMET's Sequential MSE fit): measured on the shared data it lowered every conv's error yet cost yolov5n
0.0051 mAP50-95 against nearest rounding (0.2984; with the bias held, 0.3008), while this objective gives 0.3018
(docs/benchmarks.md). Each conv's bias refit moves the objectness logits of yolov5n's float head off FP32's.

Honesty check per conv: calibration images alternate between a fitting half A and a checking half B. A conv keeps
its learned weights only if its error is lower than nearest rounding's on A and on B; otherwise it keeps nearest
rounding (reported). Weight scales are the built model's (min/max or --weight-range mse); only the int8 values
change. Gemm/MatMul layers keep nearest rounding.
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
    q_input: str  # in the quantized model: what the conv reads (a DequantizeLinear output)
    weight_init: str  # int8 initializer
    weight_scale: np.ndarray  # [O] or scalar
    qmax: int
    weight_float: np.ndarray  # [O, C/g, kh, kw]

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        pt, pl, pb, pr = self.pads
        kh, kw = self.kernel
        return ((h + pt + pb - self.dilations[0] * (kh - 1) - 1) // self.strides[0] + 1,
                (w + pl + pr - self.dilations[1] * (kw - 1) - 1) // self.strides[1] + 1)


@dataclass
class Moments:
    """Sufficient statistics of one conv on one half of the calibration images, per group g."""

    h: np.ndarray  # [g, K, K]: x̃ᵀx̃


@dataclass
class RoundingResult:
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # conv -> int8 weights
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
    _, convs = quantized_convs(qmodel, float_model)
    sites = []
    for c in convs:
        node, w = c.node, c.weight
        if w.ndim != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", 0, "NOTSET"):
            continue  # 1-D/3-D convs and SAME_* padding (rare in exports): left to nearest rounding
        qmax = 63 if int(np.abs(numpy_helper.to_array(c.q_init)).max()) <= 64 else 127
        site = ConvSite(node.name, int(_attr(node, "group", 1)), tuple(w.shape[2:]), tuple(_attr(node, "strides", (1, 1))),
                        tuple(_attr(node, "pads", (0, 0, 0, 0))), tuple(_attr(node, "dilations", (1, 1))),
                        node.input[0], c.q_init.name, numpy_helper.to_array(c.s_init).astype(np.float64), qmax, w)
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


def accumulate(m: Moments | None, site: ConvSite, x_q: np.ndarray, rng: np.random.Generator) -> Moments:
    """Add one image: x_q [C, H, W], the quantized model's conv input."""
    out_h, out_w = site.output_size(*x_q.shape[1:])
    total = out_h * out_w
    pos = np.sort(rng.choice(total, POSITIONS_PER_IMAGE, replace=False)) if total > POSITIONS_PER_IMAGE else np.arange(total)
    x = patches(x_q.astype(np.float32), site, pos, out_w)
    h = np.matmul(x.transpose(0, 2, 1), x)
    if m is None:
        m = Moments(np.zeros(h.shape))
    m.h += h
    return m


def rounding_error(dw: np.ndarray, h: np.ndarray) -> float:
    """||(W - Ŵ) x̃||² from the moments, dW = W - Ŵ as [g, O/g, K]."""
    return float(np.einsum("grk,gkl,grl->", dw, h, dw))


# solve -----------------------------------------------------------------------------------------------------------
def gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round the columns of w [g, r, K] onto the grid (scale per row [g, r]) one at a time, feeding each column's
    error into the later ones through the upper Cholesky factor of H⁻¹. Columns go in GPTQ's "act order" (largest
    diag(H) first, per group): the inputs carrying the most energy are rounded while the most columns are left to
    absorb their error (yolov5n: +0.0012 mAP50-95 on val, +0.0066 on held-out train images over input order)."""
    order = np.argsort(-np.einsum("gkk->gk", h), axis=1, kind="stable")
    g_idx = np.arange(w.shape[0])[:, None]
    out = _gptq_in_order(np.take_along_axis(w, order[:, None, :], axis=2),
                         h[g_idx[:, :, None], order[:, :, None], order[:, None, :]], scale, qmax)
    return np.take_along_axis(out, np.argsort(order, axis=1)[:, None, :], axis=2)


def _gptq_in_order(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    w = w.copy()
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # H⁻¹ = UᵀU, U upper
    for i in range(w.shape[2]):
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


def solve(site: ConvSite, w_nearest: np.ndarray, fit: Moments, check: Moments) -> tuple[np.ndarray, dict]:
    """GPTQ's weights where they beat nearest rounding on both calibration halves, else nearest's.
    Returns (weights [O, C/g, kh, kw] on the grid, errors)."""
    g = site.group
    rows = site.weight_float.shape[0] // g
    shape = site.weight_float.shape
    w_float = site.weight_float.astype(np.float64).reshape(g, rows, -1)
    nearest = w_nearest.reshape(g, rows, -1)
    scale = np.broadcast_to(site.weight_scale, (shape[0],)).reshape(g, rows) if np.ndim(site.weight_scale) else \
        np.full((g, rows), float(site.weight_scale))
    learned = gptq(w_float, damped(fit.h), scale, site.qmax)
    e_fit = [rounding_error(c - w_float, fit.h) for c in (nearest, learned)]
    e_check = [rounding_error(c - w_float, check.h) for c in (nearest, learned)]
    best = int(e_fit[1] < e_fit[0] and e_check[1] < e_check[0])
    errors = {"nearest": e_fit[0] + e_check[0], "learned": e_fit[best] + e_check[best], "choice": best}
    return (learned if best else nearest).reshape(shape), errors


def apply_rounding(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, result: RoundingResult,
                   sites: list[ConvSite] | None = None) -> list[str]:
    """Write learned int8 weights into qmodel (any plan built on the same weight scales); returns the convs changed.
    A conv kept float in this plan, or whose weight scale differs, is skipped. `sites`: qmodel's, when the caller has
    them already (find_sites otherwise)."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    done = []
    for s in find_sites(qmodel, float_model) if sites is None else sites:
        q = result.weights.get(s.name)
        if q is None or q.shape != s.weight_float.shape:
            continue
        inits[s.weight_init].CopyFrom(numpy_helper.from_array(q, s.weight_init))
        done.append(s.name)
    return done
