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
INT8_SYM = Grid(-128, 127, True)


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


def test_merge_equals_single_update():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3000).astype(np.float32) * 0.1  # scale 1 or 0.5
    b = (rng.standard_normal(2000) * 20).astype(np.float32)  # scale 128
    one = stats(a, b)
    for first, second in ((a, b), (b, a)):
        x, y = stats(first), stats(second)
        x.merge(y)
        assert x.scale == one.scale
        assert np.array_equal(x.hist, one.hist)
        assert (x.min, x.max, x.count) == (one.min, one.max, one.count)
    # merging into / from an empty stats is a copy
    e = TensorStats()
    e.merge(one)
    assert np.array_equal(e.hist, one.hist) and e.count == one.count
    e.hist[0] += 1
    assert e.hist[0] != one.hist[0], "merge into an empty stats must copy, not alias, the histogram"
    before = one.hist.copy()
    one.merge(TensorStats())
    assert np.array_equal(one.hist, before)


def test_non_finite_values_ignored_and_large_tensors_subsampled():
    st = stats([np.nan, 1.0, -np.inf, -2.0])
    assert (st.min, st.max, st.count) == (-2.0, 1.0, 2)
    assert st.hist.sum() == 2
    st = stats([np.nan, np.inf])
    assert st.count == 0 and st.hist.sum() == 0

    n = 2 * SAMPLE_CAP + 1
    x = np.zeros(n, np.float32)
    x[1] = 1000.0  # not on the stride-3 subsample, but min/max must stay exact
    x[2] = -7.0
    st = stats(x)
    stride = -(-n // SAMPLE_CAP)
    assert stride == 3
    assert st.count == n
    assert st.hist.sum() == len(range(0, n, stride))
    assert (st.min, st.max) == (-7.0, 1000.0)


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
    assert lo == st.min and hi == pytest.approx(kl_threshold(st, target_bins=256))  # -t is clamped to the observed min (|x| >= 0)


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

    # symmetric int8: a = max(1, 3) = 3, scale = 6/255, zero point 0
    s = 6.0 / 255.0
    # -0.5/s = -21.25 -> -21; 0.3/s = 12.75 -> 13; 4/s = 170 -> clipped to 127
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


def test_grid_for_activation():
    assert Grid.for_activation("uint8", False) == Grid(0, 255, False)
    assert Grid.for_activation("int8", True) == Grid(-128, 127, True)
