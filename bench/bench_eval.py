"""Evaluator overhead: wall time of evaluate() (second call, inputs cached) vs pure ONNX Runtime inference.

    python bench/bench_eval.py [--repeats 3] [--only yolov5n|efficientnet_lite0]

Pure inference = the summed time of session.run over the evaluator's own cached inputs, normalised beforehand,
with the same batch size. The target is ratio = eval wall / pure inference <= 1.3. Each repeat measures pure
inference and evaluation back to back; the ratio uses the best run of each (least disturbed by other processes),
ratio_median the medians.
Writes bench/results/eval.json. Shared data: SENSQ_DATA (default <repo>/../shared/data).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO))

from sensq.evaluators import make_evaluator  # noqa: E402
from sensq.runtime import DEFAULT_THREADS, make_session  # noqa: E402

CASES = {
    "yolov5n": dict(model=DATA / "models" / "yolov5n.onnx", data=DATA / "coco", kind="coco", options={}),
    "efficientnet_lite0": dict(model=DATA / "imagenet" / "efficientnet_lite0.onnx", data=DATA / "imagenet",
                               kind="imagenet", options=dict(skip=100, mean=[127.0], std=[128.0])),
}


def pure_inference_seconds(ev, session, batch_size: int) -> float:
    """sum of session.run times over the evaluator's stored preprocessed inputs (reading and normalisation are
    done outside the timer)."""
    inp = session.get_inputs()[0]
    total = 0.0
    for _, pixels, _ in ev.store.batches(range(len(ev)), batch_size):
        x = ev.preprocessor.normalize(pixels)
        t = time.perf_counter()
        session.run(None, {inp.name: x})
        total += time.perf_counter() - t
    return total


def bench_case(name: str, case: dict, repeats: int) -> dict:
    ev = make_evaluator(str(case["data"]), kind=case["kind"], model=str(case["model"]), **case["options"])
    session = make_session(str(case["model"]))
    t = time.perf_counter()
    first = ev.evaluate(session, progress=False)  # fills the preprocessing cache
    first_seconds = time.perf_counter() - t
    bs = first.extra.get("batch_size", 1)
    pure, wall, infer = [], [], []
    for _ in range(repeats):
        pure.append(pure_inference_seconds(ev, session, bs))
        r = ev.evaluate(session, progress=False)
        wall.append(r.seconds)
        infer.append(r.inference_seconds)
    # Best-of-runs is the estimate least disturbed by other processes; the median ratio is kept for reference.
    pure_s, wall_s = min(pure), min(wall)
    return {"model": case["model"].name, "kind": case["kind"], "n_samples": r.n_samples, "batch_size": bs,
            "metric": r.primary, "value": round(r.value, 5), "metrics": {k: round(v, 5) for k, v in r.metrics.items()},
            "first_call_seconds": round(first_seconds, 3), "pure_inference_seconds": round(pure_s, 3),
            "eval_seconds": round(wall_s, 3), "eval_inference_seconds": round(min(infer), 3),
            "ratio": round(wall_s / pure_s, 3), "ratio_median": round(statistics.median(wall) / statistics.median(pure), 3),
            "runs": {"pure": [round(v, 3) for v in pure], "eval": [round(v, 3) for v in wall]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=sorted(CASES))
    args = ap.parse_args()
    missing = [str(c["model"]) for c in CASES.values() if not c["model"].is_file()]
    if missing:
        sys.exit(f"shared data not found ({missing[0]}); set SENSQ_DATA to the shared/data folder")
    load_before = os.getloadavg()[0]
    results = {n: bench_case(n, c, args.repeats) for n, c in CASES.items() if args.only in (None, n)}
    print(f"{'model':<20}{'n':>5}{'metric':>10}{'value':>9}{'1st call s':>12}{'pure ORT s':>12}{'eval s':>9}{'ratio':>7}{'median':>8}")
    for name, r in results.items():
        print(f"{name:<20}{r['n_samples']:>5}{r['metric']:>10}{r['value']:>9.4f}{r['first_call_seconds']:>12.2f}"
              f"{r['pure_inference_seconds']:>12.2f}{r['eval_seconds']:>9.2f}{r['ratio']:>7.2f}{r['ratio_median']:>8.2f}")
    out = REPO / "bench" / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"onnxruntime": ort.__version__, "threads": DEFAULT_THREADS, "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0]}
    out.write_text(json.dumps({"env": env, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
