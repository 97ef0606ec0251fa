"""A detector without Ultralytics names: yolov5n with every node renamed `<op>_<i>` (as older exporters write them).

    python bench/bench_unnamed.py [--budget 10] [--sensitivity-budget 120]

Measures, with the CLI's defaults (train2017 calibrates, val2017 evaluates):
  groups, decode kept float without names, default INT8 mAP of the named and the name-stripped model;
  sensitivity with --sensitivity-budget (wall time, how many groups got the task metric);
  each of the 10 most sensitive groups kept float, scored on all 206 images (never below all-INT8 - 0.005);
  `sensq search --budget N` end to end (wall time, front).
Writes bench/results/unnamed.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data"))


def strip_names(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{i}"
    del model.metadata_props[:]  # no Ultralytics metadata either
    onnx.save(model, str(dst))
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=10)
    ap.add_argument("--sensitivity-budget", type=float, default=120.0)
    args = ap.parse_args()
    src = DATA / "models" / "yolov5n.onnx"
    if not src.is_file():
        sys.exit(f"shared data not found under {DATA} (set SENSQ_DATA)")
    from bench.bench_search import write_results
    from sensq.cli import setup_logging
    from sensq.defaults import setup
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.evaluators.scoring import SampleStore, Scorer, model_hash
    from sensq.search import SearchSettings, run_search
    from sensq.sensitivity import quantizable_groups, run_sensitivity

    setup_logging(quiet=True)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stripped = strip_names(src, tmp / "yolov5n-unnamed.onnx")
        t0 = time.perf_counter()
        _, ws, ev = setup(progress=False, model=str(stripped), cache_dir=str(tmp / "cache"))
        out["prepare_s"] = time.perf_counter() - t0
        _, named_ws, _ = setup(progress=False, model=str(src), cache_dir=str(tmp / "cache"))
        groups = quantizable_groups(ws)
        out["groups"] = len(groups)
        out["float_reasons"] = {k: len(v) for k, v in ws.float_reasons.items()}
        scorer = Scorer(ev, SampleStore(tmp / "cache" / "samples", ev), range(len(ev)))
        every = list(range(len(ev)))

        def score(model):
            return scorer.score(model, model_hash(model), every)

        fp32, int8, named_int8 = score(ws.model), score(ws.build()), score(named_ws.build())
        out["fp32_map"], out["int8_map"], out["named_int8_map"] = (s.value(every) for s in (fp32, int8, named_int8))
        t0 = time.perf_counter()
        sens = run_sensitivity(ws, ev, indices=every[:68], progress=False, budget_seconds=args.sensitivity_budget,
                               scorer=scorer)
        out["sensitivity_s"] = time.perf_counter() - t0
        out["sensitivity_notes"] = sens.notes
        out["proxy_agreement"] = sens.proxy_agreement
        boot = PairedBootstrap(every, 1000, 0)
        top = []
        for g in sens.ranked_groups[:10]:
            s = score(ws.build(ws.base_plan.with_float(groups[g])))
            d = boot.difference(s, int8)
            top.append({"group": g, "map": s.value(every), "vs_int8": [d.value, d.lo, d.hi]})
        out["top10_float"] = top
        t0 = time.perf_counter()
        ws.cfg.cache_dir = str(tmp / "search-cache")
        res = run_search(ws, ev, SearchSettings(budget=args.budget, workdir=str(tmp / "run"), confirm=0,
                                                sensitivity_budget=args.sensitivity_budget), progress=False)
        out["search_s"] = time.perf_counter() - t0 + out["prepare_s"]
        out["search_front"] = res.front
        out["search_stage_s"] = res.stage_seconds
    worst = min(t["map"] - out["int8_map"] for t in top)
    print(f"groups: {out['groups']} (named model: module groups); float regions: {out['float_reasons']}")
    print(f"mAP50-95: FP32 {out['fp32_map']:.4f}, INT8 unnamed {out['int8_map']:.4f}, INT8 named {out['named_int8_map']:.4f}")
    print(f"sensitivity: {out['sensitivity_s']:.0f} s; {sens.notes[0]}; proxy rho {out['proxy_agreement']:.2f}")
    for t in top:
        print(f"  float {t['group'][:60]:60} mAP {t['map']:.4f}  vs all-INT8 {t['vs_int8'][0]:+.4f} "
              f"[{t['vs_int8'][1]:+.4f}, {t['vs_int8'][2]:+.4f}]")
    print(f"worst top-10 group float vs all-INT8: {worst:+.4f} (must be >= -0.005)")
    print(f"search --budget {args.budget}: {out['search_s']:.0f} s including calibration and sensitivity")
    write_results("unnamed", out)


if __name__ == "__main__":
    main()
