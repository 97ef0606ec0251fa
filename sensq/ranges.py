"""Activation range methods, all computed from cached TensorStats (no inference).

minmax      observed min and max
percentile  p-th percentile of the values (two-sided for asymmetric grids, of |x| for symmetric ones)
kl          TensorRT entropy calibration: the |x| threshold whose 128-level (256 for a non-negative tensor on an
            asymmetric grid) quantized histogram is closest in KL
mse         the clipping range minimising the expected squared quantization error on the target's integer grid
default     per tensor: minmax for model inputs and outputs, the 99.99th percentile elsewhere (DEFAULT_RULE; the
            comparison with every single method on the shared models is in docs/benchmarks.md)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import statistics
from .errors import SensqError
from .statistics import TensorStats

METHODS = ("default", "minmax", "percentile", "kl", "mse")

DEFAULT_PERCENTILE = 99.99
DEFAULT_RULE = (
    "default = minmax for model inputs and outputs (inputs are bounded by preprocessing; outputs such as logits "
    "carry the decision in their extremes), the 99.99th percentile for every other activation on an 8-bit grid; "
    "minmax everywhere on a 16-bit grid, whose rounding step is 256x finer so that clipping costs more than it saves "
    "(YOLOX-Nano A16W8: 0.2896 mAP50-95 with minmax, 0.2862 with the 8-bit rule; FP32 0.2908)"
)


def _code_version() -> str:
    """Hash of the code that turns statistics into ranges (this module and the histogram views it reads): ranges
    cached on disk by other code are never reused. Any edit, even a comment, recomputes them (seconds)."""
    h = hashlib.sha256()
    for module in (__file__, statistics.__file__):
        try:
            h.update(Path(module).read_bytes())
        except OSError:  # no source next to the bytecode: fall back to the versions that are always present
            h.update(f"{module}|v={statistics.CACHE_VERSION}".encode())
    return h.hexdigest()[:16]


ALGORITHM_VERSION = _code_version()


@dataclass(frozen=True)
class Grid:
    """Integer grid a range is mapped onto, as onnxruntime's QDQ quantizer maps it (get_qmin_qmax_for_qType and
    compute_scale_zp): asymmetric uint8 [0, 255] and int8 [-128, 127]; symmetric int8 [-127, 127] with scale a/127
    and zero point 0; symmetric uint8 [0, 255] with zero point 128 (onnxruntime 1.20: [0, 254], 127); the 16-bit types alike."""

    qmin: int = 0
    qmax: int = 255
    symmetric: bool = False

    @classmethod
    def for_activation(cls, dtype: str, symmetric: bool) -> "Grid":
        # onnxruntime's own bounds, not a copy: they moved between releases (symmetric uint8 is [0, 254] in 1.20)
        from onnx import TensorProto
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

        qmin, qmax = get_qmin_qmax_for_qType(getattr(TensorProto, dtype.upper()), symmetric=symmetric)
        return cls(int(qmin), int(qmax), symmetric)

    @property
    def wide(self) -> bool:
        """A 16-bit grid."""
        return self.qmax - self.qmin > 255

    @property
    def zero_point_dtype(self) -> type:
        """numpy type of this grid's zero points (what the Q/DQ pair's integer tensor is)."""
        if self.qmin < 0:
            return np.int16 if self.wide else np.int8
        return np.uint16 if self.wide else np.uint8

    def scale_zero_point(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of ranges [lo, hi] (arrays, vectorised), widened to contain 0 as onnxruntime does."""
        lo = np.minimum(np.asarray(lo, np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, np.float64), 0.0)
        if self.symmetric:
            a = np.maximum(-lo, hi)
            lo, hi = -a, a
        scale = np.maximum((hi - lo) / (self.qmax - self.qmin), 1e-12)
        if self.symmetric:
            zp = np.full_like(scale, np.round((self.qmin + self.qmax) / 2.0))
        else:
            zp = np.round(self.qmin - lo / scale)
        return scale, zp


def check_method(method: str) -> str:
    if method not in METHODS:
        raise SensqError(f"calibration_type {method} not implemented yet", f"use one of: {', '.join(METHODS)}")
    return method


def compute_range(st: TensorStats, method: str, grid: Grid, percentile: float = 99.99, is_io: bool = False) -> tuple[float, float]:
    """Range of one tensor; `is_io` marks a model input or output (used by the default rule)."""
    check_method(method)
    if st.count == 0:
        return 0.0, 0.0
    if method == "minmax" or st.min == st.max:
        lo, hi = st.min, st.max
    elif method == "percentile":
        lo, hi = percentile_range(st, percentile, grid.symmetric)
    elif method == "kl":
        # Levels per side of the |x| histogram: 256 only for a non-negative tensor on an asymmetric grid (all of it
        # on one side); a signed tensor is quantized over [-t, t] in 255 steps, so 128 per side, symmetric grid or
        # not (pytorch-quantization's entropy calibrator: unsigned only when min >= 0).
        t = kl_threshold(st, target_bins=256 if not grid.symmetric and st.min >= 0 else 128)
        lo, hi = -t, t
    elif method == "mse":
        lo, hi = mse_range(st, grid)
    else:
        lo, hi = (st.min, st.max) if is_io or grid.wide else percentile_range(st, DEFAULT_PERCENTILE, grid.symmetric)
    # A method never widens the observed range.
    return float(max(lo, st.min)), float(min(hi, st.max))


# percentile --------------------------------------------------------------------------------------------------------
def _quantile_edges(left, right, counts, q_low, q_high):
    cum = np.cumsum(counts)
    total = cum[-1]
    # round: 99.9/100*1000 is 999.0000000000001 in floating point, which would skip a whole value
    i_lo = int(np.searchsorted(cum, np.round(q_low * total, 6), side="right"))
    i_hi = int(np.searchsorted(cum, np.round(q_high * total, 6), side="left"))
    i_lo, i_hi = min(i_lo, len(counts) - 1), min(i_hi, len(counts) - 1)
    return left[i_lo], right[i_hi]


def percentile_range(st: TensorStats, p: float, symmetric: bool) -> tuple[float, float]:
    if not 0 < p <= 100:
        raise SensqError(f"percentile {p} out of range", "give a percentile in (0, 100], e.g. 99.99 (xquant's max_percentile 0.9999 also works)")
    q = p / 100.0
    if symmetric:
        counts = st.absolute()
        edges = np.arange(len(counts) + 1) * st.bin_width
        _, t = _quantile_edges(edges[:-1], edges[1:], counts, 0.0, q)
        return -t, t
    left, right, counts = st.signed()
    lo, hi = _quantile_edges(left, right, counts, 1.0 - q, q)
    return lo, hi


def normalize_percentile(value: float) -> float:
    """xquant writes max_percentile as a fraction (0.9999); sensq as a percent (99.99). Accept both."""
    return value * 100.0 if 0 < value <= 1.0 else value


# kl (TensorRT entropy) ---------------------------------------------------------------------------------------------
def kl_threshold(st: TensorStats, target_bins: int = 128, max_bins: int = 2048, max_candidates: int = 160) -> float:
    counts = st.absolute()
    # Exact zeros (ReLU/ReLU6 outputs: often half the values) are representable on every grid and cost nothing;
    # left in, their spike makes the tiniest thresholds look best (EfficientNet-Lite0: ReLU6 clipped at ~1.0).
    # Only they leave: the tiny non-zero values sharing bin 0 (width absmax/4096 or more) stay, as in TensorRT.
    counts[0] = max(counts[0] - st.zeros, 0.0)
    width = st.bin_width
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return 0.0
    counts = counts[: nz[-1] + 1]
    factor = int(np.ceil(len(counts) / max_bins))  # rebin to at most 2048 bins, as TensorRT's histogram
    if factor > 1:
        pad = (-len(counts)) % factor
        counts = np.pad(counts, (0, pad)).reshape(-1, factor).sum(axis=1)
        width *= factor
    n = len(counts)
    if n <= target_bins:
        return n * width
    best_kl, best_i = np.inf, n
    step = max(1, (n - target_bins) // max_candidates)
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    for i in range(target_bins, n + 1, step):
        p = counts[:i].copy()
        p[-1] += tail[i]
        bounds = (np.arange(target_bins + 1) * i) // target_bins
        sliced = counts[:i]
        merged = np.add.reduceat(sliced, bounds[:-1])
        nonzero = (p != 0)
        nz_per = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        per_bin = np.divide(merged, nz_per, out=np.zeros_like(merged), where=nz_per > 0)
        q = np.repeat(per_bin, np.diff(bounds)) * nonzero
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        pn, qn = p / p_sum, q / q_sum
        mask = pn > 0
        qm = np.maximum(qn[mask], 1e-12)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qm)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


# mse ---------------------------------------------------------------------------------------------------------------
def quant_error(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, grid: Grid) -> np.ndarray:
    """Expected squared error of quantizing the histogram with each candidate range (vectorised over candidates)."""
    scale, zp = grid.scale_zero_point(lo, hi)
    scale, zp = scale[:, None], zp[:, None]
    q = (np.clip(np.round(centers[None, :] / scale) + zp, grid.qmin, grid.qmax) - zp) * scale
    return ((q - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1)


def mse_range(st: TensorStats, grid: Grid, n_candidates: int = 96) -> tuple[float, float]:
    left, right, counts = st.signed()
    keep = counts > 0
    centers, counts = np.clip((left[keep] + right[keep]) / 2, st.min, st.max), counts[keep]
    fractions = np.geomspace(0.01, 1.0, n_candidates)
    lo, hi = st.min, st.max
    if grid.symmetric:
        a = max(-lo, hi) * fractions
        best = a[int(np.argmin(quant_error(centers, counts, -a, a, grid)))]
        return -best, best
    for _ in range(2):  # coordinate descent: upper end, then lower end
        if hi > 0:
            cand = hi * fractions if _ == 0 else np.unique(np.concatenate([st.max * fractions, [hi]]))
            hi = cand[int(np.argmin(quant_error(centers, counts, np.full(cand.shape, lo), cand, grid)))]
        if lo < 0:
            cand = np.unique(np.concatenate([st.min * fractions, [lo]]))
            lo = cand[int(np.argmin(quant_error(centers, counts, cand, np.full(cand.shape, hi), grid)))]
    return lo, hi
