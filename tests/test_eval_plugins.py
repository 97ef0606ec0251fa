"""Evaluator registry (make_evaluator, kind auto-detection) and user plugins (file, module, entry point)."""
from __future__ import annotations

import importlib.metadata
import json
import textwrap

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from sensq.errors import SensqError
from sensq.evaluators import (ClassificationEvaluator, DetectionEvaluator, Evaluator, detect_kind, make_evaluator,
                              model_info)
from sensq.evaluators.plugins import MetricFunctionEvaluator, load_plugin, plugin_form


def doubling_model(h=4, w=4) -> onnx.ModelProto:
    """y = 2x on a [1,3,h,w] input, with metadata (enough to exercise sessions)."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, h, w])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    helper.set_model_props(m, {"purpose": "test"})
    return m


PLUGIN_SOURCE = textwrap.dedent('''
    import numpy as np
    from sensq.evaluators.base import EvalResult

    def mean_output(session, data=None, limit=None):
        """metric form: receives an InferenceSession."""
        x = np.ones((1, 3, 4, 4), np.float32)
        y = session.run(None, {"x": x})[0]
        return {"mean": float(y.mean()), "n_samples": limit or 5, "data_len": float(len(str(data)))}

    def path_metric(model):
        """metric form: receives the model as given."""
        return {"is_proto": float(not isinstance(model, str))}

    def bad_metric(session):
        return "high"  # neither metrics nor per-sample values (a list is per-sample values)

    class ConstantEvaluator:
        name = "constant"
        primary = "score"

        def __init__(self, data, value):
            self.data, self.value = data, value

        def __len__(self):
            return 7

        def evaluate(self, model, limit=None, progress=True):
            return EvalResult(metrics={"score": self.value}, primary="score", n_samples=limit or 7)

    def make(data, value=0.25):
        """factory form."""
        return ConstantEvaluator(data, value)

    def make_broken(data):
        return 42

    def wrong_signature(x):
        return {}
''')


@pytest.fixture
def plugin_file(tmp_path):
    f = tmp_path / "my_eval.py"
    f.write_text(PLUGIN_SOURCE)
    return f


def test_factory_plugin_from_file(plugin_file, tmp_path):
    ev = make_evaluator(str(tmp_path), kind=f"{plugin_file}:make", value=0.75)
    assert isinstance(ev, Evaluator) and len(ev) == 7
    r = ev.evaluate(doubling_model(), limit=3)
    assert r.value == 0.75 and r.primary == "score" and r.n_samples == 3
    assert ev.data == str(tmp_path)


def test_metric_function_plugin_gets_a_timed_session(plugin_file, tmp_path):
    ev = make_evaluator(str(tmp_path), kind=f"{plugin_file}:mean_output")
    assert isinstance(ev, MetricFunctionEvaluator)
    r = ev.evaluate(doubling_model(), limit=4)
    assert r.primary == "mean" and r.value == 2.0  # first key is the primary metric
    assert r.metrics["data_len"] == len(str(tmp_path)) and "n_samples" not in r.metrics
    assert r.n_samples == 4 and len(ev) == 4
    assert 0 < r.inference_seconds <= r.seconds
    ev2 = make_evaluator(None, kind=f"{plugin_file}:mean_output", primary="data_len")
    assert ev2.evaluate(doubling_model()).primary == "data_len"


def test_metric_function_plugin_with_model_parameter(plugin_file):
    ev = make_evaluator(None, kind=f"{plugin_file}:path_metric")
    assert ev.evaluate(doubling_model()).value == 1.0
    assert plugin_form(load_plugin(f"{plugin_file}:path_metric")) == "metric"
    assert plugin_form(load_plugin(f"{plugin_file}:make")) == "factory"


def test_plugin_from_module_and_entry_point(plugin_file, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    assert make_evaluator("d", kind="my_eval:make").evaluate(doubling_model()).value == 0.25
    ep = importlib.metadata.EntryPoint(name="constant", value="my_eval:make", group="sensq.evaluators")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "sensq.evaluators" else real(**kw))
    ev = make_evaluator("d", kind="constant", value=0.5)
    assert ev.evaluate(doubling_model()).value == 0.5
    with pytest.raises(SensqError, match="unknown evaluator 'nope'.*constant"):
        make_evaluator("d", kind="nope")


def test_plugin_errors(plugin_file, tmp_path):
    with pytest.raises(SensqError, match="plugin file not found"):
        make_evaluator(None, kind=f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(SensqError, match="'nothere' not found.*make"):
        make_evaluator(None, kind=f"{plugin_file}:nothere")
    with pytest.raises(SensqError, match="first parameter must be"):
        make_evaluator(None, kind=f"{plugin_file}:wrong_signature")
    with pytest.raises(SensqError, match="returned int without evaluate"):
        make_evaluator(None, kind=f"{plugin_file}:make_broken")
    with pytest.raises(SensqError, match="not a dict of metrics"):
        make_evaluator(None, kind=f"{plugin_file}:bad_metric").evaluate(doubling_model())
    with pytest.raises(SensqError, match="did not return the primary metric 'acc'"):
        make_evaluator(None, kind=f"{plugin_file}:mean_output", primary="acc").evaluate(doubling_model())
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(SensqError, match="failed to import: ModuleNotFoundError"):
        make_evaluator(None, kind=f"{broken}:f")
    with pytest.raises(SensqError, match="cannot be imported"):
        make_evaluator(None, kind="no_such_pkg.mod:f")


def test_detect_kind_and_builtin_dispatch(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    cv2.imwrite(str(coco / "val2017" / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}], "annotations": [],
        "categories": [{"id": 1, "name": "x"}]}))
    yolo = tmp_path / "yolo"
    (yolo / "images" / "val").mkdir(parents=True)
    cv2.imwrite(str(yolo / "images" / "val" / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    (yolo / "data.yaml").write_text(yaml.safe_dump({"path": ".", "val": "images/val", "names": ["x"]}))
    cls = tmp_path / "cls"
    (cls / "cat").mkdir(parents=True)
    cv2.imwrite(str(cls / "cat" / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    assert [detect_kind(p) for p in (coco, yolo, yolo / "data.yaml", cls)] == ["coco", "yolo", "yolo", "imagenet"]
    model = tmp_path / "m.onnx"
    onnx.save(doubling_model(96, 128), str(model))
    assert model_info(str(model)) == ((96, 128), {"purpose": "test"})
    ev = make_evaluator(str(coco), model=str(model))
    assert isinstance(ev, DetectionEvaluator) and ev.name == "coco" and ev.imgsz == (96, 128)
    ev = make_evaluator(str(yolo), kind="auto")
    assert isinstance(ev, DetectionEvaluator) and ev.name == "yolo" and len(ev) == 1
    ev = make_evaluator(str(cls), model=str(model))
    assert isinstance(ev, ClassificationEvaluator) and ev.input_size == (96, 128) and len(ev) == 1


def test_registry_input_errors(tmp_path):
    with pytest.raises(SensqError, match="data folder not found"):
        make_evaluator(str(tmp_path / "missing"))
    with pytest.raises(SensqError, match="cannot tell the dataset type"):
        make_evaluator(str(tmp_path))
    with pytest.raises(SensqError, match="model file not found"):
        make_evaluator(str(tmp_path), kind="imagenet", model=str(tmp_path / "m.onnx"))
    with pytest.raises(SensqError, match="labels= applies to imagenet"):
        make_evaluator(str(tmp_path), kind="coco", labels="x.tsv")
