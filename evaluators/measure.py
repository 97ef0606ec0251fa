"""Error measures between a quantized tensor q and its float reference f, as reported by PPQ / SpacemiT xquant.

sensq's "SNR" follows PPQ and xquant: it is the *noise-to-signal power ratio* ||q - f||^2 / ||f||^2, so 0 is a
perfect match and larger is worse; a layer above SNR_FLAG (0.1, i.e. noise power at 10 % of signal power) is
flagged. SQNR in dB is the conventional "higher is better" form of the same number: -10 * log10(ratio).

All functions flatten their inputs and accumulate in float64, so float16 / int8-dequantized inputs of any shape
give the same answer as their float64 copies.
"""
from __future__ import annotations

import math

import numpy as np

SNR_FLAG = 0.1  # noise-to-signal ratio above which a tensor is flagged
COSINE_FLAG = 0.99  # cosine similarity below which a tensor is flagged
HIST_BINS = 32


def _pair(q, f) -> tuple[np.ndarray, np.ndarray]:
    qa = np.asarray(q, dtype=np.float64).ravel()
    fa = np.asarray(f, dtype=np.float64).ravel()
    if qa.size != fa.size:
        raise ValueError(f"q and f differ in size: {qa.size} vs {fa.size} elements")
    return qa, fa


def snr(q, f) -> float:
    """Noise-to-signal power ratio ||q - f||^2 / ||f||^2 (lower is better).

    A zero reference has no signal: the ratio is 0.0 if q is also exactly zero, inf otherwise.
    """
    qa, fa = _pair(q, f)
    noise = float(np.dot(qa - fa, qa - fa))
    signal = float(np.dot(fa, fa))
    if signal == 0.0:
        return 0.0 if noise == 0.0 else math.inf
    return noise / signal


def sqnr_db(ratio: float) -> float:
    """Signal-to-quantization-noise ratio in dB, -10 * log10(noise/signal ratio); inf for a ratio of 0."""
    ratio = float(ratio)
    if ratio < 0 or math.isnan(ratio):
        raise ValueError(f"a noise-to-signal ratio cannot be {ratio}")
    if ratio == 0.0:
        return math.inf
    if math.isinf(ratio):
        return -math.inf
    return -10.0 * math.log10(ratio)


def mse(q, f) -> float:
    """Mean squared error; 0.0 for empty inputs."""
    qa, fa = _pair(q, f)
    if qa.size == 0:
        return 0.0
    d = qa - fa
    return float(np.dot(d, d)) / qa.size


def cosine(q, f) -> float:
    """Cosine similarity of the flattened tensors: 1.0 when both are all-zero, 0.0 when only one is."""
    qa, fa = _pair(q, f)
    nq = math.sqrt(float(np.dot(qa, qa)))
    nf = math.sqrt(float(np.dot(fa, fa)))
    if nq == 0.0 and nf == 0.0:
        return 1.0
    if nq == 0.0 or nf == 0.0:
        return 0.0
    c = float(np.dot(qa, fa)) / (nq * nf)
    return min(1.0, max(-1.0, c))  # rounding can push identical tensors to 1.0000000000000002


def minmax(x) -> tuple[float, float]:
    """(min, max) of all elements."""
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("minmax of an empty tensor")
    return float(a.min()), float(a.max())


def histogram32(x) -> list[int]:
    """Counts in 32 equal-width bins spanning [x.min(), x.max()] (the last bin includes the max).

    Non-finite values are left out so one inf in an activation does not make the whole histogram meaningless.
    If all finite values are equal they all land in the first bin.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    counts = [0] * HIST_BINS
    if a.size == 0:
        return counts
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        counts[0] = int(a.size)
        return counts
    hist, _ = np.histogram(a, bins=HIST_BINS, range=(lo, hi))
    return [int(c) for c in hist]


def compare(q, f) -> dict:
    """All measures for one tensor pair, keyed like the columns of the layer report."""
    ratio = snr(q, f)
    return {
        "SNR": ratio,
        "SQNR_dB": sqnr_db(ratio),
        "MSE": mse(q, f),
        "Cosine": cosine(q, f),
        "Q.MinMax": minmax(q),
        "F.MinMax": minmax(f),
        "F.Hist": histogram32(f),
    }
