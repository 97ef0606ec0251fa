"""Range methods and histogram bookkeeping against values computed by hand on small synthetic tensors."""
from __future__ import annotations

import numpy as np
import pytest

from sensq.errors import SensqError
from sensq.ranges import (DEFAULT_PERCENTILE, METHODS, Grid, check_method, compute_range, kl_threshold, mse_range,
                          normalize_percentile, percentile_range, quant_error)
from sensq.statistics import BINS_PER_SIGN, SAMPLE_CAP, TensorStats

H = BINS_PER_SIGN
UINT8 = Grid(0, 255, False)
INT8_SYM = Grid.for_activation("int8", True)


def stats(*arrays) -> TensorStats:
    st = TensorStats()
    for a in arrays:
        st.update(np.asarray(a, np.float32))
    return st


def bin_of(x: float, scale: float) -> int:
    """Index in TensorStats.hist of value x for a histogram over |x| in [0, scale): positives first, then negatives."""
    k = min(int(abs(x) * H / scale), H - 1)
    return k + (H if x < 0 else 0)


# histogram bookkeeping ---------------------------------------------------------------------------------------------
def test_update_scale_and_bins_by_hand():
    st = stats([0.5, -0.25, 3.0])
    # |x| max is 3.0 -> the smallest power of two above it is 4.0; bin width 4/4096 = 1/1024
    assert st.scale == 4.0
    assert st.bin_width == 4.0 / H
    assert (st.min, st.max, st.count) == (-0.25, 3.0, 3)
    # 0.5 * 1024 = 512 (positive half), 0.25 * 1024 = 256 (negative half, offset H), 3.0 * 1024 = 3072
    expected = np.zeros(2 * H, np.int64)
    expected[[512, H + 256, 3072]] = 1
    assert np.array_equal(st.hist, expected)
    assert [bin_of(v, 4.0) for v in (0.5, -0.25, 3.0)] == [512, H + 256, 3072]


def test_signed_and_absolute_views():
    st = stats([0.5, -0.25, 3.0])
    left, right, counts = st.signed()
    assert len(left) == len(counts) == 2 * H
    assert np.all(np.diff(left) > 0) and np.allclose(right - left, st.bin_width)
    assert left[0] == -4.0 and right[-1] == 4.0
    # each value lies in [left, right) of a bin holding exactly one count (negatives: in (left, right])
    for v in (0.5, 3.0):
        i = int(np.searchsorted(left, v, side="right") - 1)
        assert left[i] <= v < right[i] and counts[i] == 1
    i = int(np.nonzero((left < -0.25) & (-0.25 <= right))[0][0])
    assert counts[i] == 1
    assert counts.sum() == 3
    ab = st.absolute()
    assert ab.sum() == 3 and ab[256] == 1 and ab[512] == 1 and ab[3072] == 1


def test_doubling_merges_pairs_exactly():
    st = stats([0.5, -0.25, 3.0])
    before = st.hist.copy()
    st.update(np.array([10.0], np.float32))  # 10 >= 4 -> double to 8 -> 10 >= 8 -> double to 16
    assert st.scale == 16.0
    assert st.hist.sum() == before.sum() + 1 == 4
    assert st.count == 4
    # each doubling halves the bin index: 512 -> 256 -> 128 etc.; also what binning at scale 16 gives directly
    expected = np.zeros(2 * H, np.int64)
    for v in (0.5, -0.25, 3.0, 10.0):
        expected[bin_of(v, 16.0)] += 1
    assert bin_of(0.5, 16.0) == 128 and bin_of(-0.25, 16.0) == H + 64 and bin_of(3.0, 16.0) == 768 and bin_of(10.0, 16.0) == 2560
    assert np.array_equal(st.hist, expected)


def test_doubling_equals_direct_binning_on_random_data():
    rng = np.random.default_rng(0)
    small = rng.standard_normal(5000).astype(np.float32)
    big = np.array([100.0, -37.0], np.float32)
    grown = stats(small, big)  # starts at scale 8, doubles to 128
    direct = stats(big, small)  # starts at scale 128
    assert grown.scale == direct.scale == 128.0
    assert np.array_equal(grown.hist, direct.hist)
    assert grown.hist.sum() == 5002


def test_non_finite_values_ignored_and_large_tensors_subsampled():
    st = stats([np.nan, 1.0, -np.inf, -2.0])
    assert (st.min, st.max, st.count) == (-2.0, 1.0, 2)
    assert st.hist.sum() == 2
    st = stats([np.nan, np.inf])
    assert st.count == 0 and st.hist.sum() == 0

    # 131073 = 3 * 43691 values: a stride of 3 (131073 / 65536 rounded up) shares the factor 3, so 4: 32769 values
    n = 2 * SAMPLE_CAP + 1
    x = np.zeros(n, np.float32)
    x[1] = 1000.0  # not on the stride-4 sample, but min/max must stay exact
    x[8] = -7.0  # on it
    st = stats(x)
    assert st.count == n
    assert st.hist.sum() == len(range(0, n, 4)) == 32769
    assert (st.min, st.max) == (-7.0, 1000.0)
    assert st.scale == 1024.0 and st.hist[bin_of(1000.0, 1024.0)] == 0 and st.hist[bin_of(-7.0, 1024.0)] == 1


# minmax / percentile ----------------------------------------------------------------------------------------------
def test_minmax_is_true_min_max():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(1000).astype(np.float32), (rng.standard_normal(500) * 3 + 1).astype(np.float32)
    st = stats(a, b)
    both = np.concatenate([a, b])
    for grid in (UINT8, INT8_SYM):
        assert compute_range(st, "minmax", grid) == (float(both.min()), float(both.max()))


def test_constant_and_empty_tensors():
    st = stats(np.full(10, 2.5, np.float32))
    for m in METHODS:
        assert compute_range(st, m, UINT8) == (2.5, 2.5)
    for m in METHODS:
        assert compute_range(TensorStats(), m, UINT8) == (0.0, 0.0)


def test_percentile_two_sided_for_asymmetric_grid():
    values = np.arange(1000, dtype=np.float32)  # 0 .. 999
    st = stats(values)
    assert st.scale == 1024.0 and st.bin_width == 0.25
    lo, hi = percentile_range(st, 99.0, symmetric=False)
    w = st.bin_width
    assert abs(hi - np.percentile(values, 99.0)) <= w + 1e-9
    assert abs(lo - np.percentile(values, 1.0)) <= w + 1e-9
    # compute_range never widens the observed range
    clo, chi = compute_range(st, "percentile", UINT8, 99.0)
    assert (clo, chi) == (max(lo, 0.0), min(hi, 999.0))

    shifted = values - 200  # -200 .. 799: the low tail is negative
    st = stats(shifted)
    lo, hi = percentile_range(st, 99.0, symmetric=False)
    assert abs(lo - np.percentile(shifted, 1.0)) <= st.bin_width + 1e-9
    assert abs(hi - np.percentile(shifted, 99.0)) <= st.bin_width + 1e-9


def test_percentile_of_abs_for_symmetric_grid():
    mags = np.arange(1000, dtype=np.float32)
    signs = np.where(np.arange(1000) % 2 == 0, 1.0, -1.0).astype(np.float32)
    values = mags * signs  # |x| = 0 .. 999, alternating sign
    st = stats(values)
    lo, hi = percentile_range(st, 99.0, symmetric=True)
    assert lo == -hi
    assert abs(hi - np.percentile(np.abs(values), 99.0)) <= st.bin_width + 1e-9
    # the two-sided percentiles of the signed values are a different (smaller) pair
    alo, ahi = percentile_range(st, 99.0, symmetric=False)
    assert abs(ahi - np.percentile(values, 99.0)) <= st.bin_width + 1e-9
    assert abs(alo - np.percentile(values, 1.0)) <= st.bin_width + 1e-9
    assert ahi < hi - 10


def _order_stat_bounds(x: np.ndarray, p: str) -> tuple[float, float]:
    """Exact sample quantiles by rank (p as a decimal string, so no float rounding): the lowest value with at most
    (100-p) % of the values below it, and the lowest value with at least p % of the values at or below it."""
    from fractions import Fraction
    import math

    s = np.sort(x)
    t = Fraction(p) / 100 * len(s)
    k_hi = math.ceil(t)  # 1-based rank of the upper quantile
    k_lo = math.floor(len(s) - t)  # number of values allowed strictly below the lower quantile
    return float(s[k_lo]), float(s[k_hi - 1])


def test_percentile_on_gaussian_within_one_bin():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(50003).astype(np.float32)  # p% of 50003 is never an integer: no rank ties
    st = stats(x)
    w = st.bin_width
    for p in ("99", "99.9", "99.99"):
        lo, hi = percentile_range(st, float(p), symmetric=False)
        v_lo, v_hi = _order_stat_bounds(x, p)
        assert v_hi <= hi <= v_hi + w + 1e-9, (p, hi, v_hi)
        assert v_lo - w - 1e-9 <= lo <= v_lo, (p, lo, v_lo)
    _, t = percentile_range(st, 99.9, symmetric=True)
    _, v = _order_stat_bounds(np.abs(x), "99.9")
    assert v <= t <= v + w + 1e-9


def test_percentile_rank_not_shifted_by_float_rounding():
    """99.9 % of 1000 values is exactly 999 values: the range must clip exactly one value at each end.

    p / 100 * total is 999.0000000000001 in floating point (0.999 is not representable), and a strict
    comparison against it skips to the next order statistic: the 99.9th percentile of 0..999 came out as the max.
    """
    values = np.arange(1000, dtype=np.float32)
    st = stats(values)
    lo, hi = percentile_range(st, 99.9, symmetric=False)
    v_lo, v_hi = _order_stat_bounds(values, "99.9")
    assert (v_lo, v_hi) == (1.0, 998.0)  # by hand: one value (0) below, one value (999) above
    assert hi == 998.0 + st.bin_width, f"99.9th percentile of 0..999 should end in 998's bin, got {hi}"
    assert lo == 1.0, f"0.1th percentile of 0..999 should start at 1's bin, got {lo}"
    assert clipped_fraction(st, lo, hi) == pytest.approx(0.002)


def clipped_fraction(st, lo, hi) -> float:
    """Share of histogram mass whose bin centre lies outside [lo, hi]."""
    left, right, counts = st.signed()
    centers = (left + right) / 2
    return float(counts[(centers < lo) | (centers > hi)].sum() / max(counts.sum(), 1.0))


def test_percentile_bounds_and_normalisation():
    st = stats(np.arange(10, dtype=np.float32))
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(SensqError):
            percentile_range(st, bad, symmetric=False)
    assert percentile_range(st, 100.0, False)[1] >= 9.0
    assert normalize_percentile(0.9999) == pytest.approx(99.99, abs=1e-9)
    assert normalize_percentile(99.99) == 99.99
    assert normalize_percentile(1.0) == 100.0


# kl -------------------------------------------------------------------------------------------------------------
def test_kl_clips_a_far_outlier():
    rng = np.random.default_rng(4)
    block = np.abs(rng.standard_normal(100000)).astype(np.float32)  # dense block in [0, ~4.5]
    st = stats(block, [50.0])
    t = kl_threshold(st)
    assert t < 0.25 * st.max, f"KL kept the outlier: threshold {t} vs max {st.max}"
    assert t >= np.percentile(block, 99.0)  # ...but keeps the block
    lo, hi = compute_range(st, "kl", UINT8)  # asymmetric grid: all 256 levels on one side
    assert lo == st.min  # -t is clamped to the observed min (|x| >= 0)
    assert np.percentile(block, 99.0) <= hi < 0.25 * st.max


def kl_by_brute_force(st: TensorStats, target_bins: int, zeros: int | None = None) -> tuple[dict[int, float], float]:
    """TensorRT's entropy calibration written out loop by loop: KL(P || Q) for every threshold of i bins.

    The |x| histogram without its exact zeros (ReLU zeros are exact on any grid; `zeros` of them, counted here from
    the data by the caller, default st.zeros), trimmed after its last non-empty bin
    and merged to at most 2048 bins; P = the first i bins with everything beyond folded into bin i-1; Q = the first
    i bins merged into target_bins chunks, each chunk's count spread evenly over its bins where P is non-zero.
    Returns ({i: KL}, bin width).
    """
    counts = st.absolute()
    counts[0] -= st.zeros if zeros is None else zeros
    counts = counts[: np.nonzero(counts)[0][-1] + 1]
    width = st.bin_width
    factor = -(-len(counts) // 2048)
    if factor > 1:
        counts = np.array([counts[j:j + factor].sum() for j in range(0, len(counts), factor)])
        width *= factor
    kl = {}
    for i in range(target_bins, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        q = np.zeros(i)
        for c in range(target_bins):
            a, b = c * i // target_bins, (c + 1) * i // target_bins
            nonzero = [j for j in range(a, b) if p[j] != 0]
            for j in nonzero:
                q[j] = counts[a:b].sum() / len(nonzero)
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl[i] = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
    return kl, width


@pytest.mark.parametrize("grid,target_bins", [(INT8_SYM, 128), (UINT8, 256)])
def test_kl_threshold_matches_brute_force(grid, target_bins):
    rng = np.random.default_rng(9)
    t = rng.standard_t(3, size=(4, 50000))  # heavy tails: the best threshold lies inside the range
    st = stats(*(t if grid.symmetric else np.abs(t)))  # 256 levels on one side only for a non-negative tensor
    kl, width = kl_by_brute_force(st, target_bins)
    best = min(kl, key=kl.get)
    assert target_bins < best < max(kl), "the data must put the optimum inside the candidate range"
    # every candidate searched: exactly the brute-force optimum
    assert kl_threshold(st, target_bins=target_bins, max_candidates=10**6) == pytest.approx(best * width)
    # the default search tries 160 evenly spaced thresholds from target_bins on: the brute-force best of those
    n = max(kl)
    candidates = range(target_bins, n + 1, max(1, (n - target_bins) // 160))
    lo, hi = compute_range(st, "kl", grid)
    assert round(hi / width) == min(candidates, key=kl.get)
    assert lo == (-hi if grid.symmetric else max(-hi, st.min))


def test_kl_removes_exact_zeros_only_not_the_tiny_values_sharing_their_bin():
    """A ReLU-like tensor: 40 % exact zeros and 30 % tiny positive values inside histogram bin 0. TensorRT's
    calibrator drops only the zeros; zeroing bin 0 whole (sensq before) also dropped the tiny values and chose
    another threshold."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_t(3, size=60000)).astype(np.float32)
    x[:24000] = 0.0
    x[24000:42000] = rng.uniform(0, 0.9, 18000).astype(np.float32) * np.float32(max(x.max(), 1.0) / 16384)
    st = stats(x)
    assert st.zeros == 24000 and st.absolute()[0] >= 24000 + 17000
    kl, width = kl_by_brute_force(st, 128, zeros=int(np.count_nonzero(x == 0)))
    assert kl_threshold(st, max_candidates=10**6) == pytest.approx(min(kl, key=kl.get) * width)
    old, _ = kl_by_brute_force(st, 128, zeros=int(st.absolute()[0]))  # bin 0 zeroed whole
    assert min(old, key=old.get) != min(kl, key=kl.get)


def test_kl_keeps_a_uniform_range():
    rng = np.random.default_rng(5)
    x = rng.uniform(0.0, 1.0, 60000).astype(np.float32)
    st = stats(x)
    t = kl_threshold(st)
    assert t >= 0.9 * st.max
    x = rng.uniform(-1.0, 1.0, 60000).astype(np.float32)
    st = stats(x)
    lo, hi = compute_range(st, "kl", INT8_SYM)
    assert hi >= 0.9 * st.max and lo <= 0.9 * st.min
    assert kl_threshold(TensorStats()) == 0.0


# mse ------------------------------------------------------------------------------------------------------------
def test_quant_error_three_bins_by_hand():
    centers = np.array([-0.5, 0.3, 4.0])
    counts = np.array([2.0, 1.0, 3.0])
    # uint8 grid, range (-1, 3): scale = 4/255, zero point = round(1 / (4/255)) = round(63.75) = 64
    scale, zp = 4.0 / 255.0, 64
    # -0.5/scale = -31.875 -> -32; 0.3/scale = 19.125 -> 19; 4/scale = 255 -> 255+64 clipped to 255 -> 191
    q = [(-32) * scale, 19 * scale, (255 - zp) * scale]
    expected = 2 * (-0.5 - q[0]) ** 2 + 1 * (0.3 - q[1]) ** 2 + 3 * (4.0 - q[2]) ** 2
    got = quant_error(centers, counts, np.array([-1.0]), np.array([3.0]), UINT8)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-9)

    # onnxruntime's own scale/zero point for the same range agree with the hand values
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    ort_zp, ort_scale = compute_scale_zp(np.float32(-1.0), np.float32(3.0), np.uint8(0), np.uint8(255), symmetric=False)
    assert int(ort_zp) == zp and float(ort_scale) == pytest.approx(scale, rel=1e-6)

    # symmetric int8 as onnxruntime builds it: a = max(1, 3) = 3 on [-127, 127], scale = 3/127, zero point 0
    s = 3.0 / 127.0
    # -0.5/s = -21.17 -> -21; 0.3/s = 12.70 -> 13; 4/s = 169.3 -> clipped to 127
    q = [-21 * s, 13 * s, 127 * s]
    expected = 2 * (-0.5 - q[0]) ** 2 + (0.3 - q[1]) ** 2 + 3 * (4.0 - q[2]) ** 2
    got = quant_error(centers, counts, np.array([-1.0]), np.array([3.0]), INT8_SYM)
    assert got[0] == pytest.approx(expected, rel=1e-9)

    # vectorised over candidates: each row equals its own single-candidate call
    los, his = np.array([-1.0, -0.6, -2.0]), np.array([3.0, 5.0, 0.5])
    many = quant_error(centers, counts, los, his, UINT8)
    for i in range(3):
        assert many[i] == pytest.approx(quant_error(centers, counts, los[i:i + 1], his[i:i + 1], UINT8)[0])
    # a range covering everything on a fine grid has a much smaller error than one clipping 4.0 at 0.5
    assert many[1] < many[2]


def test_mse_keeps_uniform_range():
    rng = np.random.default_rng(6)
    x = rng.uniform(-1.0, 3.0, 60000).astype(np.float32)
    st = stats(x)
    lo, hi = compute_range(st, "mse", UINT8)
    assert hi >= 0.97 * st.max and lo <= 0.97 * st.min
    y = rng.uniform(0.0, 1.0, 60000).astype(np.float32)
    st = stats(y)
    lo, hi = compute_range(st, "mse", UINT8)
    assert lo == st.min and hi >= 0.97 * st.max


def test_mse_clips_extreme_outliers():
    rng = np.random.default_rng(7)
    st = TensorStats()
    for _ in range(16):  # ~1M Gaussian values (each update below SAMPLE_CAP, so no subsampling)
        st.update(rng.standard_normal(SAMPLE_CAP).astype(np.float32))
    st.update(np.array([30.0, -30.0], np.float32))
    for grid in (UINT8, INT8_SYM):
        lo, hi = compute_range(st, "mse", grid)
        assert hi < 15.0 and lo > -15.0, f"mse kept the outliers on {grid}: {(lo, hi)}"
        assert hi > 3.0 and lo < -3.0, f"mse clipped the Gaussian body on {grid}: {(lo, hi)}"
        assert clipped_fraction(st, lo, hi) < 1e-4
    # and the chosen range really has a lower expected error than minmax
    left, right, counts = st.signed()
    keep = counts > 0
    centers, counts = (left[keep] + right[keep]) / 2, counts[keep]
    lo, hi = mse_range(st, UINT8)
    err = quant_error(centers, counts, np.array([lo, st.min]), np.array([hi, st.max]), UINT8)
    assert err[0] < err[1]


@pytest.mark.parametrize("dtype,symmetric", [("int8", True), ("uint8", False)])
def test_mse_range_is_near_the_best_range_on_onnxruntimes_grid(dtype, symmetric):
    """Brute force: quantize the raw values with onnxruntime's own scale, zero point and rounding for 400 candidate
    ranges; the mse range is within 2 % of the best of them."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, quantize_nparray

    qtype = getattr(TensorProto, ORT_TYPES[dtype])
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=symmetric)
    x = np.random.default_rng(11).standard_t(4, 60000).astype(np.float32)

    def ort_error(lo, hi):
        zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric=symmetric)
        q = quantize_nparray(qtype, x, scale, zp).astype(np.float64)
        return float(np.mean(((q - float(zp)) * float(scale) - x) ** 2))

    st = stats(x)
    lo, hi = compute_range(st, "mse", Grid.for_activation(dtype, symmetric))
    fractions = np.linspace(0.02, 1.0, 400)
    best = min(ort_error(x.min() * f, x.max() * f) for f in fractions)
    if symmetric:
        a = np.abs(x).max()
        best = min(ort_error(-a * f, a * f) for f in fractions)
    assert ort_error(lo, hi) <= 1.02 * best


def test_default_rule_minmax_on_model_io_percentile_elsewhere():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(-1.0, 3.0, 60000), [40.0]]).astype(np.float32)  # one far outlier
    st = stats(x)
    inner = compute_range(st, "default", UINT8)
    assert inner == compute_range(st, "percentile", UINT8, DEFAULT_PERCENTILE)
    assert inner[1] < 4.0  # the outlier is clipped inside the model...
    assert compute_range(st, "default", UINT8, is_io=True) == (st.min, st.max)  # ...but kept at a model output


# method names ---------------------------------------------------------------------------------------------------
def test_unknown_method_not_implemented():
    st = stats([1.0, 2.0])
    with pytest.raises(SensqError, match="not implemented"):
        compute_range(st, "entropy2", UINT8)
    with pytest.raises(SensqError, match="calibration_type xxx not implemented"):
        check_method("xxx")
    for m in METHODS:
        assert check_method(m) == m


ORT_TYPES = {"uint8": "UINT8", "int8": "INT8"}


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", True), ("int8", False), ("uint8", True)])
def test_grid_matches_onnxruntime_scale_and_zero_point(dtype, symmetric):
    """The grid the range methods optimise is the one onnxruntime's QDQ quantizer builds: its qmin/qmax for the
    type (get_qmin_qmax_for_qType, as QDQQuantizer.calc_quant_params calls it) and its compute_scale_zp."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    grid = Grid.for_activation(dtype, symmetric)
    qmin, qmax = get_qmin_qmax_for_qType(getattr(TensorProto, ORT_TYPES[dtype]), symmetric=symmetric)
    assert (grid.qmin, grid.qmax) == (int(qmin), int(qmax))
    for lo, hi in [(-1.0, 3.0), (0.0, 6.0), (-2.5, 0.25), (0.5, 7.0), (-0.003, 0.001)]:
        ort_zp, ort_scale = compute_scale_zp(np.float32(lo), np.float32(hi), qmin, qmax, symmetric=symmetric)
        scale, zp = grid.scale_zero_point(np.array([lo]), np.array([hi]))
        assert scale[0] == pytest.approx(float(ort_scale), rel=1e-6), (lo, hi)
        assert zp[0] == int(ort_zp), (lo, hi)


def test_symmetric_int8_grid_is_the_built_one(tmp_path):
    """The scale in a QDQ model built for symmetric int8 activations equals the grid's scale for the tensor's range."""
    import onnx
    from onnx import numpy_helper

    from sensq.build import QDQBuilder, prepare_model
    from sensq.plan import PrecisionPlan
    from sensq.statistics import CalibrationStats, float_activation_names
    from tiny_models import conv_relu_conv

    model = prepare_model(onnx.load(str(conv_relu_conv(tmp_path / "m.onnx"))))
    rng = np.random.default_rng(10)
    cs = CalibrationStats({n: stats(rng.normal(0.3, 1.0, 5000)) for n in float_activation_names(model)})
    builder = QDQBuilder(model, cs)
    plan = PrecisionPlan(method="minmax", target="tensorrt")
    q = builder.build(plan)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    lo, hi = builder.ranges(plan)["r1"]
    quantize = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    scale, zp = Grid.for_activation("int8", True).scale_zero_point(np.array([lo]), np.array([hi]))
    assert float(inits[quantize.input[1]]) == pytest.approx(scale[0], rel=1e-6)
    assert int(inits[quantize.input[2]]) == zp[0] == 0
    assert scale[0] == pytest.approx(max(-lo, hi) / 127, rel=1e-6)  # by hand: a / 127


def entropy_amax_reference(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int = 1,
                           start_bin: int = 128) -> float:
    """NVIDIA pytorch-quantization's `_compute_amax_entropy` (calib/histogram.py), ported with the same steps: the
    first bin set to the second, candidates i = start_bin.. with 2^(bits-1+unsigned) quantized bins spread by
    np.digitize over linspace(0, i), empty bins kept empty, clipped mass folded into the last kept bin, the last
    argmin of scipy's entropy. Signed tensors get 128 levels per side, non-negative ones 256."""
    from scipy.stats import entropy

    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1 + int(unsigned))
    divergences, arguments = [], []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        dig = np.digitize(np.arange(i), space) - 1
        dig[bins[:i] == 0] = -1
        keep = dig != -1
        sums = np.bincount(dig[keep], weights=bins[:i][keep], minlength=nbins)
        members = np.bincount(dig[keep], minlength=nbins)
        per = np.divide(sums, members, out=np.zeros(nbins), where=members > 0)
        new = np.where(keep, per[np.maximum(dig, 0)], 0.0)
        ref = bins[:i].copy()
        ref[-1] += bins[i:].sum()
        divergences.append(entropy(ref / ref.sum(), new / new.sum()))
        arguments.append(i)
    d = np.asarray(divergences)
    last = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[last * stride + start_bin])


def test_kl_on_a_signed_tensor_spends_128_levels_per_side_as_the_entropy_calibrator():
    """Issue 18.6: a signed activation (a Conv output before SiLU) on an asymmetric uint8 grid is quantized over
    [-t, t] in 255 steps, so its KL search must assume 128 levels per side (as pytorch-quantization does for any
    signed tensor), not 256 over |x|."""
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.standard_normal(200000), 6 * rng.standard_normal(200)]).astype(np.float32)
    st = stats(x)
    counts = st.absolute()[: np.nonzero(st.absolute())[0][-1] + 1]
    factor = int(np.ceil(len(counts) / 2048))
    counts = np.pad(counts, (0, (-len(counts)) % factor)).reshape(-1, factor).sum(axis=1)
    width = st.bin_width * factor
    ref = entropy_amax_reference(counts, np.arange(len(counts) + 1) * width, 8, unsigned=False,
                                 stride=max(1, (len(counts) - 128) // 160))
    lo, hi = compute_range(st, "kl", UINT8)
    assert hi == pytest.approx(ref, rel=0.03) and lo == pytest.approx(-ref, rel=0.03)
    # a non-negative tensor on the same grid keeps all 256 levels on its one side (unsigned in the reference)
    pos = np.abs(x)
    st = stats(pos)
    lo, hi = compute_range(st, "kl", UINT8)
    assert lo == st.min and hi > ref
