"""`sensq eval --target openvino-cpu` against an independent OpenVINO scoring of the same model.

Quantizes YOLOX-Nano for openvino-cpu, scores it with `sensq eval --target openvino-cpu` (sensq's OpenVINO session),
and again through a session written here directly on openvino's API (compile_model with INFERENCE_PRECISION_HINT
f32, one infer request), both fed by the same COCO evaluator. Prints both and writes bench/results/openvino_scoring.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()


class PlainOpenVINO:
    """The session interface the evaluators read, on openvino directly (no sensq code on the inference path)."""

    def __init__(self, path: Path):
        import onnx
        import openvino as ov

        self.model_proto = onnx.load(str(path))
        self.compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                  "INFERENCE_NUM_THREADS": 2})
        self.request = self.compiled.create_infer_request()
        self._inputs = [SimpleNamespace(name=p.get_any_name(), shape=list(p.get_partial_shape().get_min_shape()),
                                        type="tensor(float)") for p in self.compiled.inputs]
        self._outputs = [SimpleNamespace(name=p.get_any_name(), shape=None, type="tensor(float)") for p in self.compiled.outputs]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def get_modelmeta(self):
        return SimpleNamespace(custom_metadata_map={})

    def run(self, names, feeds):
        res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        names = names or [o.name for o in self._outputs]
        return [np.array(res[self.compiled.output(n)]) for n in names]


def main():
    from sensq.cli import main as sensq
    from sensq.defaults import evaluator_for

    model = DATA / "models" / "yolox_nano.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "yolox_ov.q.onnx"
        assert sensq(["quantize", "-m", str(model), "--calib", str(DATA / "coco" / "train2017"), "--target",
                      "openvino-cpu", "-o", str(q), "--no-analysis", "-q"]) == 0
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert sensq(["eval", "-m", str(q), "--data", str(DATA / "coco"), "--target", "openvino-cpu", "-q"]) == 0
        text = out.getvalue()
        by_sensq = float(next(l for l in text.splitlines() if l.startswith("mAP50-95:")).split(":")[1])
        ev = evaluator_for(str(DATA / "coco"), model=str(model))
        by_plain = ev.evaluate(PlainOpenVINO(q), progress=False).metrics["mAP50-95"]
        by_ort = ev.evaluate(str(q), progress=False).metrics["mAP50-95"]
    import openvino
    row = {"model": "yolox_nano --target openvino-cpu", "sensq_eval_openvino": by_sensq, "independent_openvino": by_plain,
           "difference": by_sensq - by_plain, "onnxruntime_same_model": by_ort, "openvino": openvino.__version__}
    print(text.strip())
    print(json.dumps(row, indent=1))
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "openvino_scoring.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
