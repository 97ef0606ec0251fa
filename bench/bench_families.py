"""The 2026 Ultralytics families through the CLI, exactly as a user types it (issue 10 acceptance).

    python bench/bench_families.py [--budget 4]

For yolo11n, yolo26n (default export, 1x84x8400) and yolo26n-e2e (end-to-end, 1x300x6), all structure-only
(random weights: metrics are meaningless here, the point is that every step runs and what stays float):
  sensq quantize   exit code, wall time, the printed float region, and no Q/DQ on any tensor of that region
  sensq search --budget N --latency bops   exit code, wall time, distinct plans
Writes bench/results/families.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_search import DATA, write_results  # noqa: E402

MODELS = ("yolo11n-arch-random", "yolo26n-arch-random", "yolo26n-e2e-arch-random")


def sensq(*args: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sensq", *args], capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t0, p.stdout + p.stderr


def quantized_tensors_in(qmodel: Path, float_nodes: list[str], reference: onnx.ModelProto) -> list[str]:
    """Tensors produced by the float region's nodes (in the float model) that a Q/DQ reads in the INT8 model."""
    produced = {o for n in reference.graph.node if n.name in set(float_nodes) for o in n.output}
    q = onnx.load(str(qmodel))
    read_by_qdq = {n.input[0] for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    return sorted(produced & read_by_qdq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=4)
    args = ap.parse_args()
    from sensq.defaults import setup

    coco = DATA / "coco"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model = DATA / "models" / f"{name}.onnx"
            if not model.is_file():
                sys.exit(f"shared data not found: {model} (set SENSQ_DATA)")
            qpath = Path(tmp) / f"{name}.q.onnx"
            rc_q, t_q, log_q = sensq("quantize", "--model", str(model), "--calib", str(coco / "train2017"),
                                     "--calib-step", "10", "-o", str(qpath), "--cache-dir", f"{tmp}/cache")
            region = [line.strip() for line in log_q.splitlines() if "kept float" in line]
            _, ws, _ = setup(progress=False, model=str(model), calib=[str(coco / "train2017")], calib_step=10,
                             cache_dir=f"{tmp}/cache")
            leaks = quantized_tensors_in(qpath, list(ws.base_plan.float_nodes), ws.model) if rc_q == 0 else None
            rc_s, t_s, log_s = sensq("search", "--model", str(model), "--data", str(coco), "--budget", str(args.budget),
                                     "--latency", "bops", "--workdir", f"{tmp}/{name}-run", "--cache-dir", f"{tmp}/cache",
                                     "--sensitivity-budget", "60", "-q")
            out[name] = {"quantize_rc": rc_q, "quantize_s": t_q, "float_region": region,
                         "float_nodes": len(ws.base_plan.float_nodes), "qdq_on_float_region": leaks,
                         "search_rc": rc_s, "search_s": t_s,
                         "search_tail": log_s.strip().splitlines()[-3:] if log_s.strip() else []}
            print(f"{name}: quantize rc {rc_q} in {t_q:.0f} s, {len(ws.base_plan.float_nodes)} float nodes, "
                  f"Q/DQ on them: {leaks}; search --budget {args.budget} rc {rc_s} in {t_s:.0f} s", flush=True)
            for line in region:
                print(f"    {line[:200]}")
    write_results("families", out)


if __name__ == "__main__":
    main()
