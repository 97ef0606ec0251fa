"""Quantizer benchmarks on the shared data: calibration cost, plan rebuild time, accuracy of every range method.

    python bench/bench_quantize.py [--part calib|build|accuracy|all]

Prints tables and writes bench/results/quantize.json. Calibration runs in a fresh subprocess so its peak RSS is
its own. Timings depend on what else runs on the machine; run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()
RESULTS = REPO / "bench" / "results"
YOLO = DATA / "models" / "yolov5n.onnx"
COCO = DATA / "coco"
IMNET = DATA / "imagenet"


def yolo_config(cache: str, step: int = 200):
    from sensq.config import InputParams, QuantizeConfig

    return QuantizeConfig(onnx_model=str(YOLO), calibration_step=step, cache_dir=cache,
                          inputs=[InputParams(data_list_path=str(COCO / "train2017"))])


def effnet_config(cache: str):
    from sensq.config import InputParams, QuantizeConfig

    return QuantizeConfig(onnx_model=str(IMNET / "efficientnet_lite0.onnx"), calibration_step=100, cache_dir=cache,
                          inputs=[InputParams(data_list_path=str(IMNET / "images"), preprocess_file="IMAGENET",
                                              mean_value=[127] * 3, std_value=[128] * 3, color_format="rgb")])


# ------------------------------------------------------------------------------------------------ calibration
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from bench.bench_quantize import yolo_config
mode = {mode!r}
cfg = yolo_config({cache!r})
if mode == "calibrate":
    from sensq.quantize import prepare
    t = time.perf_counter(); ws = prepare(cfg, progress=False); wall = time.perf_counter() - t
    out = {{"wall_s": wall, "calibration_s": ws.calibration_seconds, "cached": ws.stats_cached, "tensors": len(ws.stats.tensors)}}
else:
    from sensq.data import build_calibration_data
    from sensq.model import load_model
    from sensq.runtime import make_session
    model = load_model(cfg.model_path)
    data = build_calibration_data(cfg, model, yolo=True)
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    t = time.perf_counter(); infer = 0.0
    for feed in data:
        t1 = time.perf_counter(); sess.run(names, feed); infer += time.perf_counter() - t1
    wall = time.perf_counter() - t
    out = {{"wall_s": wall, "inference_s": infer}}
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_child(mode: str, cache: str) -> dict:
    code = CHILD.format(repo=str(REPO), mode=mode, cache=cache)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_calibration() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        plain = run_child("plain", cache)
        calib = run_child("calibrate", cache)
        again = run_child("calibrate", cache)
    res = {
        "images": 200, "plain_fp32_wall_s": plain["wall_s"], "plain_fp32_inference_s": plain["inference_s"],
        "calibration_wall_s": calib["calibration_s"], "calibration_peak_rss_mb": calib["peak_rss_mb"],
        "plain_peak_rss_mb": plain["peak_rss_mb"],
        "ratio_vs_plain_wall": calib["calibration_s"] / plain["wall_s"],
        "ratio_vs_pure_inference": calib["calibration_s"] / plain["inference_s"],
        "second_run_cached": again["cached"], "second_run_wall_s": again["wall_s"],
    }
    print("\nCalibration, yolov5n, 200 images at 640 (one pass: min/max + histograms of every activation)")
    print(f"{'':38}{'wall s':>10}{'peak RSS MB':>14}")
    print(f"{'plain FP32 (read+preprocess+infer)':38}{plain['wall_s']:>10.1f}{plain['peak_rss_mb']:>14.0f}")
    print(f"{'  of which inference':38}{plain['inference_s']:>10.1f}")
    print(f"{'sensq calibration':38}{calib['calibration_s']:>10.1f}{calib['peak_rss_mb']:>14.0f}")
    print(f"{'second run (statistics cache hit)':38}{again['wall_s']:>10.1f}   cached={again['cached']}")
    print(f"ratio calibration / plain FP32 pass: {res['ratio_vs_plain_wall']:.2f}x "
          f"(/ pure inference: {res['ratio_vs_pure_inference']:.2f}x)")
    return res


# ------------------------------------------------------------------------------------------------ plan builds
def bench_build(cache: str) -> dict:
    from sensq.quantize import prepare
    from sensq.sensitivity import quantizable_groups

    ws = prepare(yolo_config(cache), progress=False)
    groups = list(quantizable_groups(ws).values())
    methods = ["default", "minmax", "percentile", "mse", "kl"]
    plans = []
    for i in range(20):
        floats = [n for j, g in enumerate(groups) if (i >> (j % 5)) & 1 and j % 3 == i % 3 for n in g]
        plans.append(ws.base_plan.with_float(floats, method=methods[i % 5], percentile=99.9 + 0.0049 * i,
                                             per_channel=i % 4 != 3))
    ws.build(plans[0])  # first build computes per-weight parameters once
    times = []
    for p in plans:
        t = time.perf_counter()
        ws.build(p)
        times.append(time.perf_counter() - t)
    res = {"plans": len(plans), "median_s": statistics.median(times), "max_s": max(times), "min_s": min(times)}
    print(f"\nQDQ build from cached statistics, yolov5n, {len(plans)} plans (different float sets, methods, percentiles):")
    print(f"median {res['median_s']:.2f} s, min {res['min_s']:.2f} s, max {res['max_s']:.2f} s "
          "(max includes the first use of a method: kl/mse ranges are computed once, then memoised)")
    return res


# ------------------------------------------------------------------------------------------------ accuracy
def bench_accuracy(cache: str) -> dict:
    from sensq.evaluators import make_evaluator
    from sensq.latency import Reference, make_latency_backend, measure_paired
    from sensq.quantize import prepare
    from sensq.targets import get_target

    lat = make_latency_backend("ort")
    out = {}
    setups = {
        "yolov5n": (yolo_config(cache), make_evaluator(str(COCO), model=str(YOLO))),
        "efficientnet_lite0": (effnet_config(cache), make_evaluator(str(IMNET), model=str(IMNET / "efficientnet_lite0.onnx"),
                                                                   labels=str(IMNET / "images_labels.tsv"), skip=100,
                                                                   mean=[127] * 3, std=[128] * 3)),
    }
    variants = [("default", {}), ("minmax", {"method": "minmax"}), ("percentile 99.99", {"method": "percentile", "percentile": 99.99}),
                ("percentile 99.999", {"method": "percentile", "percentile": 99.999}), ("kl", {"method": "kl"}),
                ("mse", {"method": "mse"}), ("default, overflow_fix=first_layer", {"overflow_fix": "first_layer"}),
                ("default, overflow_fix=all", {"overflow_fix": "all"}),
                ("default, overflow_fix=none", {"overflow_fix": "none"}), ("default, per-tensor weights", {"per_channel": False})]
    for name, (cfg, ev) in setups.items():
        ws = prepare(cfg, progress=False)
        plan = ws.base_plan
        default_fix = plan.overflow_fix or get_target(plan.target, plan.activation_type).overflow_fix
        ref = Reference(lat, ws.model)  # every variant timed paired with FP32 (ratio with its 95 % interval)
        rows = {"FP32": {"metric": ev.evaluate(ws.model, progress=False).value, "ratio": 1.0, "ratio_ci": [1.0, 1.0]}}
        for label, change in variants:
            q = ws.build(ws.base_plan.with_float([], **change))
            p = measure_paired(lat, q, ref)
            rows[label] = {"metric": ev.evaluate(q, progress=False).value, "ratio": p.ratio, "ratio_ci": list(p.ratio_ci),
                           "ms": p.value, "ms_iqr": p.value_iqr, "fp32_ms_same_rounds": p.ref_value,
                           "overflow_fix": change.get("overflow_fix", default_fix)}
        out[name] = {"metric_name": ev.primary, "rows": rows, "default_overflow_fix": default_fix}
        print(f"\n{name}: {ev.primary} ({len(ev)} samples); ORT CPU latency (2 threads) paired with FP32 "
              f"(default overflow fix on this CPU: {default_fix})")
        print(f"{'':36}{ev.primary:>10}  latency x FP32 [95% CI]")
        for label, r in rows.items():
            print(f"{label:36}{r['metric']:>10.4f}  {r['ratio']:.3f} [{r['ratio_ci'][0]:.3f}, {r['ratio_ci'][1]:.3f}]")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["calib", "build", "accuracy", "all"], default="all")
    args = ap.parse_args()
    if not YOLO.is_file():
        sys.exit(f"shared data not found at {DATA} (set SENSQ_DATA)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "quantize.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as cache:
        if args.part in ("calib", "all"):
            results["calibration"] = bench_calibration()
        if args.part in ("build", "all"):
            results["build"] = bench_build(cache)
        if args.part in ("accuracy", "all"):
            results["accuracy"] = bench_accuracy(cache)
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
