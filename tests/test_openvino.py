"""OpenVINO as a second runtime: latency backend (timer, measure, paired rounds), evaluation session, agreement with
onnxruntime on QDQ models, and a clear error when the optional extra is missing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from sensq.errors import SensqError
from sensq.latency import LatencyResult, Reference, make_latency_backend, measure_paired
from sensq.plan import PrecisionPlan
from sensq.runtime import make_session

from references import median_interval
from test_fusion import builder, chain

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason='openvino not installed (pip install -e ".[openvino]")')
FAST = "openvino:threads=1,warmup=1,min_repeats=3,min_seconds=0,blocks=1,max_blocks=1"


def test_core_imports_without_openvino():
    code = ("import sys; sys.modules['openvino'] = None; "
            "import sensq.latency, sensq.targets, sensq.export, sensq.runtime_openvino, sensq.cli; "
            "assert 'openvino' in sensq.latency.available_latency_backends()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_missing_openvino_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(SensqError) as e:
        make_latency_backend("openvino")
    assert 'pip install -e ".[openvino]"' in e.value.fix
    from sensq.runtime_openvino import openvino_session

    with pytest.raises(SensqError, match="openvino package is not installed"):
        openvino_session(chain("Relu"), threads=1)


@pytest.fixture(scope="module")
def models():
    """(FP32 chain model, its all-INT8 QDQ build, a build with the float island {conv2, act2})."""
    b = builder(chain("Relu"))
    return b.model, b.build(PrecisionPlan()), b.build(PrecisionPlan(float_nodes=["conv2", "act2"]))


@needs_openvino
def test_timer_and_measure(models):
    backend = make_latency_backend(FAST)
    assert backend.unit == "ms" and not backend.deterministic and backend.threads == 1
    timer = backend.timer(models[1])
    runs = [timer() for _ in range(3)]
    timer.close()
    assert all(isinstance(t, float) and 0 < t < 1000 for t in runs)
    res = backend.measure(models[1])
    assert isinstance(res, LatencyResult) and res.unit == "ms" and res.backend == "openvino"
    assert res.repeats >= 3 and res.ci[0] <= res.value <= res.ci[1]
    assert res.details["precision"] == "f32" and res.details["threads"] == 1
    d = backend.describe()
    assert d["openvino"] == openvino.__version__ and d["precision"] == "f32"


@needs_openvino
def test_paired_rounds_against_fp32(models, tmp_path):
    backend = make_latency_backend(FAST)
    reference = Reference(backend, models[0])
    try:
        p = measure_paired(backend, models[1], reference, rounds=4, runs=1, lock_dir=tmp_path)
    finally:
        reference.close()
    ratios = p.details["round_ratios"]
    assert p.backend == "openvino" and p.unit == "ms" and p.rounds == 4 and len(ratios) == 4
    assert min(ratios) - 1e-4 <= p.ratio <= max(ratios) + 1e-4  # the median of the rounds (rounded to 5 digits)
    assert p.value > 0 and p.ref_value > 0
    assert p.ratio_ci == pytest.approx(median_interval(ratios), abs=1e-5)  # 4 rounds reach no 95 %: their range


@needs_openvino
def test_session_interface_matches_onnxruntime(models):
    from sensq.runtime_openvino import openvino_session

    q = models[1]
    q = onnx.ModelProto.FromString(q.SerializeToString())
    onnx.helper.set_model_props(q, {"names": "{0: 'a'}", "stride": "8"})
    ov, ref = openvino_session(q, threads=1), make_session(q)
    assert [(i.name, list(i.shape), i.type) for i in ov.get_inputs()] == \
        [(i.name, list(i.shape), i.type) for i in ref.get_inputs()]
    assert [o.name for o in ov.get_outputs()] == [o.name for o in ref.get_outputs()]
    assert dict(ov.get_modelmeta().custom_metadata_map) == dict(ref.get_modelmeta().custom_metadata_map)
    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    (a,) = ov.run(None, {"x": x})
    (b,) = ov.run(["y"], {"x": x})
    assert a.shape == (1, 4, 16, 16) and a.dtype == np.float32 and np.array_equal(a, b)


@needs_openvino
@pytest.mark.parametrize("which", [1, 2], ids=["all-int8", "float-island"])
def test_qdq_outputs_agree_with_onnxruntime(models, which):
    """Tolerance: the output y is itself quantized, so both runtimes emit values on the same grid (multiples of y's
    scale). They may legitimately differ where an intermediate value lands within rounding error of a half step
    (float accumulation order, requantization fused in a different precision, float islands that ORT re-quantizes):
    that flips a code by one step. So: at most one output step anywhere, and in few elements (< 20 %); a wrong
    scale, zero point or layout would give many-step errors in most elements."""
    from sensq.runtime_openvino import openvino_session

    q = models[which]
    step = float(next(onnx.numpy_helper.to_array(i) for i in q.graph.initializer if i.name == "y_scale"))
    ov, ref = openvino_session(q, threads=1), make_session(q)
    diffs = []
    for x in np.random.default_rng(3).random((8, 1, 3, 16, 16), dtype=np.float32):
        diffs.append(np.abs(ov.run(None, {"x": x})[0] - ref.run(None, {"x": x})[0]).ravel() / step)
    d = np.concatenate(diffs)
    assert d.max() <= 1.0 + 1e-3
    assert (d > 0.5).mean() < 0.2
