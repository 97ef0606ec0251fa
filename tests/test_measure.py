"""Error measures against values worked out by hand on tiny arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sensq.evaluators.measure import (COSINE_FLAG, SNR_FLAG, compare, cosine, histogram32, minmax, mse, snr,
                                      sqnr_db)

F = [1.0, 2.0, 2.0]
Q = [1.0, 2.0, 3.0]
# q - f = [0, 0, 1]  -> ||q-f||^2 = 1,  ||f||^2 = 1 + 4 + 4 = 9,  q.f = 1 + 4 + 6 = 11,  ||q||^2 = 1 + 4 + 9 = 14


def test_flag_thresholds_are_the_documented_ones():
    """The README tells users which rows are flagged; the constants must say the same."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snr_doc = re.search(r"(?:SNR|rows)\s*>\s*([0-9.]*[0-9])", readme)
    cos_doc = re.search(r"Cosine\s*<\s*([0-9.]*[0-9])", readme)
    assert snr_doc and cos_doc, "README no longer states the flag thresholds"
    assert (SNR_FLAG, COSINE_FLAG) == (float(snr_doc.group(1)), float(cos_doc.group(1)))
    # the SNR threshold is noise at a tenth of the signal power: 10 dB SQNR (by hand: -10 log10 0.1)
    assert sqnr_db(SNR_FLAG) == pytest.approx(10.0)


def test_snr_is_noise_to_signal_ratio():
    assert snr(Q, F) == pytest.approx(1 / 9, rel=1e-15)
    assert snr(F, F) == 0.0
    # q = 2f: noise = ||f||^2, ratio exactly 1
    assert snr([2.0, 4.0], [1.0, 2.0]) == pytest.approx(1.0)


def test_snr_zero_reference():
    assert snr([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert snr([1.0, 0.0], [0.0, 0.0]) == math.inf


def test_sqnr_db():
    assert sqnr_db(1 / 9) == pytest.approx(10 * math.log10(9))  # 9.5424 dB
    assert sqnr_db(0.1) == pytest.approx(10.0)
    assert sqnr_db(0.01) == pytest.approx(20.0)
    assert sqnr_db(1.0) == 0.0
    assert sqnr_db(0.0) == math.inf
    assert sqnr_db(math.inf) == -math.inf
    with pytest.raises(ValueError):
        sqnr_db(-0.5)


def test_mse():
    assert mse(Q, F) == pytest.approx(1 / 3)
    assert mse([0.0, 0.0], [3.0, 4.0]) == pytest.approx((9 + 16) / 2)


def test_cosine():
    assert cosine(Q, F) == pytest.approx(11 / (3 * math.sqrt(14)))  # 0.97996
    assert cosine([0, 0], [0, 0]) == 1.0
    assert cosine([0, 0], [1, 2]) == 0.0
    assert cosine([1, 2], [0, 0]) == 0.0
    assert cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)
    assert cosine([1e-3, 3e-3, 7e-3], [1e-3, 3e-3, 7e-3]) <= 1.0  # never above 1 from rounding


def test_any_shape_and_dtype_flatten_the_same():
    q2 = np.array([[1.0, 2.0], [3.0, 4.0]])
    f2 = np.array([[1.0, 2.0], [3.0, 5.0]])
    # diff [0,0,0,-1]: noise 1, signal 1+4+9+25 = 39
    assert snr(q2, f2) == pytest.approx(1 / 39)
    assert snr(q2.ravel(), f2.ravel()) == snr(q2, f2)
    assert snr(q2.astype(np.float16), f2.astype(np.float16)) == pytest.approx(1 / 39, rel=1e-12)
    assert mse(q2.reshape(1, 4, 1), f2) == pytest.approx(0.25)


def test_size_mismatch_raises():
    with pytest.raises(ValueError):
        snr([1.0, 2.0], [1.0, 2.0, 3.0])


def test_float64_accumulation():
    # float16 would overflow (max 65504) summing 100 squares of 100 = 1e6; float64 accumulation must not.
    f = np.full(100, 100.0, dtype=np.float16)
    q = np.full(100, 110.0, dtype=np.float16)
    assert snr(q, f) == pytest.approx((100 * 10.0**2) / (100 * 100.0**2))  # 0.01
    assert cosine(q, f) == pytest.approx(1.0)


def test_minmax():
    assert minmax([[3.0, -1.0], [2.0, 5.0]]) == (-1.0, 5.0)
    lo, hi = minmax(np.array([7], dtype=np.int8))
    assert (lo, hi) == (7.0, 7.0) and isinstance(lo, float)
    with pytest.raises(ValueError):
        minmax([])


def test_histogram32():
    assert histogram32(np.arange(32)) == [1] * 32  # one value per bin of width 31/32
    h = histogram32([0.0, 0.5, 1.0])  # 0.5 * 32 = 16 -> bin 16; the max goes in the last bin
    assert h == [1] + [0] * 15 + [1] + [0] * 14 + [1]
    assert histogram32([2.0, 2.0, 2.0]) == [3] + [0] * 31
    assert histogram32([0.0, 1.0, np.inf, np.nan]) == [1] + [0] * 30 + [1]
    h = histogram32(np.random.default_rng(0).normal(size=(4, 50)))
    assert len(h) == 32 and sum(h) == 200 and all(isinstance(c, int) for c in h)


def test_compare():
    d = compare(np.array(Q), np.array(F))
    assert set(d) == {"SNR", "SQNR_dB", "MSE", "Cosine", "Q.MinMax", "F.MinMax", "F.Hist"}
    assert d["SNR"] == pytest.approx(1 / 9)
    assert d["SQNR_dB"] == pytest.approx(10 * math.log10(9))
    assert d["MSE"] == pytest.approx(1 / 3)
    assert d["Cosine"] == pytest.approx(11 / (3 * math.sqrt(14)))
    assert d["Q.MinMax"] == (1.0, 3.0)
    assert d["F.MinMax"] == (1.0, 2.0)
    assert d["F.Hist"] == [1] + [0] * 30 + [2]  # f = [1, 2, 2]: min in bin 0, both maxima in bin 31
