"""A metric plugin that returns per-sample values gets the built-in evaluators' machinery: subsets, paired
bootstrap intervals (checked against a brute-force resampling) and the search's per-sample path."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sensq.errors import SensqError
from sensq.evaluators.plugins import MetricFunctionEvaluator
from sensq.evaluators.samples import PairedBootstrap
from sensq.evaluators.scoring import SampleStore, Scorer, model_hash, supports_indices

N = 40
VALUES = {0: np.random.default_rng(1).random(N), 1: np.random.default_rng(2).random(N)}


def _model(path, tag: int):
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], f"m{tag}",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], doc_string=str(tag))
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _score(model, data=None):
    """Per-sample values of the model named by its doc string (0 or 1)."""
    return VALUES[int(onnx.load(str(model)).doc_string)]


def _dict_score(model, data=None):
    v = VALUES[int(onnx.load(str(model)).doc_string)]
    return {"per_sample": {"acc": v, "err": 1 - v}, "note": 3.0}


def _brute_force(v: np.ndarray, n_boot: int, seed: int, level: float = 0.95):
    """BCa interval of the mean by resampling the values directly (same draws as bootstrap_weights)."""
    draws = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    boot = v[draws].mean(axis=1)
    g = min(len(v), 100)
    jack = np.array([v[np.arange(len(v)) % g != k].mean() for k in range(g)])
    theta = v.mean()
    nd = NormalDist()
    z0 = nd.inv_cdf((np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / n_boot)
    dev = jack.mean() - jack
    a = np.sum(dev ** 3) / (6 * np.sum(dev ** 2) ** 1.5)
    qs = [nd.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (nd.inv_cdf(0.025), nd.inv_cdf(0.975))]
    return theta, np.percentile(boot, 100 * qs[0]), np.percentile(boot, 100 * qs[1])


def test_per_sample_plugin_gets_bootstrap_intervals(tmp_path):
    a, b = _model(tmp_path / "a.onnx", 0), _model(tmp_path / "b.onnx", 1)
    ev = MetricFunctionEvaluator(_score)
    assert not supports_indices(ev) and ev.probe(str(a)) and supports_indices(ev)
    assert len(ev) == N and ev.primary == "metric"
    scorer = Scorer(ev, SampleStore(tmp_path / "store", ev), np.arange(N))
    sa, sb = scorer.score(str(a), model_hash(str(a))), scorer.score(str(b), model_hash(str(b)))
    boot = PairedBootstrap(np.arange(N), n_boot=500, seed=3)
    got = boot.metric(sa)
    assert (got.value, got.lo, got.hi) == pytest.approx(_brute_force(VALUES[0], 500, 3), abs=1e-12)
    diff = boot.difference(sa, sb)
    assert (diff.value, diff.lo, diff.hi) == pytest.approx(_brute_force(VALUES[0] - VALUES[1], 500, 3), abs=1e-12)
    sub = ev.evaluate(str(b), indices=[3, 7, 11], progress=False)
    assert sub.value == pytest.approx(VALUES[1][[3, 7, 11]].mean())


def test_per_sample_dict_and_errors(tmp_path):
    a = _model(tmp_path / "a.onnx", 0)
    ev = MetricFunctionEvaluator(_dict_score, primary="err")
    res = ev.evaluate(str(a), progress=False)
    assert res.primary == "err" and res.value == pytest.approx(1 - VALUES[0].mean())
    assert res.metrics["acc"] == pytest.approx(VALUES[0].mean()) and res.extra["plugin_values"] == {"note": 3.0}
    bad = MetricFunctionEvaluator(lambda model: {"per_sample": {"a": [1.0, 2.0], "b": [1.0]}})
    with pytest.raises(SensqError, match="lengths"):
        bad.evaluate(str(a), progress=False)
    scalar = MetricFunctionEvaluator(lambda model: {"acc": 0.5})
    assert not scalar.probe(str(a)) and not supports_indices(scalar)
