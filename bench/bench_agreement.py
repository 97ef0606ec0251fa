"""How much tighter label-free agreement makes the comparison a search rests on: the paired 95 % interval of
all-INT8's difference to FP32 on yolov5n, under agreement with FP32 (every shared COCO image that is not a
calibration image of the run, no labels read) vs under labeled mAP50-95 on the search split (the 103 val2017
images the CLI's default split searches on).

    python bench/bench_agreement.py

Also reported: agreement on exactly the 103 search-split images (same images, different metric), so the gain
from the metric and the gain from more images are told apart; agreement at IoU 0.5 only (agreement50); and each
width relative to the size of the difference (the metrics have different scales). Writes bench/results/agreement_bench.json.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
N_BOOT, SEED = 1000, 0


def _interval(boot, a, b) -> dict:
    """a - b with its paired interval; width relative to |a - b| too (metrics on different scales)."""
    d = boot.difference(a, b)
    return {"d_int8_fp32": d.value, "lo": d.lo, "hi": d.hi, "width": d.hi - d.lo, "n": int(len(boot.indices)),
            "width_over_abs_d": (d.hi - d.lo) / abs(d.value) if d.value else float("inf")}


def main() -> int:
    from sensq.defaults import setup
    from sensq.evaluators.agreement import make_agreement_evaluator
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.search.splits import make_split

    coco = DATA / "coco"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, ws, labeled = setup(progress=False, model=str(DATA / "models" / "yolov5n.onnx"),
                               calib=[str(coco / "train2017")], data=str(coco), cache_dir=f"{tmp}/cache")
        calib = [Path(f).resolve() for f in ws.data.sources[0].files[:len(ws.data)]]
        pool = Path(tmp) / "pool"
        pool.mkdir()
        for f in sorted((coco / "val2017").glob("*.jpg")) + sorted((coco / "train2017").glob("*.jpg")):
            (pool / f.name).symlink_to(f)
        int8 = ws.build()
        split = make_split(len(labeled), 0.5, None, SEED)  # the README's --confirm 0.5: 103 search images
        lab = [labeled.evaluate(m, indices=split.search, progress=False).samples for m in (ws.model, int8)]
        agree_ev = make_agreement_evaluator(pool, model=ws.model, reference=ws.model, detector=True, exclude=calib,
                                            preprocess=labeled.preprocess, pixel_cache=f"{tmp}/pixels")
        agree = [agree_ev.evaluate(m, progress=False).samples for m in (ws.model, int8)]
        pos = {f.name: i for i, f in enumerate(agree_ev.data.files)}
        same = np.array([pos[labeled.data.files[i].name] for i in split.search])
        rows = {"labeled_mAP50-95_search_split": _interval(PairedBootstrap(split.search, N_BOOT, SEED), *lab[::-1]),
                "agreement_all_non_calibration": _interval(PairedBootstrap(np.arange(len(agree_ev)), N_BOOT, SEED), *agree[::-1]),
                "agreement_same_103_images": _interval(PairedBootstrap(same, N_BOOT, SEED), *agree[::-1])}
        at50 = [replace(x, primary="agreement50") for x in agree]  # the same matching, IoU 0.5 only
        rows["agreement50_all_non_calibration"] = _interval(PairedBootstrap(np.arange(len(agree_ev)), N_BOOT, SEED), *at50[::-1])
    base = rows["labeled_mAP50-95_search_split"]["width"]
    for r in rows.values():
        r["narrower_than_labeled_x"] = base / r["width"] if r["width"] > 0 else float("inf")
    doc = {"model": "yolov5n", "calibration_images": len(calib), "agreement_images": len(agree_ev),
           "pseudo_gt_conf": agree_ev.conf_gt, "pseudo_gt_boxes": int(len(agree_ev.data.gt.img)),
           "n_boot": N_BOOT, "seed": SEED, "seconds": round(time.perf_counter() - t0, 1), "intervals": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agreement_bench.json").write_text(json.dumps(doc, indent=2))
    for k, r in rows.items():
        print(f"{k:34s} n={r['n']:4d}  d={r['d_int8_fp32']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]  width {r['width']:.4f}"
              f"  ({r['narrower_than_labeled_x']:.2f}x narrower than labeled; width/|d| {r['width_over_abs_d']:.3f})")
    print(f"wrote {RESULTS / 'agreement_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
