""".pt input against the real Ultralytics package: sensq's cached export of an Ultralytics checkpoint is the graph
Ultralytics' own `export(format="onnx")` writes with the same settings, its FP32 outputs agree on real images, the
float region `sensq quantize` prints (and builds) is the YOLOv8 decode, and an original YOLOv5 checkpoint gives the
one-line error.

Needs the optional extra, so run it with an environment that has ultralytics + torch (not the main one), e.g.:

    python -m venv --system-site-packages /tmp/ultra-venv
    /tmp/ultra-venv/bin/pip install torch==2.13.0                  # the local CPU wheel
    /tmp/ultra-venv/bin/pip install --no-deps ultralytics ultralytics-thop torchvision==0.28.0
    /tmp/ultra-venv/bin/pip install polars ultralytics-platform nvidia-ml-py
    /tmp/ultra-venv/bin/pip install -e . --no-deps
    /tmp/ultra-venv/bin/python bench/bench_pt.py [--images 4]

(`pip install ultralytics` with its dependencies would pull torchvision 0.29 and with it a CUDA torch 2.14; PyPI's
torchvision 0.28 does not import beside the CPU torch, but nothing in the ONNX export imports it.)

Works in a temporary folder: the checkpoints are copied there first (the export cache lands next to the checkpoint;
../shared/data is read in place and checked unchanged). Writes bench/results/pt.json (not committed).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO))

V8_PT = DATA / "models" / "yolov8n-arch-random.pt"
V5_PT = DATA / "models" / "yolov5n.pt"
CALIB = DATA / "coco" / "train2017"
VAL = DATA / "coco" / "val2017"
TOLERANCE = 1e-4


def folder_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def sensq_quantize(model: Path, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "sensq", "quantize", "--model", str(model), "--calib", str(CALIB),
           "--calib-step", "16", "-o", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent, check=False)
    return {"cmd": cmd, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": time.perf_counter() - t}


def ultralytics_export(pt: Path, settings: dict) -> Path:
    from ultralytics import YOLO

    written = YOLO(str(pt)).export(format="onnx", opset=settings["opset"], imgsz=settings["imgsz"],
                                   simplify=settings["simplify"], dynamic=settings["dynamic"])
    return pt.parent / Path(written).name


def ultralytics_load(pt: Path, copy: Path) -> str:
    """What Ultralytics itself does with a checkpoint (the claim in sensq's error): under the name yolov5n.pt it
    swaps in the different, downloadable yolov5nu.pt; under any other name it refuses the file."""
    from ultralytics import YOLO

    shutil.copyfile(pt, copy)
    try:
        YOLO(str(copy))
        return "loaded"
    except Exception as e:  # noqa: BLE001 - recorded, not handled
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240]}"


def graph_summary(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path))

    def shapes(values):
        return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in values}

    inits = {i.name for i in m.graph.initializer}
    return {"ops": [n.op_type for n in m.graph.node], "names": [n.name for n in m.graph.node],
            "op_counts": dict(collections.Counter(n.op_type for n in m.graph.node)),
            "inputs": shapes([i for i in m.graph.input if i.name not in inits]), "outputs": shapes(m.graph.output),
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "initializers": {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer},
            "metadata": {p.key: p.value for p in m.metadata_props}}


def compare_graphs(a: dict, b: dict) -> dict:
    import numpy as np

    same_weights = a["initializers"].keys() == b["initializers"].keys() and all(
        np.array_equal(v, b["initializers"][k]) for k, v in a["initializers"].items())
    meta_keys = sorted(set(a["metadata"]) | set(b["metadata"]))
    return {"nodes": (len(a["ops"]), len(b["ops"])), "same_op_sequence": a["ops"] == b["ops"],
            "same_op_counts": a["op_counts"] == b["op_counts"], "same_node_names": a["names"] == b["names"],
            "inputs": (a["inputs"], b["inputs"]), "outputs": (a["outputs"], b["outputs"]),
            "same_io": a["inputs"] == b["inputs"] and a["outputs"] == b["outputs"], "opset": (a["opset"], b["opset"]),
            "same_weights": same_weights, "n_initializers": len(a["initializers"]),
            "metadata_differs": [k for k in meta_keys if a["metadata"].get(k) != b["metadata"].get(k)]}


def images(n: int) -> list[Path]:
    return sorted(VAL.glob("*.jpg"))[:n]


def compare_outputs(sensq_onnx: Path, ref_onnx: Path, pt: Path, paths: list[Path]) -> dict:
    """Max |sensq - ultralytics| over the images, per part of the 1x84x8400 output (rows 0-3 box in pixels, 4-83
    class probabilities), and against the PyTorch model itself (an independent check of both exports)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    from sensq.preprocess import ImagePreprocess

    prep = ImagePreprocess(640, 640, resize="letterbox", std=[255.0])  # Ultralytics: letterbox, RGB, x/255
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (sensq_onnx, ref_onnx)]
    torch_model = YOLO(str(pt)).model.float().eval()
    worst = {"box": 0.0, "cls": 0.0, "box_scale": 0.0, "cls_scale": 0.0, "torch_box": 0.0, "torch_cls": 0.0}
    for path in paths:
        x = prep.tensor(path)
        ours, ref = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions)
        with torch.no_grad():
            pt_out = torch_model(torch.from_numpy(x))
        pt_out = (pt_out[0] if isinstance(pt_out, (list, tuple)) else pt_out).numpy()
        for part, rows in (("box", slice(0, 4)), ("cls", slice(4, None))):
            worst[part] = max(worst[part], float(np.abs(ours[:, rows] - ref[:, rows]).max()))
            worst[f"{part}_scale"] = max(worst[f"{part}_scale"], float(np.abs(ref[:, rows]).max()))
            worst[f"torch_{part}"] = max(worst[f"torch_{part}"], float(np.abs(ours[:, rows] - pt_out[:, rows]).max()))
    worst["max_abs"] = max(worst["box"], worst["cls"])
    worst["relative"] = {p: worst[p] / worst[f"{p}_scale"] if worst[f"{p}_scale"] else 0.0 for p in ("box", "cls")}
    worst["images"] = [p.name for p in paths]
    return worst


def decode_region_has_no_qdq(fp32_onnx: Path, q_onnx: Path) -> dict:
    """Independent of the printed text: in the INT8 model, no tensor made by a node of the decode (the nodes of the
    FP32 export under /model.22/ that are not in the cv2.* / cv3.* branches: reshapes, DFL, anchors, sigmoid, final
    Concat) goes into a QuantizeLinear. Its first nodes read the branches' dequantized outputs: that is the boundary."""
    import onnx

    fp32 = onnx.load(str(fp32_onnx), load_external_data=False)
    decode = {n.name for n in fp32.graph.node if n.name.startswith("/model.22/")
              and not n.name.startswith(("/model.22/cv2.", "/model.22/cv3."))}
    q = onnx.load(str(q_onnx), load_external_data=False)
    present = [n for n in q.graph.node if n.name in decode]
    made_inside = {o for n in present for o in n.output}
    quantized_inside = sorted({i for n in q.graph.node if n.op_type == "QuantizeLinear" for i in n.input[:1]} & made_inside)
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    boundary = sorted(n.name for n in present if any(i in dq_out for i in n.input))
    return {"decode_nodes": len(decode), "found_in_int8_model": len(present), "quantized_tensors_inside": quantized_inside,
            "boundary_nodes_reading_dq": boundary}


def float_region_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith("kept float")]


def run(n_images: int) -> dict:
    from importlib.metadata import version

    from sensq import pt_export

    settings = pt_export.EXPORT_SETTINGS
    assert settings["imgsz"] == 640 and settings["simplify"] and not settings["dynamic"], settings
    shared_before = folder_state(DATA / "models")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pt-"))
    env = dict(os.environ, SENSQ_CACHE=str(tmp / "sensq-cache"), YOLO_CONFIG_DIR=str(tmp / "ultralytics-config"),
               YOLO_AUTOINSTALL="false", YOLO_OFFLINE="1")
    os.environ.update({k: env[k] for k in ("YOLO_CONFIG_DIR", "YOLO_AUTOINSTALL", "YOLO_OFFLINE")})
    try:
        for sub in ("sensq", "ultralytics", "v5"):
            (tmp / sub).mkdir()
        ours_pt, ref_pt = tmp / "sensq" / V8_PT.name, tmp / "ultralytics" / V8_PT.name
        shutil.copyfile(V8_PT, ours_pt)
        shutil.copyfile(V8_PT, ref_pt)

        quant = sensq_quantize(ours_pt, tmp / "sensq" / "x.q.onnx", env)
        cached = sorted(p for p in ours_pt.parent.glob(f"{ours_pt.stem}.*.onnx") if not p.name.endswith(".q.onnx"))
        expected = ours_pt.parent / f"{ours_pt.stem}.{pt_export.export_key(ours_pt, pt_export.exporter_versions())}.onnx"
        t = time.perf_counter()
        ref_onnx = ultralytics_export(ref_pt, settings)
        ref_seconds = time.perf_counter() - t
        rerun = sensq_quantize(ours_pt, tmp / "sensq" / "x.q.onnx", env)  # cached: no second export

        graphs = compare_graphs(graph_summary(cached[0]), graph_summary(ref_onnx)) if len(cached) == 1 else {}
        outputs = compare_outputs(cached[0], ref_onnx, ref_pt, images(n_images)) if len(cached) == 1 else {}
        region = float_region_lines(quant["stdout"])
        qdq = decode_region_has_no_qdq(cached[0], tmp / "sensq" / "x.q.onnx") if quant["rc"] == 0 else {}

        v5 = sensq_quantize(V5_PT, tmp / "v5" / "y.q.onnx", env)
        v5_lines = v5["stderr"].strip().splitlines()
        v5_ultralytics = {name: ultralytics_load(V5_PT, tmp / "v5" / name) for name in (V5_PT.name, "original-v5.pt")}
        shared_after = folder_state(DATA / "models")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return {
        "versions": {name: version(name) for name in ("ultralytics", "torch", "onnx", "onnxslim", "onnxruntime")},
        "python": sys.version.split()[0], "export_settings": settings,
        "quantize": {"rc": quant["rc"], "seconds": round(quant["seconds"], 1), "stderr_tail": quant["stderr"][-2000:],
                     "stdout": quant["stdout"]},
        "export_log": [line for line in quant["stderr"].splitlines() if "exporting" in line],
        "ultralytics_page_in_output": "Export complete" in quant["stdout"] + quant["stderr"],
        "cache": {"files": [p.name for p in cached], "expected": expected.name, "key_matches": [expected] == cached,
                  "second_run_rc": rerun["rc"], "second_run_seconds": round(rerun["seconds"], 1),
                  "second_run_exported_again": "exporting" in rerun["stderr"]},
        "ultralytics_export_seconds": round(ref_seconds, 1),
        "graph": graphs, "outputs": outputs, "float_region": region, "decode_qdq": qdq,
        "yolov5": {"rc": v5["rc"], "stderr_lines": v5_lines, "ultralytics_itself": v5_ultralytics},
        "shared_data_unchanged": shared_before == shared_after,
    }


def verdicts(r: dict) -> dict[str, bool]:
    g, o, v5 = r["graph"], r["outputs"], r["yolov5"]
    return {
        "sensq quantize on the .pt exits 0": r["quantize"]["rc"] == 0,
        "one cached export next to the checkpoint, named by the key": r["cache"]["key_matches"],
        "second run uses the cache": r["cache"]["second_run_rc"] == 0 and not r["cache"]["second_run_exported_again"],
        "same node count and op types (in order)": bool(g) and g["same_op_sequence"] and g["same_op_counts"],
        "same input/output names and shapes": bool(g) and g["same_io"],
        f"FP32 outputs agree within {TOLERANCE:g}": bool(o) and o["max_abs"] <= TOLERANCE,
        "printed float region is the v8 decode": len(r["float_region"]) == 1 and "Detect decode" in r["float_region"][0]
        and "/model.22/cv2.*" in r["float_region"][0] and "/model.22/cv3.*" in r["float_region"][0],
        "no tensor inside the decode is quantized": bool(r["decode_qdq"]) and r["decode_qdq"]["found_in_int8_model"] > 0
        and not r["decode_qdq"]["quantized_tensors_inside"],
        "yolov5n.pt: one-line error, exit 2": v5["rc"] == 2 and len(v5["stderr_lines"]) == 1
        and v5["stderr_lines"][0].startswith("sensq: error:") and "original YOLOv5 checkpoint" in v5["stderr_lines"][0]
        and "ultralytics package does not load" in v5["stderr_lines"][0],
        "Ultralytics' export page not in sensq's output": not r["ultralytics_page_in_output"],
        "../shared/data unchanged": r["shared_data_unchanged"],
    }


def report(r: dict) -> None:
    g, o = r["graph"], r["outputs"]
    print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f", python {r['python']}")
    print(f"export settings: {r['export_settings']}")
    print(f"sensq quantize: rc {r['quantize']['rc']}, {r['quantize']['seconds']} s (export + calibration 16 + build "
          f"+ report); cached export {r['cache']['files']}; rerun {r['cache']['second_run_seconds']} s")
    if g:
        print(f"\n{'':10}{'sensq (cached export)':>32}{'ultralytics export':>32}")
        print(f"{'nodes':10}{g['nodes'][0]:>32}{g['nodes'][1]:>32}")
        for name, (a, b) in (("inputs", g["inputs"]), ("outputs", g["outputs"]), ("opset", g["opset"])):
            print(f"{name:10}{json.dumps(a):>32}{json.dumps(b):>32}")
        print(f"same op sequence / counts / node names / weights: {g['same_op_sequence']} / {g['same_op_counts']} / "
              f"{g['same_node_names']} / {g['same_weights']} ({g['n_initializers']} initializers); "
              f"metadata keys that differ: {g['metadata_differs']}")
    if o:
        print(f"\nFP32 on {len(o['images'])} val2017 images: max |sensq - ultralytics| box {o['box']:.3g} "
              f"(scale {o['box_scale']:.3g}, relative {o['relative']['box']:.3g}), cls {o['cls']:.3g} "
              f"(scale {o['cls_scale']:.3g}, relative {o['relative']['cls']:.3g}); vs PyTorch forward: box "
              f"{o['torch_box']:.3g}, cls {o['torch_cls']:.3g}")
    print(f"export log: {r['export_log']}")
    print(f"float region printed: {r['float_region']}")
    print(f"decode in the INT8 model: {r['decode_qdq']}")
    print(f"yolov5n.pt: rc {r['yolov5']['rc']}: {r['yolov5']['stderr_lines']}")
    for name, what in r["yolov5"]["ultralytics_itself"].items():
        print(f"  Ultralytics itself on it as {name}: {what}")
    print()
    for what, ok in r["verdicts"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="val2017 images for the FP32 comparison")
    args = p.parse_args()
    r = run(args.images)
    r["verdicts"] = verdicts(r)
    report(r)
    out = REPO / "bench" / "results" / "pt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2, default=str), encoding="utf-8")
    print(f"\nwrote {out}")
    return 0 if all(r["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
