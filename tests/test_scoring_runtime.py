"""Accuracy scored by the runtime the target deploys on: with --target openvino-cpu every trial and FP32 are scored by
OpenVINO (f32), kept apart from ONNX Runtime's results, and `sensq eval --target openvino-cpu` does the same."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from sensq.cli import main
from sensq.plan import PrecisionPlan
from sensq.runtime_openvino import openvino_session
from sensq.search import run_search

from search_helpers import make_tiny, study_records, tiny_settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ovscore"))


def test_openvino_target_trials_are_scored_by_openvino(tiny, tmp_path):
    cfg = tiny.config()
    cfg.target = "openvino-cpu"
    from sensq.quantize import prepare

    ws = prepare(cfg, progress=False)
    ev = tiny.evaluator()
    res = run_search(ws, ev, tiny_settings(tmp_path / "w", 3, latency="bops"), progress=False)
    assert res.summary["scored_by"].startswith("OpenVINO") and "f32" in res.summary["scored_by"]
    full = [r for r in study_records(tmp_path / "w") if r.full and r.source != "sensitivity"]
    assert full
    runtimes_differ = []
    for rec in full[:2]:  # what OpenVINO computes for the rebuilt (exported) model, by an independent session
        model = ws.build(PrecisionPlan.from_dict(rec.plan))
        by_ov = ev.evaluate(openvino_session(model), limit=rec.fidelity).value
        by_ort = ev.evaluate(model, limit=rec.fidelity).value
        assert rec.metric == pytest.approx(by_ov, rel=1e-9), (rec.metric, by_ov, by_ort)
        runtimes_differ.append(by_ort != by_ov)
    assert any(runtimes_differ)  # the two runtimes' float arithmetic differs: the match is OpenVINO's, not ORT's
    assert "scored by OpenVINO" in (tmp_path / "w" / "pareto.md").read_text(encoding="utf-8")


def test_eval_target_openvino_scores_on_openvino(tiny, capsys):
    args = ["eval", "-m", str(tiny.model), "--data", str(tiny.data), "--task", tiny.task]
    assert main(args + ["--target", "openvino-cpu"]) == 0
    out = capsys.readouterr().out
    assert "scored by OpenVINO" in out
    ov = float(next(l for l in out.splitlines() if l.startswith("neg_mse:")).split(":")[1])
    expected = tiny.evaluator().evaluate(openvino_session(str(tiny.model))).value
    assert ov == pytest.approx(expected, abs=1e-4)
