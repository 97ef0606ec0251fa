"""The one front rule: maximize the metric, minimize the cost (latency ratio to FP32). Used by the search loop, the
progress bar, the reports and the benchmarks, so they can never disagree about which points are on the front.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def front_indices(metric: Sequence[float], cost: Sequence[float], order: Sequence[float] | None = None) -> list[int]:
    """Indices of the non-dominated points, cheapest first.

    A point is dominated when another has metric >= and cost <= with one of them strict. Of exact duplicates
    (same metric and cost) only the one with the lowest `order` (e.g. trial number) is kept."""
    m = np.asarray(metric, np.float64)
    c = np.asarray(cost, np.float64)
    o = np.arange(len(m), dtype=np.float64) if order is None else np.asarray(order, np.float64)
    ok = np.flatnonzero(np.isfinite(m) & np.isfinite(c))
    # Cheapest first, best metric first within a cost, lowest order first within duplicates: a sweep keeping strict
    # metric improvements drops exactly the dominated points and the later duplicates.
    keep, best = [], -math.inf
    for i in ok[np.lexsort((o[ok], -m[ok], c[ok]))]:
        if m[i] > best:
            keep.append(int(i))
            best = m[i]
    return keep


def hypervolume(metric: Iterable[float], cost: Iterable[float], ref_metric: float, ref_cost: float) -> float:
    """Area dominated by the points and bounded by the reference point (ref_cost, ref_metric): the larger, the
    better the front. Points at or beyond the reference (cost >= ref_cost or metric <= ref_metric) add nothing."""
    m = np.asarray(list(metric), np.float64)
    c = np.asarray(list(cost), np.float64)
    pts = [(c[i], m[i]) for i in front_indices(m, c)]  # cheapest first; the metric rises along the front
    area = 0.0
    for j, (ci, mi) in enumerate(pts):
        if ci >= ref_cost or mi <= ref_metric:
            continue
        right = min(ref_cost, pts[j + 1][0]) if j + 1 < len(pts) else ref_cost
        area += (right - ci) * (mi - ref_metric)  # this point is the best one on [ci, next point's cost)
    return float(area)


def monotone_violations(rows: Sequence[dict]) -> dict[int, str]:
    """Monotone prior: among plans equal in every knob but the float set, one whose float nodes contain another's
    runs at least that one's float work, so being shown faster than it without disjoint 95 % latency intervals is
    taken as a timing artifact. Where keeping more float really is faster (YOLOX-Nano's inputs-only INT8 runs
    DequantizeLinear + float conv; float islands that save Q/DQ conversions) the confirmation rounds show it with
    disjoint intervals, and then the measurement stands. Rows: dicts with trial, plan, ratio, ratio_lo, ratio_hi. Returns {trial: reason} of the violators."""
    def knobs(plan):
        return {k: v for k, v in plan.items() if k not in ("float_nodes", "notes")}

    out = {}
    timed = [r for r in rows if r.get("plan") and r.get("ratio") is not None and r["trial"] >= 0]
    for a in timed:
        fa = set(a["plan"]["float_nodes"])
        for b in timed:
            fb = set(b["plan"]["float_nodes"])
            if a is b or not fb < fa or knobs(a["plan"]) != knobs(b["plan"]) or a["ratio"] >= b["ratio"]:
                continue
            disjoint = a.get("ratio_hi") is not None and b.get("ratio_lo") is not None and a["ratio_hi"] < b["ratio_lo"]
            if not disjoint:
                out[a["trial"]] = (f"trial {a['trial']} keeps a superset of trial {b['trial']}'s float nodes but is shown "
                                   f"faster ({a['ratio']:.3f} vs {b['ratio']:.3f}, intervals overlap): not used for the front")
                break
    return out

