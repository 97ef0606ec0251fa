"""Error measures against hand arithmetic; report rendering (flags, CSV round trip, PNGs); Pareto front by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sensq.evaluators import measure
from sensq.reports.layer_report import flagged, write_layer_report
from sensq.reports.pareto_report import format_front_summary, pareto_front, write_pareto_report
from sensq.reports.sensitivity_report import format_topk, write_sensitivity_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_measures_by_hand():
    f = np.array([1.0, 2.0, 2.0])
    q = np.array([1.0, 2.0, 3.0])
    # ||q-f||^2 = 1, ||f||^2 = 1 + 4 + 4 = 9
    assert measure.snr(q, f) == pytest.approx(1 / 9)
    assert measure.sqnr_db(1 / 9) == pytest.approx(-10 * math.log10(1 / 9))
    assert measure.mse(q, f) == pytest.approx(1 / 3)
    # q.f = 1 + 4 + 6 = 11; |q| = sqrt(14), |f| = 3
    assert measure.cosine(q, f) == pytest.approx(11 / (3 * math.sqrt(14)))
    assert measure.minmax(q) == (1.0, 3.0)
    hist = measure.histogram32(np.array([0.0, 0.0, 1.0]))
    assert len(hist) == 32 and hist[0] == 2 and hist[-1] == 1 and sum(hist) == 3
    assert measure.snr(np.zeros(3), np.zeros(3)) == 0.0
    assert measure.cosine(np.zeros(3), np.zeros(3)) == 1.0


def _rows():
    f = np.array([1.0, 2.0, 2.0])
    rows = []
    for name, q in [("ok", f + 0.01), ("just_below", f * 1.3162), ("just_above", f * 1.3163), ("neg", -f)]:
        rows.append({"Op": f"/{name}/Conv[Conv]", "Var": f"{name}_out", **measure.compare(q, f)})
    return pd.DataFrame(rows)


def test_layer_report_flags_exactly_the_rows_over_thresholds(tmp_path):
    df = _rows()
    # scaling by s gives SNR (s-1)^2: 0.3162^2 = 0.09998 (kept), 0.3163^2 = 0.10005 (flagged); -f: SNR 4, cosine -1
    expected = [False, False, True, True]
    assert list(flagged(df)) == expected
    paths = write_layer_report(df, tmp_path / "m", "tiny", "cumulative")
    md = paths["md"].read_text()
    for name, flag in zip(["ok", "just_below", "just_above", "neg"], expected):
        line = next(line for line in md.splitlines() if line.startswith("|") and f"`{name}_out`" in line or f"| {name}_out" in line)
        assert ("⚠" in line) == flag, line
    assert f"{df.loc[2, 'SNR']:.4f}" in md and f"{df.loc[0, 'MSE']:.4f}" in md
    csv = pd.read_csv(paths["csv"])
    assert list(csv["SNR_flag"] | csv["Cosine_flag"]) == expected
    assert csv["SNR"].tolist() == pytest.approx(df["SNR"].tolist())
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000


def test_pareto_front_by_hand(tmp_path):
    df = pd.DataFrame([
        {"trial": 0, "metric": 0.29, "latency_ms": 26.0, "state": "COMPLETE", "label": "all-INT8"},
        {"trial": 1, "metric": 0.30, "latency_ms": 28.0, "state": "COMPLETE"},
        {"trial": 2, "metric": 0.29, "latency_ms": 27.0, "state": "COMPLETE"},   # dominated by 0
        {"trial": 3, "metric": 0.31, "latency_ms": 28.0, "state": "COMPLETE"},   # dominates 1
        {"trial": 4, "metric": 0.35, "latency_ms": 20.0, "state": "PRUNED"},     # pruned: never on the front
        {"trial": 5, "metric": 0.31, "latency_ms": 28.0, "state": "COMPLETE"},   # exact duplicate of 3
        {"trial": -1, "metric": 0.3047, "latency_ms": 32.0, "state": "COMPLETE", "label": "FP32"},  # dominated by 3
    ])
    front = pareto_front(df)
    assert list(front["trial"]) == [0, 3]
    paths = write_pareto_report(df, tmp_path, "mAP50-95", references={"FP32": (0.3047, 32.0)})
    doc = json.loads(paths["json"].read_text())
    assert [r["trial"] for r in doc["front"]] == [0, 3]
    assert "FP32" in doc["references"]
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE
    summary = format_front_summary(front, "mAP50-95")
    assert "0.3100" in summary and "0.2900" in summary


def test_sensitivity_topk_lines(tmp_path):
    df = pd.DataFrame([{"group": "model.2", "metric": 0.2975, "n_nodes": 17},
                       {"group": "model.24", "metric": 0.2990, "n_nodes": 3},
                       {"group": "model.0", "metric": 0.2898, "n_nodes": 3}])
    text = format_topk(df, 2, "mAP50-95", 0.2919)
    assert text.splitlines() == ["Top0: float model.24 → mAP50-95 0.2990 (+0.0071 vs all-INT8)",
                                 "Top1: float model.2 → mAP50-95 0.2975 (+0.0056 vs all-INT8)"]
    paths = write_sensitivity_report(df, tmp_path, "mAP50-95", 0.2919, 0.3047)
    ranked = pd.read_csv(paths["csv"])
    assert list(ranked["group"]) == ["model.24", "model.2", "model.0"]
    assert ranked["delta"].tolist() == pytest.approx([0.0071, 0.0056, -0.0021])
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE
