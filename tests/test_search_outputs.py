"""What a search reports: the front (brute force over the stored records), intervals from the stored per-sample
values, the held-out confirmation, units that follow the backend, the recommended point, trials.csv."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from sensq.evaluators.samples import PairedBootstrap
from sensq.evaluators.scoring import SampleStore
from sensq.quantize import cache_dir
from sensq.search import run_search
from sensq.search.pareto import front_indices, hypervolume

from search_helpers import PNG_SIGNATURE, make_tiny, searched, study_records, tiny_settings


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory):
    """A budget-12 search on the tiny setup with half of the 16 samples held out."""
    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path_factory.mktemp("search") / "run"
    result = run_search(ws, ev, tiny_settings(workdir, 12, confirm=0.5, low_fidelity=4), progress=False)
    return workdir, result, ws, ev


def _dominated(p, points) -> bool:
    return any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points)


def test_front_is_the_brute_force_front_of_full_trials_and_fp32(confirmed):
    workdir, result, ws, _ = confirmed
    doc = json.loads((workdir / "pareto.json").read_text())
    recs = study_records(workdir)
    full = {r.number: (r.metric, r.ratio) for r in recs if r.full}
    fp32 = next(r for r in result.rows if r["trial"] == -1)
    points = {**full, -1: (fp32["metric"], 1.0)}
    front = {r["trial"]: (r["metric"], r["ratio"]) for r in doc["front"]}
    for n, p in front.items():
        assert points[n] == pytest.approx(p) and not _dominated(p, points.values())
    expected = {n for n, p in points.items() if not _dominated(p, points.values())}
    assert set(front) <= expected and len({points[n] for n in expected}) == len(front)
    assert not [r for r in recs if r.pruned and r.number in front]  # stopped trials are never on the front


def test_intervals_recompute_from_stored_per_sample_values(confirmed):
    workdir, result, ws, ev = confirmed
    split = json.loads((workdir / "search.json").read_text())["split"]
    store = SampleStore(cache_dir(ws.cfg) / "samples", ev)
    fp32 = next(r for r in result.rows if r["trial"] == -1)
    for part, prefix in ((split["search"], ""), (split["confirm"], "confirm_")):
        boot = PairedBootstrap(np.asarray(part), 1000, 0)
        for row in result.front:
            mine = store.get(row["model_hash"])
            m, d = boot.metric(mine), boot.difference(mine, store.get(fp32["model_hash"]))
            assert (row[f"{prefix}metric"], row[f"{prefix}metric_lo"], row[f"{prefix}metric_hi"]) == pytest.approx((m.value, m.lo, m.hi))
            assert (row[f"{prefix}d_fp32"], row[f"{prefix}d_fp32_lo"], row[f"{prefix}d_fp32_hi"]) == pytest.approx((d.value, d.lo, d.hi))
            assert m.lo <= m.value <= m.hi
    assert len(split["confirm"]) == 8 and not set(split["confirm"]) & set(split["search"])
    for row in result.front:
        if row["trial"] >= 0:
            assert row["optimism"] == pytest.approx(row["metric"] - row["confirm_metric"])


def test_bops_is_labelled_gbops_everywhere(confirmed, capsys):
    workdir, result, _, _ = confirmed
    doc = json.loads((workdir / "pareto.json").read_text())
    assert doc["latency_unit"] == "GBOPs" and doc["latency_axis"] == "ratio to FP32"
    assert all(r["latency_unit"] == "GBOPs" for r in doc["front"])
    md = (workdir / "pareto.md").read_text()
    assert "GBOPs (measured)" in md and not re.search(r"\bms\b", md)
    csv = pd.read_csv(workdir / "pareto.csv")
    assert set(csv["latency_unit"].dropna()) == {"GBOPs"}
    from sensq.reports.pareto_report import format_front_summary

    assert "GBOPs (measured)" in format_front_summary(result.front, result.summary)
    assert " ms" not in format_front_summary(result.front, result.summary)


def test_recommended_point_and_files(confirmed):
    workdir, result, _, _ = confirmed
    doc = json.loads((workdir / "pareto.json").read_text())
    rec = doc["recommended_trial"]
    ok = [r for r in doc["front"] if r["trial"] >= 0 and r["d_fp32"] >= -0.005 and r["ratio_hi"] < 1.0]
    assert rec == (min(ok, key=lambda r: r["ratio"])["trial"] if ok else None)
    assert (workdir / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in (workdir / "front").glob("trial_*.json")) == \
        sorted(f"trial_{r['trial']}.json" for r in doc["front"] if r["trial"] >= 0)
    trials = pd.read_csv(workdir / "trials.csv")
    assert len(trials) == len(study_records(workdir)) and set(trials["source"]) >= {"seed", "sensitivity"}
    assert int(trials["pruned"].sum()) == result.summary["pruned"]
    assert result.summary["distinct_plans"] == len(searched(study_records(workdir))) == 12


def test_a_plan_no_faster_than_fp32_is_never_recommended():
    """README-job run 1 of bench_front_repro recommended trial 51 at 1.043x [1.023, 1.092]: more accurate than FP32
    on the search split (noise), on the front because of it, and slower than FP32."""
    from sensq.search.results import recommend

    front = [{"trial": 0, "ratio": 0.966, "ratio_lo": 0.931, "ratio_hi": 1.001, "d_fp32": -0.0106},
             {"trial": 51, "ratio": 1.043, "ratio_lo": 1.023, "ratio_hi": 1.092, "d_fp32": +0.0010},
             {"trial": -1, "ratio": 1.0, "ratio_lo": 1.0, "ratio_hi": 1.0, "d_fp32": 0.0}]
    assert recommend(front, 0.005) is None
    front[0]["d_fp32"] = -0.004
    assert recommend(front, 0.005) is None  # within the drop, but its interval reaches 1x: not measurably faster
    front[0]["ratio_hi"] = 0.99
    assert recommend(front, 0.005)["trial"] == 0


def test_pareto_helpers_by_hand():
    metric, cost = [0.5, 0.4, 0.55, 0.3, 0.55], [2.0, 1.0, 1.5, 1.0, 1.5]
    assert front_indices(metric, cost) == [1, 2]  # 0 dominated by 2; 3 by 1; 4 duplicates 2 (later)
    # two front points (1.0, 0.4) and (1.5, 0.55) against (2.0, 0.3): 0.5 x 0.1 + 0.5 x 0.25
    assert hypervolume(metric, cost, 0.3, 2.0) == pytest.approx(0.5 * 0.1 + 0.5 * 0.25)
    assert hypervolume([0.2], [0.5], 0.3, 2.0) == 0.0  # below the reference metric: nothing


def test_a_plan_the_runtime_cannot_compile_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    """OpenVINO 2026.4 fails to compile some Q/DQ placements (its MoveFakeQuantize pass on a Concat): that plan gets no
    latency, is counted and reported as rejected, and is never on the front; the other plans are unaffected."""
    from sensq.errors import RuntimeRejected
    from sensq.search import trials as trials_module

    calls = []
    original = trials_module.measure_paired

    def flaky(backend, model, reference, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeRejected("OpenVINO 2026.4.1 cannot compile this model for CPU: Argument shapes are inconsistent.")
        return original(backend, model, reference, **kw)

    monkeypatch.setattr(trials_module, "measure_paired", flaky)
    tiny = make_tiny(tmp_path / "tiny")
    workdir = tmp_path / "w"
    run_search(tiny.workspace(), tiny.evaluator(), tiny_settings(workdir, 4), progress=False)
    recs = searched(study_records(workdir))
    rejected = [r for r in recs if r.rejected]
    # counted toward the budget, the search went on; a later plan with the same graph structure is rejected from the
    # latency book without another try
    assert len(recs) == 4 and len(rejected) >= 1 and len({r.structure_key for r in rejected}) == 1
    bad = rejected[0]
    assert bad.latency is None and not bad.full and "Argument shapes are inconsistent" in bad.rejected
    doc = json.loads((workdir / "pareto.json").read_text())
    assert bad.number not in [r["trial"] for r in doc["front"]]
    assert list(doc["summary"]["rejected"]) == [str(r.number) for r in rejected]
    csv = pd.read_csv(workdir / "trials.csv").set_index("trial")
    assert csv.loc[bad.number, "rejected"].startswith("OpenVINO") and csv["rejected"].fillna("").eq("").sum() == len(csv) - len(rejected)
    assert f"rejected {len(rejected)} plan(s)" in (workdir / "pareto.md").read_text()


def test_a_rejected_structure_is_booked_and_not_compiled_again(tmp_path, monkeypatch):
    """Trials sharing a graph structure share its latency entry; a rejection is such an entry too."""
    from types import SimpleNamespace

    from sensq.errors import RuntimeRejected
    from sensq.search import trials as trials_module
    from sensq.search.records import LatencyBook

    calls = []

    def rejecting(backend, model, reference, **kw):
        calls.append(1)
        raise RuntimeRejected("cannot compile")

    monkeypatch.setattr(trials_module, "measure_paired", rejecting)
    run = SimpleNamespace(book=LatencyBook(), machine={"machine_id": "m"}, backend=SimpleNamespace(spec="openvino"),
                          lock_dir=tmp_path, reference_timer=None)
    evaluator = trials_module.TrialEvaluator(run)
    for _ in range(2):
        with pytest.raises(RuntimeRejected, match="cannot compile"):
            evaluator.latency(None, "structure-a")
    assert len(calls) == 1


def test_monotone_prior_keeps_a_float_superset_shown_faster_off_the_front():
    """Issue's trial 64: three more float groups than all-INT8, shown faster with overlapping intervals: flagged and
    not on the front; with disjoint intervals the measurement stands."""
    from sensq.search.pareto import front_indices, monotone_violations

    base = {"method": "default", "per_channel": True, "float_nodes": ["h"], "notes": []}
    rows = [{"trial": 0, "plan": base, "metric": 0.2862, "ratio": 0.710, "ratio_lo": 0.595, "ratio_hi": 0.779},
            {"trial": 64, "plan": {**base, "float_nodes": ["h", "a", "b", "c"], "notes": ["x"]}, "metric": 0.2880,
             "ratio": 0.676, "ratio_lo": 0.667, "ratio_hi": 0.740},
            {"trial": 5, "plan": {**base, "method": "mse", "float_nodes": ["h", "a"]}, "metric": 0.2870,
             "ratio": 0.600, "ratio_lo": 0.59, "ratio_hi": 0.61}]  # another method: not comparable, not flagged
    bad = monotone_violations(rows)
    assert set(bad) == {64} and "trial 0" in bad[64]
    naive = front_indices([r["metric"] for r in rows], [r["ratio"] for r in rows])
    assert 1 in naive  # what the front was before the prior
    slow = [{**rows[0], "ratio": 2.18, "ratio_lo": 2.0, "ratio_hi": 2.3}, {**rows[1], "ratio": 1.96, "ratio_lo": 1.8,
                                                                             "ratio_hi": 2.2}]
    # INT8 slower than FP32 (YOLOX-Nano inputs-only): keeping more float can be faster, but only disjoint intervals
    # (the confirmation's) show it; overlapping ones do not, whatever the side of 1x
    assert set(monotone_violations(slow)) == {64}
    slow[1] = {**slow[1], "ratio": 1.90, "ratio_lo": 1.85, "ratio_hi": 1.95}
    assert monotone_violations(slow) == {}
    rows[1] = {**rows[1], "ratio_hi": 0.59, "ratio": 0.58, "ratio_lo": 0.57}  # disjoint and faster: believed
    assert monotone_violations(rows) == {}
