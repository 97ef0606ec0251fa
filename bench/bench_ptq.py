"""PTQ side by side with peers, on the shared data, the same calibration images for everyone.

    python bench/bench_ptq.py [--models yolov5n yolox_nano efficientnet] [--rounds 10] [--calib 100] [--only fp16 ...]

Rows per model: FP32; sensq default (run by ORT); sensq with each placement and each technique alone (fast bias
correction, MSE weight clipping, MSE activation ranges, cross-layer equalization) and combined;
sensq --target openvino-cpu run by
OpenVINO; NNCF 3.x defaults on the ONNX model (opset 13) run by ORT, and on the OpenVINO model run by OpenVINO;
onnxruntime quantize_static (MinMax, per-channel, QDQ) run by ORT. Columns: metric, its paired 95 % interval of the
difference to FP32 on the same runtime's samples (BCa bootstrap over images, as the search), and the latency ratio to
FP32 on the runtime that scored it, from interleaved rounds in this run (median of per-round ratios, IQR).

FP16 rows: every node of the float model in float16 (sensq's fp16 islands), run by ORT and by OpenVINO (f32 inference
precision: what it does with float16 weights). --only keeps the rows whose label contains one of the words (the FP32
rows and the sensq default are always kept: the references).

Calibration inputs are sensq's own preprocessed samples (ws.samples), handed to NNCF and ORT as the same arrays.
Prints a table and writes bench/results/ptq.json (ptq_<models>.json for a subset; raw per-row values). Peers are bench extras: pip install nncf openvino.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()
RESULTS = REPO / "bench" / "results"
MODELS = {
    "yolov5n": (DATA / "models" / "yolov5n.onnx", [DATA / "coco" / "train2017"], DATA / "coco", {}),
    "yolox_nano": (DATA / "models" / "yolox_nano.onnx", [DATA / "coco" / "train2017"], DATA / "coco", {}),
    "efficientnet": (DATA / "imagenet" / "efficientnet_lite0.onnx", [REPO / "examples" / "calib_list_imagenet.txt"],
                     DATA / "imagenet", {"skip": 100, "labels": str(DATA / "imagenet" / "images_labels.tsv")}),
}


class OVModelSession:
    """An OpenVINO compiled model with the session interface the evaluators use (for NNCF's OV output)."""

    def __init__(self, ov_model, proto, threads: int = 2):
        import openvino as ov

        self.compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                                 "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()
        self.model_proto = proto
        self._in = [SimpleNamespace(name=p.get_any_name(), shape=[d.get_length() for d in p.get_partial_shape()],
                                    type="tensor(float)") for p in self.compiled.inputs]
        self._out = [SimpleNamespace(name=p.get_any_name()) for p in self.compiled.outputs]

    def get_inputs(self):
        return self._in

    def get_outputs(self):
        return self._out

    def get_modelmeta(self):
        return SimpleNamespace(custom_metadata_map={p.key: p.value for p in self.model_proto.metadata_props})

    def run(self, names, feeds):
        res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.array(res[self.compiled.output(n)]) for n in (names or [o.name for o in self._out])]


def nncf_onnx(fp32, feeds):
    import nncf
    import onnx
    from onnx import version_converter

    m = version_converter.convert_version(fp32, 13) if fp32.opset_import[0].version < 13 else fp32
    return nncf.quantize(m, nncf.Dataset(feeds), subset_size=len(feeds))


def nncf_openvino(path, feeds):
    import nncf
    import openvino as ov

    return nncf.quantize(ov.convert_model(str(path)), nncf.Dataset(feeds), subset_size=len(feeds))


def ort_static(fp32, feeds, tmp: Path):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp / "fp32.onnx", tmp / "ort_static.onnx"
    onnx.save(fp32, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(dst))


def ort_session(model):
    from sensq.runtime import make_session

    return make_session(model, threads=2)


def ov_session(model):
    from sensq.runtime_openvino import openvino_session

    return openvino_session(model, threads=2)


def time_rounds(sessions: dict, feed: dict, rounds: int, runs: int = 5) -> dict:
    """Interleaved rounds: each round times every session (median of `runs`); ratios to that round's FP32."""
    per = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            name = s.get_inputs()[0].name
            s.run(None, {name: feed})
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {name: feed})
                ts.append(time.perf_counter() - t)
            per[k].append(float(np.median(ts)))
    return per


def int8_head(ws):
    """The default plan with the detector's head layers INT8 (--head-layers int8; sensq's default before them)."""
    from sensq.plan import PrecisionPlan

    return PrecisionPlan.from_dict({**ws.base_plan.to_dict(), "float_nodes": sorted(set(ws.base_plan.float_nodes) - ws.head_layers)})


def fp16_model(ws):
    """The float model with every node in float16 (graph inputs and outputs float32)."""
    from sensq.precision import fp16_islands

    return fp16_islands(ws.builder.model, [n.name for n in ws.builder.model.graph.node])[0]


def bench_model(name: str, calib_n: int, rounds: int, tmp: Path, only: list[str] | None = None) -> list[dict]:
    import onnx

    from sensq.defaults import build_config, evaluator_for
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.quantize import prepare

    path, calib, data, eval_opts = MODELS[name]
    cfg = build_config(model=path, calib=[str(c) for c in calib], calib_step=calib_n)
    t = time.perf_counter()
    ws = prepare(cfg, progress=False)
    sensq_seconds = time.perf_counter() - t
    feeds = ws.samples(calib_n)

    def variant(**options):  # options that change the float model are calibrated afresh
        return prepare(build_config(model=path, calib=[str(c) for c in calib], calib_step=calib_n, **options),
                       progress=False)
    fp32 = onnx.load(str(path))
    ev = evaluator_for(str(data), model=cfg.model_path, **eval_opts,
                       **({"mean": cfg.inputs[0].mean_value, "std": cfg.inputs[0].std_value}
                          if cfg.inputs[0].preprocess_file == "IMAGENET" else {}))
    rows = {"FP32 (ORT)": ("ort", lambda: fp32), "FP32 (OpenVINO)": ("ov", lambda: fp32),
            "sensq default (ORT)": ("ort", lambda: ws.build()),
            "sensq --head-layers int8 (ORT)": ("ort", lambda: ws.build(int8_head(ws))),
            "sensq + --rounding learned (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], rounding="learned"))),
            "FP16 everywhere (ORT)": ("ort", lambda: fp16_model(ws)),
            "FP16 everywhere (OpenVINO)": ("ov", lambda: fp16_model(ws)),
            "sensq --activation-type int16 (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], activation_type="int16"))),
            "sensq --activation-type int16 (OpenVINO)": ("ov", lambda: ws.build(ws.base_plan.with_float([], activation_type="int16"))),
            "sensq --placement fused (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], placement=None, depthwise_per_channel=None))),
            "sensq --placement inputs (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], placement="inputs", depthwise_per_channel=True))),
            "sensq + fast bias correction (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], bias_correction="fast"))),
            "sensq + --weight-range mse (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], weight_range="mse"))),
            "sensq + --method mse (ORT)": ("ort", lambda: ws.build(ws.base_plan.with_float([], method="mse"))),
            "sensq + --equalize exact (ORT)": ("ort", lambda: variant(equalize="exact").build()),
            "sensq + all: exact CLE, mse weights, bias correction (ORT)": ("ort", lambda: variant(
                equalize="exact", weight_range="mse", bias_correction="fast").build()),
            "sensq --target openvino-cpu (OpenVINO)": ("ov", lambda: ws.build(ws.base_plan.with_float([], target="openvino-cpu", placement=None, depthwise_per_channel=None))),
            "NNCF ONNX (ORT)": ("ort", lambda: nncf_onnx(fp32, feeds)),
            "NNCF OpenVINO (OpenVINO)": ("ovm", lambda: nncf_openvino(path, feeds)),
            "ORT quantize_static MinMax per-channel (ORT)": ("ort", lambda: ort_static(fp32, feeds, tmp))}
    if only:
        keep = ("FP32 (ORT)", "FP32 (OpenVINO)", "sensq default (ORT)")
        rows = {k: v for k, v in rows.items() if k in keep or any(w in k for w in only)}
    sessions, results, seconds, failed = {}, {}, {}, {}
    for label, (rt, make) in rows.items():
        t = time.perf_counter()
        try:
            model = make()
            sess = ort_session(model) if rt == "ort" else OVModelSession(model, fp32) if rt == "ovm" else ov_session(model)
        except Exception as e:  # a peer that cannot quantize or run this model is a result too
            failed[label] = str(e).splitlines()[0][:300]
            print(f"  {name}: {label}: FAILED {failed[label]}", flush=True)
            continue
        seconds[label] = time.perf_counter() - t
        if rt == "ov":
            sess.model_proto = model if isinstance(model, onnx.ModelProto) else fp32
        sessions[label] = sess
        results[label] = ev.evaluate(model if rt == "ort" else sess, progress=False)  # a proto: the export is recognised
        print(f"  {name}: {label}: {results[label].metrics[ev.primary]:.4f}", flush=True)
    boot = PairedBootstrap(np.arange(len(ev)), seed=0)
    feed = feeds[0][next(iter(feeds[0]))]
    times = time_rounds(sessions, feed, rounds)
    out = [{"model": name, "row": label, "failed": why} for label, why in failed.items()]
    for label, (rt, _) in rows.items():
        if label in failed:
            continue
        ref = "FP32 (ORT)" if rt == "ort" else "FP32 (OpenVINO)"
        d = boot.difference(results[label].samples, results[ref].samples)
        dd = boot.difference(results[label].samples, results["sensq default (ORT)"].samples)
        ratios = np.array(times[label]) / np.array(times[ref])
        out.append({"model": name, "row": label, "runtime": "onnxruntime" if rt == "ort" else "openvino",
                    "metric": results[label].metrics[ev.primary], "metric_name": ev.primary,
                    "diff_fp32": d.value, "diff_lo": d.lo, "diff_hi": d.hi,
                    "diff_default": dd.value, "diff_default_lo": dd.lo, "diff_default_hi": dd.hi,
                    "ratio": float(np.median(ratios)), "ratio_q1": float(np.percentile(ratios, 25)),
                    "ratio_q3": float(np.percentile(ratios, 75)), "ms": float(np.median(times[label]) * 1e3),
                    "build_s": seconds[label] + (sensq_seconds if label.startswith("sensq default") else 0.0),
                    "plan_notes": ws.base_plan.notes if label.startswith("sensq default") else []})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--only", nargs="*", help="rows whose label contains one of these words (and the references)")
    args = ap.parse_args()
    import tempfile

    import onnxruntime
    import openvino
    import nncf

    sys.path.insert(0, str(REPO))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            rows += bench_model(m, args.calib, args.rounds, Path(tmp), args.only)
    print(f"\nonnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}, nncf {nncf.__version__}; "
          f"{args.calib} calibration images; latency: {args.rounds} interleaved rounds, ratio to the same runtime's FP32")
    print(f"| model | row | metric | diff to FP32 [95 %] | diff to sensq default [95 %] | latency ratio [IQR] | ms | build s |\n"
          f"|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['model']} | {r['row']} | failed: {r['failed'][:80]} | | | | | |")
            continue
        print(f"| {r['model']} | {r['row']} | {r['metric']:.4f} | {r['diff_fp32']:+.4f} [{r['diff_lo']:+.4f}, "
              f"{r['diff_hi']:+.4f}] | {r['diff_default']:+.4f} [{r['diff_default_lo']:+.4f}, {r['diff_default_hi']:+.4f}] | "
              f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] | {r['ms']:.1f} | {r['build_s']:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "ptq" if args.models == list(MODELS) else f"ptq_{'_'.join(args.models)}"
    out = RESULTS / (f"{name}_only_{'_'.join(w.replace(' ', '-') for w in args.only)}.json" if args.only else f"{name}.json")
    out.write_text(json.dumps({"versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                                            "nncf": nncf.__version__}, "calib": args.calib, "rounds": args.rounds,
                               "rows": rows}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
