"""Latency backend benchmark on YOLOv5n: run-to-run stability of the ort backend and the analytic cost.

    python bench/bench_latency.py [--threads 2] [--runs 3] [--no-qdq] [--spin]

Measures the FP32 model `--runs` times with independent ort backends (a new session each time) and reports each
median and spread, plus GBOPs and how long bops() takes (the search calls it once per trial). Unless --no-qdq, it
also quantizes the model to INT8 QDQ (random calibration data: latency does not depend on the ranges) and measures
that too. Prints a table and writes bench/results/latency.json.
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
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()

from sensq.latency import bops, make_latency_backend, quantized_nodes  # noqa: E402


def _qdq_model(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class RandomImages(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{name: rng.random((1, 3, 640, 640), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), RandomImages(), quant_format=QuantFormat.QDQ)
    return dst


def _measure(label: str, path: Path, threads: int, runs: int, spinning: bool | None) -> dict:
    rows = []
    for i in range(runs):
        r = make_latency_backend("ort", threads=threads, spinning=spinning).measure(str(path))  # new backend + session: independent runs
        rows.append({"run": i + 1, "median_ms": r.value, "spread_ms": r.spread, "repeats": r.repeats,
                     "min_ms": r.details["min_ms"], "blocks": r.details["blocks"],
                     "block_agreement": r.details["block_agreement"], "session_create_ms": r.details["session_create_ms"],
                     "measure_seconds": r.details["measure_seconds"], "load_avg_1m": r.details["load_avg_1m"]})
    medians = [row["median_ms"] for row in rows]
    t0 = time.perf_counter()
    total_bops = bops(str(path))
    bops_s = time.perf_counter() - t0
    return {"model": label, "path": str(path), "threads": threads, "spinning": spinning, "runs": rows,
            "median_of_medians_ms": float(np.median(medians)),
            "run_to_run_range_ms": float(max(medians) - min(medians)),
            "run_to_run_range_pct": float(100 * (max(medians) - min(medians)) / np.median(medians)),
            "gbops": total_bops / 1e9, "bops_seconds": round(bops_s, 3),
            "n_quantized_nodes": len(quantized_nodes(str(path)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-qdq", action="store_true", help="skip the INT8 QDQ model")
    ap.add_argument("--spin", action="store_true", help="ort option spinning=true (ORT default; fragile under load)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latency.json")
    args = ap.parse_args()

    model = DATA / "models" / "yolov5n.onnx"
    if not model.is_file():
        print(f"model not found: {model} (set SENSQ_DATA to the shared/data folder)", file=sys.stderr)
        return 2
    spinning = bool(args.spin)
    results = [_measure("yolov5n FP32", model, args.threads, args.runs, spinning)]
    if not args.no_qdq:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(_measure("yolov5n INT8 QDQ", _qdq_model(model, Path(tmp) / "yolov5n.qdq.onnx"),
                                    args.threads, args.runs, spinning))

    print(f"{'model':18} {'run':>3} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'repeats':>7} {'blocks':>6} "
          f"{'load':>5} {'create ms':>9}")
    for res in results:
        for row in res["runs"]:
            print(f"{res['model']:18} {row['run']:>3} {row['median_ms']:>10.2f} {row['spread_ms']:>8.2f} "
                  f"{row['min_ms']:>8.2f} {row['repeats']:>7} {row['blocks']:>6} {row['load_avg_1m']:>5.2f} "
                  f"{row['session_create_ms']:>9.1f}")
        print(f"{res['model']:18} median of medians {res['median_of_medians_ms']:.2f} ms, run-to-run range "
              f"{res['run_to_run_range_ms']:.2f} ms ({res['run_to_run_range_pct']:.1f} %), {res['gbops']:.2f} GBOPs "
              f"(bops() {res['bops_seconds']:.2f} s), {res['n_quantized_nodes']} quantized nodes")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"threads": args.threads, "cpu_count": os.cpu_count(), "results": results}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
