"""Does label-free agreement rank plans as the labeled metric does? Per model, a budget-20 study (labeled,
--confirm 0.5, the README's split, --latency bops), then every fully scored plan's agreement with FP32 on every
shared image of its kind that is not a calibration image of the run (COCO: val2017 + train2017; ImageNet: the 500
images); Spearman's rho between the per-plan differences to FP32 under the two metrics, with a bootstrap interval
over plans (2000 resamples). Writes bench/results/agreement_rank.json (one entry per model, per-plan rows).

    python bench/bench_agreement_rank.py [--budget 20] [--models yolov5n yolox_nano efficientnet]
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


MODELS = {  # model, calibration, labeled data, setup options, the pool agreement is measured on, detector
    "yolov5n": ("models/yolov5n.onnx", ["coco/train2017"], "coco", {}, ["coco/val2017", "coco/train2017"], True),
    "yolox_nano": ("models/yolox_nano.onnx", ["coco/train2017"], "coco", {}, ["coco/val2017", "coco/train2017"], True),
    "efficientnet": ("imagenet/efficientnet_lite0.onnx", [str(REPO / "examples" / "calib_list_imagenet.txt")], "imagenet",
                     {"skip": 100, "labels": "imagenet/images_labels.tsv"}, ["imagenet/images"], False),
}


def rank_one(name: str, budget: int, tmp: Path) -> dict:
    from scipy.stats import spearmanr

    from sensq.defaults import setup
    from sensq.evaluators.agreement import make_agreement_evaluator
    from sensq.plan import PrecisionPlan
    from sensq.search import run_search
    from sensq.search.settings import SearchSettings

    model, calib, data, opts, pools, detector = MODELS[name]
    opts = {k: str(DATA / v) if k == "labels" else v for k, v in opts.items()}
    t0 = time.perf_counter()
    _, ws, labeled = setup(progress=False, model=str(DATA / model), calib=[c if c.startswith("/") else str(DATA / c) for c in calib],
                           data=str(DATA / data), cache_dir=f"{tmp}/cache", **opts)
    res = run_search(ws, labeled, SearchSettings(budget=budget, workdir=f"{tmp}/w", seed=0, latency="bops",
                                                 confirm=0.5), progress=False)
    fp32_search = res.rows[0]["metric"]
    plans = [r for r in res.records if r.full and r.repeat_of is None and r.source != "sensitivity"]
    sources = ws.data.sources[0]
    calib_files = [Path(f).resolve() for f in sources.files[:len(ws.data)]]
    pool = tmp / "pool"
    pool.mkdir()
    for folder in pools:
        for f in sorted((DATA / folder).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png") and not (pool / f.name).exists():
                (pool / f.name).symlink_to(f)
    preprocess = labeled.preprocess if detector else sources.image
    agree_ev = make_agreement_evaluator(pool, model=ws.model, reference=ws.model, detector=detector, exclude=calib_files,
                                        preprocess=preprocess, pixel_cache=f"{tmp}/pixels")
    rows = []
    for r in plans:
        a = agree_ev.evaluate(ws.build(PrecisionPlan.from_dict(r.plan)), progress=False).metrics[agree_ev.primary]
        rows.append({"trial": r.number, "label": r.label, "labeled_d_fp32": r.metric - fp32_search,
                     "agreement": a, "agreement_d_fp32": a - 1.0})
        print(f"{name} trial {r.number:3d}: labeled {r.metric - fp32_search:+.4f}  agreement {a:.4f}", flush=True)
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
    return {"model": name, "budget": budget, "plans": len(rows), "agreement_metric": agree_ev.primary,
            "agreement_images": len(agree_ev), "labeled_metric": res.summary["metric_name"],
            "labeled_search_images": res.summary.get("search_samples"), "spearman_rho": rho, "rho_lo": lo, "rho_hi": hi,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    out = RESULTS / "agreement_rank.json"
    docs = json.loads(out.read_text()) if out.is_file() else {}
    if "models" not in docs:  # an older single-model file: kept as that model's entry
        docs = {"models": {docs["model"]: docs} if docs else {}}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            docs["models"][name] = rank_one(name, args.budget, Path(tmp))
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(docs, indent=1))
    print(f"\n{'model':<13} {'plans':>5} {'agreement images':>16} {'labeled images':>14}  Spearman rho [95 %]")
    for name, d in docs["models"].items():
        print(f"{name:<13} {d['plans']:>5} {d['agreement_images']:>16} {d['labeled_search_images']:>14}  "
              f"{d['spearman_rho']:+.3f} [{d['rho_lo']:+.3f}, {d['rho_hi']:+.3f}]")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
