"""What a search reports: every full trial and FP32 as a point with its provenance; the front on (latency ratio to
FP32, metric on the search split); intervals (paired BCa bootstrap over samples) for the front, FP32 and all-INT8
on the search split and, when held out, on the confirm split; the recommended point; the hypervolume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluators.samples import PairedBootstrap
from .fidelity import PRUNE_ALPHA
from .pareto import front_indices, hypervolume, monotone_violations
from .records import TrialRecord


@dataclass
class SearchResult:
    records: list[TrialRecord]
    rows: list[dict]  # reported points: every full trial plus FP32, with intervals (see search/results.py)
    front: list[dict]
    recommended: dict | None
    sensitivity: object  # sensq.sensitivity.SensitivityResult
    reports: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    summary: dict = field(default_factory=dict)


@dataclass
class ReportInputs:
    """What the report reads from a finished (or interrupted) search; SearchRun.report_inputs() fills it."""

    records: list[TrialRecord]
    fp32: dict  # FP32's row (fp32_row)
    fp32_hash: str
    int8_hash: str
    store: object  # evaluators/scoring.SampleStore: per-sample results by model hash
    split: object  # search/splits.Split
    settings: object  # SearchSettings
    per_sample: bool  # the evaluator gives per-sample results (intervals possible)
    sens: object  # sensq.sensitivity.SensitivityResult
    workdir: Path
    stage_seconds: dict
    repeats: int  # proposals skipped as repeats
    backend_unit: str
    backend_spec: str
    target: str
    scored_by: str | None
    machine: dict
    latency_confirmation: object = None  # search/latency_confirm.LatencyConfirmation, None when it did not run
    sens_paths: dict = field(default_factory=dict)
    confirm_store: object = None  # who holds the held-out scores (None: `store`); --rank-by agreement: the labeled
    confirm_indices: object = None  # the held-out samples (None: split.confirm)
    confirm_metric_name: str | None = None  # the held-out metric when it is not the search's (labeled vs agreement)


HV_METRIC_MARGIN = 0.03  # hypervolume reference point: (1.0 x FP32 latency, FP32 metric - 0.03), documented in docs


def full_records(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Trials scored on the whole search split with a latency, one per plan (the first)."""
    seen, out = set(), []
    for r in recs:
        if r.full and r.plan_key not in seen:
            seen.add(r.plan_key)
            out.append(r)
    return out


def front_records(recs: list[TrialRecord], confirmation=None) -> list[TrialRecord]:
    """The front's trials (FP32 left out), from the confirmed latency when the confirmation stage ran."""
    full = full_records(recs)
    rows = [trial_row(r) for r in full]
    apply_confirmation(rows, confirmation)
    return [full[i] for i in mark_front(rows, confirmation)]


def apply_confirmation(rows: list[dict], confirmation) -> None:
    """Replace each re-timed row's latency by its confirmed one (ratio, interval and ms from the same rounds), keeping
    the search-time ratio next to it; rows not re-timed keep theirs and are marked so."""
    for r in rows:
        r["search_ratio"], r["search_ratio_lo"], r["search_ratio_hi"] = r["ratio"], r["ratio_lo"], r["ratio_hi"]
        c = None if confirmation is None else confirmation.by_hash.get(r["model_hash"])
        r["latency_confirmed"] = c is not None
        if c is not None:
            r.update(ratio=c["ratio"], ratio_lo=c["ratio_ci"][0], ratio_hi=c["ratio_ci"][1], latency_value=c["value"],
                     latency_iqr=c["value_iqr"], fp32_value_same_rounds=c["ref_value"], latency_date=confirmation.date)


def mark_front(rows: list[dict], confirmation=None) -> list[int]:
    """Flag monotone-prior violations and the front (`on_front`); return the front's indices, cheapest first.

    With a confirmation only re-timed rows (and FP32) compete: the others' ratios come from other moments."""
    violations = monotone_violations(rows)
    for r in rows:
        r["monotone_violation"] = violations.get(r["trial"])
    eligible = [not r["monotone_violation"] and (confirmation is None or r["latency_confirmed"] or r["trial"] < 0)
                for r in rows]
    idx = front_indices([r["metric"] if ok else math.nan for r, ok in zip(rows, eligible)], [r["ratio"] for r in rows],
                        [r["trial"] for r in rows])
    for i, r in enumerate(rows):
        r["on_front"] = i in idx
    return idx


def trial_row(rec: TrialRecord) -> dict:
    lat = rec.latency or {}
    p = rec.plan
    return {"trial": rec.number, "label": rec.label, "source": rec.source, "float_groups": rec.float_groups,
            "n_float_nodes": len(p["float_nodes"]), "method": p["method"],
            "percentile": p["percentile"] if p["method"] == "percentile" else None, "per_channel": p["per_channel"],
            "overflow_fix": p["overflow_fix"], "metric": rec.metric, "ratio": lat.get("ratio"),
            "ratio_lo": (lat.get("ratio_ci") or [None, None])[0], "ratio_hi": (lat.get("ratio_ci") or [None, None])[1],
            "latency_value": lat.get("value"), "latency_iqr": lat.get("value_iqr"), "latency_unit": lat.get("unit"),
            "fp32_value_same_rounds": lat.get("ref_value"), "latency_date": lat.get("date"),
            "machine_id": lat.get("machine_id"), "gbops": rec.gbops, "plan_key": rec.plan_key,
            "structure_key": rec.structure_key, "model_hash": rec.model_hash, "plan": rec.plan}


def fp32_row(metric: float, lat, machine: dict, fp32_hash: str) -> dict:
    """FP32's reported point: its metric on the search split, its latency (LatencyResult) measured in this run."""
    return {"trial": -1, "label": "FP32", "source": "reference", "float_groups": ["(all)"], "n_float_nodes": None,
            "method": "-", "percentile": None, "per_channel": None, "overflow_fix": None,
            "metric": metric, "ratio": 1.0, "ratio_lo": 1.0, "ratio_hi": 1.0,
            "latency_value": lat.value, "latency_iqr": lat.spread, "latency_unit": lat.unit,
            "fp32_value_same_rounds": lat.value, "latency_date": machine["date"],
            "machine_id": machine["machine_id"], "gbops": None, "plan_key": None, "structure_key": None,
            "model_hash": fp32_hash}


def _add_intervals(rows: list[dict], inp, boot, prefix: str, store=None) -> None:
    """metric, difference to FP32 and to all-INT8 with 95 % paired intervals, over the bootstrap's samples."""
    if boot is None:
        return
    store = store or inp.store
    indices = boot.indices
    fp32 = store.get(inp.fp32_hash)
    int8 = store.get(inp.int8_hash)
    for row in rows:
        samples = store.get(row["model_hash"])
        if samples is None or not samples.has(indices):
            continue
        m = boot.metric(samples)
        row[f"{prefix}metric"], row[f"{prefix}metric_lo"], row[f"{prefix}metric_hi"] = m.value, m.lo, m.hi
        for name, ref in (("fp32", fp32), ("int8", int8)):
            d = boot.difference(samples, ref)
            row[f"{prefix}d_{name}"], row[f"{prefix}d_{name}_lo"], row[f"{prefix}d_{name}_hi"] = d.value, d.lo, d.hi


def _neighbours(front: list[dict], inp, boot) -> list[str]:
    """Adjacent front points that the data cannot tell apart (metric interval of the paired difference spans 0,
    or overlapping latency-ratio intervals)."""
    notes = []
    for a, b in zip(front, front[1:]):
        parts = []
        sa, sb = inp.store.get(a["model_hash"]), inp.store.get(b["model_hash"])
        if boot is not None and sa is not None and sb is not None:
            d = boot.difference(sb, sa)
            if d.lo <= 0 <= d.hi:
                parts.append(f"{inp.sens.metric_name} difference {d.value:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] includes 0")
        if None not in (a["ratio_hi"], b["ratio_lo"]) and b["ratio_lo"] <= a["ratio_hi"]:
            parts.append("latency intervals overlap")
        if parts:
            notes.append(f"trials {a['trial']} and {b['trial']} are not distinguishable: " + "; ".join(parts))
    return notes


def recommend(front: list[dict], max_drop: float, key: str = "d_fp32") -> dict | None:
    """The fastest front point (not FP32) whose difference to FP32 on the search split is >= -max_drop and that is
    faster than FP32 (its latency interval below 1x): a plan no faster than FP32 is no reason to leave FP32."""
    ok = [r for r in front if r["trial"] >= 0 and r.get(key) is not None and r[key] >= -max_drop
          and (r["ratio_hi"] if r.get("ratio_hi") is not None else r["ratio"]) < 1.0]
    return min(ok, key=lambda r: r["ratio"]) if ok else None


def build_result(inp: ReportInputs, seconds: float):
    from ..reports.pareto_report import write_pareto_report

    recs = inp.records
    confirmation = inp.latency_confirmation
    rows = [dict(inp.fp32)] + [trial_row(r) for r in full_records(recs)]
    apply_confirmation(rows, confirmation)
    idx = mark_front(rows, confirmation)
    front = [rows[i] for i in idx]
    all_int8 = next((r for r in rows if r["model_hash"] == inp.int8_hash), None)
    shown = front + [r for r in (rows[0], all_int8) if r is not None and not r["on_front"]]
    confirm_idx = inp.split.confirm if inp.confirm_indices is None else inp.confirm_indices
    boots = {part: PairedBootstrap(idx, inp.settings.n_boot, inp.settings.seed)
             if inp.per_sample and len(idx) else None
             for part, idx in (("search", inp.split.search), ("confirm", confirm_idx))}
    _add_intervals(shown, inp, boots["search"], "")
    _add_intervals(shown, inp, boots["confirm"], "confirm_", inp.confirm_store)
    for r in shown:
        if r.get("confirm_metric") is not None and inp.confirm_metric_name is None:  # same metric on both parts
            r["optimism"] = r["metric"] - r["confirm_metric"]
    # ranked label-free, confirmed labeled: the user's metric decides (the labeled samples selected no trial)
    rec = recommend(front, inp.settings.max_drop, "confirm_d_fp32" if inp.confirm_metric_name else "d_fp32")
    for r in rows:
        r["recommended"] = rec is not None and r["trial"] == rec["trial"]
    summary = _summary(inp, recs, rows, front, rec)
    summary["neighbours"] = _neighbours(front, inp, boots["search"])
    summary["monotone_violations"] = [r["monotone_violation"] for r in rows if r["monotone_violation"]]
    summary["latency_confirmation"] = _confirmation_summary(confirmation, rows)
    summary["confirm_samples"] = len(confirm_idx)
    summary["confirm_metric_name"] = inp.confirm_metric_name
    paths = write_pareto_report(rows, front, summary, inp.workdir)
    paths["trials"] = write_trials_csv(recs, inp.workdir / "trials.csv")
    paths.update({f"sensitivity {k}": v for k, v in inp.sens_paths.items()})
    return SearchResult(recs, rows, front, rec, inp.sens, paths, seconds, dict(inp.stage_seconds), inp.repeats, summary)


def _confirmation_summary(confirmation, rows: list[dict]) -> dict | None:
    if confirmation is None:
        return None
    return {"trials": confirmation.trials, "rounds": confirmation.rounds, "seconds": confirmation.seconds,
            "budget": confirmation.budget, "skipped": {str(k): v for k, v in sorted(confirmation.skipped.items())},
            "fp32_ms": rows[0]["latency_value"], "date": confirmation.date}


def write_trials_csv(recs: list[TrialRecord], path) -> object:
    """Every scored trial, one row each (pruned and warm-start entries included), for pandas."""
    import pandas as pd

    out = []
    for r in recs:
        lat = r.latency or {}
        out.append({"trial": r.number, "source": r.source, "label": r.label, "fidelity": r.fidelity,
                    "metric": r.metric, "delta_int8": r.delta_int8, "pruned": bool(r.pruned),
                    "pruned_by": (r.pruned or {}).get("by"), "pruned_diff_hi": (r.pruned or {}).get("hi"),
                    "pruned_tests": (r.pruned or {}).get("tests"),
                    "rejected": r.rejected or "", "ratio": lat.get("ratio"), "ratio_lo": (lat.get("ratio_ci") or [None, None])[0],
                    "ratio_hi": (lat.get("ratio_ci") or [None, None])[1], "latency_value": lat.get("value"),
                    "latency_unit": lat.get("unit"), "cost_proxy": r.cost_proxy, "float_groups": ";".join(r.float_groups),
                    "unfused_island_q": (lat.get("fusion") or {}).get("island_q"),
                    "unfused_island_dq": (lat.get("fusion") or {}).get("island_dq"),
                    "casts_added": (lat.get("fusion") or {}).get("casts_added"),
                    "unfused_q16": (lat.get("fusion") or {}).get("unfused_q16"),
                    "method": r.plan["method"], "per_channel": r.plan["per_channel"],
                    "overflow_fix": r.plan["overflow_fix"], "plan_key": r.plan_key, "structure_key": r.structure_key,
                    "model_hash": r.model_hash, "repeat_of": r.repeat_of, "seconds": sum(r.seconds.values())})
    pd.DataFrame(out).to_csv(path, index=False)
    return path


def _summary(inp, recs, rows, front, rec) -> dict:
    fp32_metric = rows[0]["metric"]
    ref = (1.0, fp32_metric - HV_METRIC_MARGIN)
    searched = [r for r in recs if r.source != "sensitivity"]
    pruned = [r for r in searched if r.pruned]
    full_cost = [r.seconds.get("full", 0.0) for r in searched if not r.pruned and "full" in r.seconds]
    s = inp.settings
    timed = [r for r in rows if r["trial"] >= 0 and r["ratio_lo"] is not None]
    return {
        "metric_name": inp.sens.metric_name, "latency_unit": inp.backend_unit, "latency_backend": inp.backend_spec,
        "target": inp.target, "scored_by": inp.scored_by, "machine": inp.machine, "strategy": s.strategy, "budget": s.budget,
        "distinct_plans": len({r.plan_key for r in searched if r.repeat_of is None}), "repeats": inp.repeats,
        # trial -> the earlier trial whose built model it gave (not scored again; its results reused)
        "model_repeats": {r.number: r.repeat_of for r in searched if r.repeat_of is not None},
        "rejected": {r.number: r.rejected for r in searched if r.rejected},
        "pruned": len(pruned), "prune_alpha": PRUNE_ALPHA,
        "saved_seconds_estimate": len(pruned) * (float(np.mean(full_cost)) if full_cost else 0.0),
        "search_samples": len(inp.split.search), "confirm_samples": len(inp.split.confirm), "low_fidelity": inp.split.low,
        "hypervolume_ref": {"ratio": ref[0], "metric": ref[1]},
        "hypervolume": hypervolume([r["metric"] for r in front], [r["ratio"] for r in front], ref[1], ref[0]),
        "max_drop": s.max_drop, "recommended_trial": None if rec is None else rec["trial"],
        "recommendation_rule": (f"the fastest front point whose {inp.confirm_metric_name} on the labeled samples is within "
                                f"{s.max_drop} of FP32 (point estimate; the front was ranked label-free) and measurably faster than FP32"
                                if inp.confirm_metric_name else
                                f"the fastest front point whose {inp.sens.metric_name} on the search split is within "
                                f"{s.max_drop} of FP32 (point estimate) and measurably faster than FP32; its confirm-split score is the "
                                "one to expect"),
        "stage_seconds": dict(inp.stage_seconds), "fp32_ms_this_run": rows[0]["latency_value"],
        "fp32_spread_this_run": rows[0]["latency_iqr"], "sensitivity_notes": inp.sens.notes,
        "proxy_agreement": inp.sens.proxy_agreement if math.isfinite(inp.sens.proxy_agreement) else None,
        # float islands whose conversions cost more than INT8 saves: measured slower than FP32 with confidence
        "slower_than_fp32": [r["trial"] for r in timed if r["ratio_lo"] > 1.0],
        # no INT8 plan measurably faster than FP32 (every interval reaches 1x): the search trades accuracy only
        "none_faster_than_fp32": bool(timed) and all(r["ratio_hi"] >= 1.0 for r in timed),
        "machines": sorted({r.latency["machine_id"] for r in recs if r.latency}),
    }
