"""A16W8 on YOLOX-Nano (issue 19): mAP50-95 of `sensq quantize --activation-type int16` against FP32, and the paired
latency ratio to FP32 on ORT CPU and OpenVINO CPU. A few minutes; prints, writes nothing in the repo.

    python bench/measure_a16w8.py [--data ../shared/data] [--out /tmp/a16w8]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from sensq.latency import Reference, make_latency_backend, measure_paired


def sensq(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "sensq", *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/a16w8")
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    data, out = Path(a.data), Path(a.out)
    fp32 = data / "models" / "yolox_nano.onnx"
    models = {"fp32": fp32}
    for name, extra in (("int8", []), ("a16w8", ["--activation-type", "int16"])):
        models[name] = out / f"yolox_{name}.q.onnx"
        sensq("quantize", "-q", "--no-analysis", "--model", str(fp32), "--calib", str(data / "coco" / "train2017"),
              "-o", str(models[name]), *extra)
    for name, path in models.items():
        metric = next(line for line in sensq("eval", "-q", "-m", str(path), "--data", str(data / "coco")).splitlines()
                      if line.startswith("mAP50-95"))
        print(f"{name}: {metric}")
    for spec in ("ort", "openvino"):
        backend = make_latency_backend(spec)
        ref = Reference(backend, str(fp32))
        for name in ("int8", "a16w8"):
            p = measure_paired(backend, str(models[name]), ref, rounds=a.rounds, runs=5)
            print(f"{spec} {name}/fp32 latency ratio {p.ratio:.2f} [{p.ratio_ci[0]:.2f}, {p.ratio_ci[1]:.2f}] "
                  f"({p.value:.1f} vs {p.ref_value:.1f} {p.unit})")


if __name__ == "__main__":
    main()
