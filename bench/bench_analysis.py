"""Per-layer analysis cost on yolov5n: cumulative report and isolated analysis of every Conv on 8 images.

    python bench/bench_analysis.py     # prints a table, writes bench/results/analysis.json
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_quantize import RESULTS, YOLO, yolo_config  # noqa: E402


def main():
    from sensq.analysis import cumulative_report, isolated_report
    from sensq.quantize import prepare

    if not YOLO.is_file():
        sys.exit("shared data not found (set SENSQ_DATA)")
    with tempfile.TemporaryDirectory() as tmp:
        ws = prepare(yolo_config(tmp), progress=False)  # statistics computed once, reused below
        t = time.perf_counter()
        cum = cumulative_report(ws, Path(tmp) / "yolov5n", n_samples=8, progress=False)
        cum_s = time.perf_counter() - t
        iso, iso_s = isolated_report(ws, Path(tmp) / "yolov5n", n_samples=8, progress=False)
        import pandas as pd

        n_layers = len(pd.read_csv(iso["csv"]))
        n_rows = len(pd.read_csv(cum["csv"]))
    res = {"cumulative_s": cum_s, "cumulative_rows": n_rows, "isolated_s": iso_s, "isolated_layers": n_layers, "samples": 8}
    print("Per-layer analysis, yolov5n, 8 calibration images (statistics from the cache, no recalibration)")
    print(f"cumulative report ({n_rows} tensors incl. weights): {cum_s:6.1f} s")
    print(f"isolated analysis ({n_layers} Conv layers, one at a time): {iso_s:6.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "analysis.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
