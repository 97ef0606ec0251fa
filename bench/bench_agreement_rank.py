"""Does label-free agreement rank plans as labeled mAP does? A budget-20 yolov5n study (labeled, --confirm 0.5, the
README's split), then every fully scored plan's agreement with FP32 on every shared COCO image that is not a
calibration image of the run; Spearman's rho between the per-plan differences to FP32 under the two metrics, with a
bootstrap interval over plans (2000 resamples). Writes bench/results/agreement_rank.json.

    python bench/bench_agreement_rank.py [--budget 20]
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


def main() -> int:
    from scipy.stats import spearmanr

    from sensq.defaults import setup
    from sensq.evaluators.agreement import make_agreement_evaluator
    from sensq.plan import PrecisionPlan
    from sensq.search import run_search
    from sensq.search.settings import SearchSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=20)
    args = ap.parse_args()
    coco = DATA / "coco"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, ws, labeled = setup(progress=False, model=str(DATA / "models" / "yolov5n.onnx"),
                               calib=[str(coco / "train2017")], data=str(coco), cache_dir=f"{tmp}/cache")
        res = run_search(ws, labeled, SearchSettings(budget=args.budget, workdir=f"{tmp}/w", seed=0, latency="bops",
                                                     confirm=0.5), progress=False)
        fp32_search = res.rows[0]["metric"]
        plans = [r for r in res.records if r.full and r.repeat_of is None and r.source != "sensitivity"]
        calib = [Path(f).resolve() for f in ws.data.sources[0].files[:len(ws.data)]]
        pool = Path(tmp) / "pool"
        pool.mkdir()
        for f in sorted((coco / "val2017").glob("*.jpg")) + sorted((coco / "train2017").glob("*.jpg")):
            (pool / f.name).symlink_to(f)
        agree_ev = make_agreement_evaluator(pool, model=ws.model, reference=ws.model, detector=True, exclude=calib,
                                            preprocess=labeled.preprocess, pixel_cache=f"{tmp}/pixels")
        rows = []
        for r in plans:
            a = agree_ev.evaluate(ws.build(PrecisionPlan.from_dict(r.plan)), progress=False).metrics[agree_ev.primary]
            rows.append({"trial": r.number, "label": r.label, "labeled_d_fp32": r.metric - fp32_search,
                         "agreement": a, "agreement_d_fp32": a - 1.0})
            print(f"trial {r.number:3d}: labeled {r.metric - fp32_search:+.4f}  agreement {a:.4f}", flush=True)
    x = np.array([r["labeled_d_fp32"] for r in rows])
    y = np.array([r["agreement_d_fp32"] for r in rows])
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(2000):
        i = rng.integers(0, len(rows), len(rows))
        if len(set(x[i])) > 1 and len(set(y[i])) > 1:
            boots.append(spearmanr(x[i], y[i]).statistic)
    lo, hi = (float(v) for v in np.percentile(boots, [2.5, 97.5]))
    doc = {"model": "yolov5n", "budget": args.budget, "plans": len(rows), "agreement_images": len(agree_ev),
           "labeled_search_images": res.summary.get("search_samples"),
           "spearman_rho": rho, "rho_lo": lo, "rho_hi": hi, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agreement_rank.json").write_text(json.dumps(doc, indent=1))
    print(f"Spearman rho (labeled mAP50-95 diff vs agreement diff, {len(rows)} plans): {rho:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
