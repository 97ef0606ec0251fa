"""sensq's search against the obvious baselines, side by side in one run, with the CLI's defaults.

    python bench/bench_search.py [--model yolov5n efficientnet] [--budget 50] [--strategies tpe greedy random]
                                 [--repeat] [--confirm 0.5] [--spaces precision]

For each model, one calibration (timed) and then each strategy as its own study with its own per-sample store (so
its wall time is what it costs alone), all sharing one latency book (a graph structure measured once is the same
number for every strategy) on the same split, evaluator, backend and seed:
  tpe     sensq's search (TPE warm-started from the sensitivity pass, sound pruning)
  greedy  float groups added one at a time in sensitivity order, each scored in full (AIMET AMP / NNCF style)
  random  Optuna's RandomSampler on the same space and budget
Reported per strategy, on the held-out confirm split: the hypervolume of the front formed by its first 10, 20 and
`budget` plans in (latency ratio to FP32, metric) against the reference point (1.0, FP32 confirm metric - 0.03);
wall time; plans until the first one faster than FP32 within 0.005 of it (search split); repeats; false prunes
(every stopped trial is scored in full afterwards: would it have joined the front?). --repeat runs tpe a second
time with fresh latency measurements and stores: shared plans must agree within their intervals. --spaces runs each
strategy again on other search spaces (row "tpe+precision": int8 / a16 / fp16 / fp32 per group, what the target
runs), with the same seed, split and latency book, so HV(tpe) - HV(tpe+precision) gets its paired interval.
Writes bench/results/search_bench.json (search_bench_<spaces>.json with --spaces) with every trial's record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
MODELS = {"yolov5n": DATA / "models" / "yolov5n.onnx", "efficientnet": DATA / "imagenet" / "efficientnet_lite0.onnx"}
BUDGETS = (10, 20, 50)
HV_MARGIN = 0.03
HV_BOOT = 1000  # bootstrap resamples of the confirm images for the HV intervals


def write_results(name: str, obj) -> Path:
    """bench/results/<name>.json (not committed): the raw numbers behind a printed table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1, default=float))
    print(f"wrote {path}")
    return path


def prepare(model: str, cache: Path):
    from sensq.defaults import setup

    t0 = time.perf_counter()
    cfg, ws, ev = setup(progress=False, model=str(MODELS[model]), cache_dir=str(cache / "calib"))
    return ws, ev, time.perf_counter() - t0


def run_strategy(ws, ev, strategy: str, args, cache: Path, workdir: Path, book, space: str = "default"):
    from sensq.search import SearchSettings, SearchRun

    ws.cfg.cache_dir = str(cache / f"store-{workdir.name}")  # its own per-sample store: it pays for what it scores
    settings = SearchSettings(budget=args.budget, workdir=str(workdir), seed=args.seed, strategy=strategy,
                              confirm=args.confirm, space=space)
    run = SearchRun(ws, ev, settings, progress=False, book=book)
    result = run.run()
    return run, result


def confirm_samples(run, rec):
    """Per-sample results of a trial covering the confirm split (scored now if the search did not)."""
    from sensq.plan import PrecisionPlan

    idx = run.split.confirm
    samples = run.store.get(rec.model_hash)
    if samples is None or not samples.has(idx):
        samples = run.scorer.score(run.ws.build(PrecisionPlan.from_dict(rec.plan)), rec.model_hash, idx)
    return samples


def budget_curve(run, recs) -> dict:
    """Hypervolume on the confirm split of the front of the first b counted plans, for each b, and the same on each
    bootstrap resample of the confirm images (the same resamples for every strategy: their differences get
    intervals). Latency ratios are the measured ones (not resampled); the reference point is fixed."""
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.search.pareto import front_indices, hypervolume
    from sensq.search.results import full_records

    boot = PairedBootstrap(run.split.confirm, HV_BOOT, run.settings.seed)
    fp32_confirm = run.store.get(run.fp32_hash).value(run.split.confirm)
    ref = fp32_confirm - HV_MARGIN
    counted = [r for r in recs if r.source != "sensitivity"]
    out = {}
    for b in BUDGETS:
        first = full_records(counted[:b])
        idx = front_indices([r.metric for r in first], [r.ratio for r in first], [r.number for r in first])
        front = [first[i] for i in idx]
        samples = [confirm_samples(run, r) for r in front]
        conf = [s.value(run.split.confirm) for s in samples]
        ratios = [r.ratio for r in front]
        draws = np.array([boot.resampled(s) for s in samples]).reshape(len(front), HV_BOOT)
        out[b] = {"plans": min(b, len(counted)), "front": [r.number for r in front], "front_confirm": conf,
                  "front_ratio": ratios,
                  "hv_confirm": hypervolume(conf, ratios, ref, 1.0),
                  "hv_confirm_draws": [hypervolume(draws[:, i], ratios, ref, 1.0) for i in range(HV_BOOT)],
                  "hv_search": hypervolume([r.metric for r in front], ratios, run.fp32.value(run.split.search) - HV_MARGIN, 1.0)}
    return out


def hv_differences(rows: list[dict], model: str, base: str = "tpe") -> dict:
    """HV(sensq) - HV(other) on the confirm split at each budget, with a 95 % percentile interval over the shared
    bootstrap resamples of the confirm images."""
    mine = next(r for r in rows if r["model"] == model and r["strategy"] == base)
    out = {}
    for other in [r for r in rows if r["model"] == model and r["strategy"] not in (base, f"{base}-again")]:
        for b in BUDGETS:
            d = np.asarray(mine["curve"][b]["hv_confirm_draws"]) - np.asarray(other["curve"][b]["hv_confirm_draws"])
            point = mine["curve"][b]["hv_confirm"] - other["curve"][b]["hv_confirm"]
            out[f"{other['strategy']}@{b}"] = [point, float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    return out


def first_good(run, recs) -> int | None:
    """Counted plans until the first faster than FP32 (ratio < 1) within 0.005 of FP32 on the search split."""
    fp32 = run.fp32.value(run.split.search)
    for i, r in enumerate([r for r in recs if r.source != "sensitivity"], start=1):
        if r.full and r.ratio < 1.0 and r.metric >= fp32 - 0.005:
            return i
    return None


def false_prunes(run, recs) -> list[dict]:
    """Score every stopped trial in full; list those that would have joined the front, with their intervals."""
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.plan import PrecisionPlan
    from sensq.search.pareto import front_indices
    from sensq.search.results import full_records

    full = full_records(recs)
    boot = PairedBootstrap(run.split.search, 1000, run.settings.seed)
    out = []
    for r in [r for r in recs if r.pruned]:
        qmodel = run.ws.build(PrecisionPlan.from_dict(r.plan))
        samples = run.scorer.score(qmodel, r.model_hash, run.split.search)
        lat = run.evaluate_trial.latency(qmodel, r.structure_key)
        metric = samples.value(run.split.search)
        pts = [(x.metric, x.ratio) for x in full] + [(run.fp32.value(run.split.search), 1.0), (metric, lat["ratio"])]
        joins = len(pts) - 1 in front_indices([p[0] for p in pts], [p[1] for p in pts])
        by = next(x for x in recs if x.number == r.pruned["by"])
        d = boot.difference(samples, run.store.get(by.model_hash))
        out.append({"trial": r.number, "full_metric": metric, "ratio": lat["ratio"], "would_join_front": joins,
                    "pruned_by": by.number, "low_fidelity_diff": r.pruned, "full_diff": [d.value, d.lo, d.hi]})
    return out


def summarize(model, strategy, run, result, recs, wall) -> dict:
    from dataclasses import asdict

    fronts = budget_curve(run, recs)
    prunes = false_prunes(run, recs)
    return {"model": model, "strategy": strategy, "wall_s": wall, "stage_s": result.stage_seconds,
            "plans": result.summary["distinct_plans"], "repeats": result.repeats, "pruned": result.summary["pruned"],
            "false_prunes": [p for p in prunes if p["would_join_front"]], "prunes": prunes,
            "first_good": first_good(run, recs), "curve": fronts, "recommended": result.summary["recommended_trial"],
            "front": result.front, "fp32_ms_this_run": result.summary["fp32_ms_this_run"],
            "machine": result.summary["machine"], "records": [asdict(r) for r in recs]}


def agreement(a: dict, b: dict) -> dict:
    """Two runs of the same command: do shared plans agree within their intervals?"""
    ra = {r["plan_key"]: r for r in a["records"] if r["latency"]}
    rb = {r["plan_key"]: r for r in b["records"] if r["latency"]}
    shared = sorted(set(ra) & set(rb))
    metric_equal = all(ra[k]["metric"] == rb[k]["metric"] for k in shared)
    overlap = [max(ra[k]["latency"]["ratio_ci"][0], rb[k]["latency"]["ratio_ci"][0])
               <= min(ra[k]["latency"]["ratio_ci"][1], rb[k]["latency"]["ratio_ci"][1]) for k in shared]
    same_order = [r["plan_key"] for r in a["records"]] == [r["plan_key"] for r in b["records"]]
    keys = ("trial", "float_groups", "method", "metric", "confirm_metric", "confirm_metric_lo", "confirm_metric_hi",
            "ratio", "ratio_lo", "ratio_hi")
    best = [next(({k: p.get(k) for k in keys} for p in r["front"] if p.get("recommended")), None) for r in (a, b)]
    agree = None
    if all(best):
        agree = bool(max(x["confirm_metric_lo"] for x in best) <= min(x["confirm_metric_hi"] for x in best)
                     and max(x["ratio_lo"] for x in best) <= min(x["ratio_hi"] for x in best))
    return {"shared_plans": len(shared), "same_plans_same_order": same_order, "metrics_identical": metric_equal,
            "latency_intervals_overlap": int(sum(overlap)), "latency_intervals_disjoint": int(len(overlap) - sum(overlap)),
            "recommended": best, "recommended_agree_within_intervals": agree}


def table(rows: list[dict]) -> str:
    head = (f"{'model':12} {'strategy':8} {'plans':>5} {'HV@10':>9} {'HV@20':>9} {'HV@50':>9} {'wall s':>7} "
            f"{'1st good':>8} {'pruned':>6} {'false':>5} {'repeats':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        hv = [r["curve"][b]["hv_confirm"] for b in BUDGETS]
        lines.append(f"{r['model']:12} {r['strategy']:8} {r['plans']:>5} {hv[0]:>9.5f} {hv[1]:>9.5f} {hv[2]:>9.5f} "
                     f"{r['wall_s']:>7.0f} {str(r['first_good']):>8} {r['pruned']:>6} {len(r['false_prunes']):>5} {r['repeats']:>7}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--strategies", nargs="+", default=["tpe", "greedy", "random"])
    ap.add_argument("--repeat", action="store_true", help="run tpe twice (reproducibility)")
    ap.add_argument("--confirm", default="0.5", help="held-out part (the shared COCO set has 206 < 400 images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spaces", nargs="*", default=[], help="other search spaces to run each strategy on (precision)")
    args = ap.parse_args()
    if not all(p.is_file() for p in MODELS.values()):
        sys.exit(f"shared data not found under {DATA} (set SENSQ_DATA)")
    from sensq.cli import setup_logging
    from sensq.search import LatencyBook
    from sensq.search.records import records

    setup_logging(quiet=True)
    rows, repeats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.model:
            ws, ev, calib_s = prepare(model, tmp / model)
            book = LatencyBook()
            runs = [(s, s, "default") for s in args.strategies] + ([("tpe", "tpe-again", "default")] if args.repeat else [])
            runs += [(s, f"{s}+{space}", space) for space in args.spaces for s in args.strategies]
            for strategy, name, space in runs:
                t0 = time.perf_counter()
                run, result = run_strategy(ws, ev, strategy, args, tmp / model, tmp / model / name,
                                           LatencyBook() if name == "tpe-again" else book, space)
                wall = time.perf_counter() - t0 + (calib_s if name == args.strategies[0] else 0.0)
                row = summarize(model, name, run, result, records(run.study), wall)
                rows.append(row)
                print(f"{model} {name}: {row['plans']} plans in {row['wall_s']:.0f} s, HV@{args.budget} "
                      f"{row['curve'][BUDGETS[-1]]['hv_confirm']:.5f}", flush=True)
            if args.repeat:
                a = next(r for r in rows if r["model"] == model and r["strategy"] == "tpe")
                b = next(r for r in rows if r["model"] == model and r["strategy"] == "tpe-again")
                repeats[model] = agreement(a, b)
    print(table(rows))
    differences = {m: hv_differences(rows, m) for m in args.model if "tpe" in args.strategies}
    for model, diff in differences.items():
        print(f"{model}: HV(sensq) - HV(baseline) on the confirm split [95% bootstrap interval over its images]")
        for k, (v, lo, hi) in diff.items():
            print(f"  vs {k:10} {v:+.5f} [{lo:+.5f}, {hi:+.5f}]")
    for model, agree in repeats.items():
        print(f"{model} reproducibility: {agree}")
    write_results("_".join(["search_bench", *args.spaces]), {"budget": args.budget, "spaces": args.spaces, "rows": rows, "reproducibility": repeats,
                                   "hv_differences": differences,
                                   "hv_reference": f"(ratio 1.0, FP32 confirm metric - {HV_MARGIN})"})


if __name__ == "__main__":
    main()
