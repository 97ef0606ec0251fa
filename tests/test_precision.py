"""Precision per layer group (int8 / a16 / fp32): mixed 8/16-bit models build and run, the precision search space
samples and seeds them within what the target runs, and exports carry a16 groups or refuse them in one line."""
from __future__ import annotations

import json

import numpy as np
import onnx
import optuna
import pytest

from sensq.build import QDQBuilder
from sensq.errors import SensqError
from sensq.export import export_trial
from sensq.plan import PrecisionPlan
from sensq.precision import target_precisions
from sensq.runtime import make_session
from sensq.search import run_search
from sensq.search_spaces import load_space, validate
from sensq.statistics import collect
from sensq.targets import get_target

from search_helpers import make_tiny, study_records, tiny_settings
from tiny_models import conv_relu_conv


def _zero_point_types(model: onnx.ModelProto) -> dict[str, int]:
    """Quantized tensor (input of each QuantizeLinear) -> element type of its zero point."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _nsr(model, feeds, reference) -> float:
    sess = make_session(model.SerializeToString())
    out = [sess.run(None, f)[0] for f in feeds]
    return float(np.mean([np.mean((a - b) ** 2) / np.mean(b ** 2) for a, b in zip(out, reference)]))


def test_mixed_plan_puts_only_its_groups_on_16_bits(tmp_path):
    model = onnx.load(str(conv_relu_conv(tmp_path / "m.onnx")))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    builder = QDQBuilder(model, collect(model, iter(feeds), len(feeds), progress=False))
    int8 = builder.build(PrecisionPlan(overflow_fix="none"))
    mixed = builder.build(PrecisionPlan(a16_nodes=["conv1", "relu"], overflow_fix="none"))
    types = _zero_point_types(mixed)
    assert types["x"] == onnx.TensorProto.UINT8  # the model input stays 8-bit ...
    assert types["r1"] == onnx.TensorProto.UINT16  # ... the a16 group's activation is 16-bit,
    assert types["x_DequantizeLinear_Output"] == onnx.TensorProto.UINT16  # the 8-bit input re-quantized for conv1
    assert set(_zero_point_types(int8).values()) == {onnx.TensorProto.UINT8}
    sess = make_session(model.SerializeToString())
    reference = [sess.run(None, f)[0] for f in feeds]
    assert _nsr(mixed, feeds, reference) < _nsr(int8, feeds, reference)
    # a plan without a16 nodes keeps the key plans had before the field existed; float wins over a16
    assert PrecisionPlan().key() == "f81dc18ae12dcdcb"  # computed by sensq before a16_nodes existed
    assert PrecisionPlan(float_nodes=["relu"], method="kl").key() == "442eb165e139444d"
    assert PrecisionPlan(a16_nodes=["relu"]).key() != PrecisionPlan().key()
    assert PrecisionPlan(float_nodes=["relu"], a16_nodes=["relu"]).a16_nodes == []
    with pytest.raises(SensqError, match="a16 node 'nope' not in graph"):
        builder.build(PrecisionPlan(a16_nodes=["nope"]))


def test_space_is_limited_to_the_target():
    assert target_precisions(get_target("ort-cpu")) == ("int8", "a16", "fp32")
    assert target_precisions(get_target("tensorrt")) == ("int8", "fp16", "fp32")
    assert target_precisions(get_target("openvino-cpu")) == ("int8", "a16", "fp16", "fp32")
    space = load_space("precision")
    assert space.restrict(target_precisions(get_target("tensorrt"))) == ["a16"]
    assert space.params["groups"]["choices"] == ["int8", "fp16", "fp32"]
    assert load_space("precision").restrict(target_precisions(get_target("ort-cpu"))) == ["fp16"]
    with pytest.raises(SensqError, match="bf16"):
        validate({"params": {"g": {"type": "group_precision", "choices": ["int8", "bf16"]}}}, "x.yaml")


def test_space_samples_and_seeds_precisions():
    space = load_space("precision")
    ranked = ["a", "b", "c"]
    trial = optuna.trial.FixedTrial({"precision:a": "a16", "precision:b": "fp32", "precision:c": "int8",
                                     "method": "default", "per_channel": True, "overflow_fix": "none"})
    choice = space.suggest(trial, ranked)
    assert choice["a16_groups"] == ["a"] and choice["float_groups"] == ["b"]
    seed = space.seed_params(ranked, 1, {"method": "default", "per_channel": True, "overflow_fix": "none"})
    assert {k: v for k, v in seed.items() if k.startswith("precision:")} == {
        "precision:a": "fp32", "precision:b": "int8", "precision:c": "int8"}


@pytest.fixture(scope="module")
def precision_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    tiny = make_tiny(root / "tiny")
    workdir = root / "run"
    run_search(tiny.workspace(), tiny.evaluator(), tiny_settings(workdir, 10, space="precision"), progress=False)
    return workdir


def test_search_scores_a16_plans_and_exports_carry_or_refuse_them(precision_search, tmp_path):
    recs = [r for r in study_records(precision_search) if r.full]
    mixed = [r for r in recs if r.plan.get("a16_nodes")]
    assert mixed, "a budget-10 search over 3 groups x 3 precisions scores some a16 plan"
    n = mixed[0].number
    written = export_trial(precision_search, n, tmp_path / "t.q.onnx", "onnx", progress=False)
    model = onnx.load(str(written["output"]))
    assert onnx.TensorProto.UINT16 in set(_zero_point_types(model).values())
    export_trial(precision_search, n, tmp_path / "t.json", "json", progress=False)
    assert json.loads((tmp_path / "t.json").read_text())["a16_nodes"] == mixed[0].plan["a16_nodes"]
    for fmt in ("xquant", "ort-exclude", "trtexec", "nncf"):
        with pytest.raises(SensqError, match=f"16-bit activations, which the {fmt} format cannot express"):
            export_trial(precision_search, n, tmp_path / f"t.{fmt}", fmt, progress=False)
