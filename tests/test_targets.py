"""Target profiles: each states its rules; the overflow fix follows the CPU's VNNI flag read at run time; the op
set a target declares is what the QDQ builder quantizes."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from sensq.errors import SensqError
from sensq.latency import machine
from sensq.plan import PrecisionPlan
from sensq.targets import OVERFLOW_FIXES, available_targets, cpu_needs_reduced_range, get_target

from test_fusion import builder

ORT_OPS = set(QDQRegistry) | set(QLinearOpsRegistry)


def test_every_target_states_its_rules():
    assert {"ort-cpu", "openvino-cpu", "tensorrt"} <= set(available_targets())
    for name in available_targets():
        t = get_target(name)
        assert t.activation_type in ("uint8", "int8") and isinstance(t.activation_symmetric, bool)
        assert t.overflow_fix in OVERFLOW_FIXES and t.per_channel and t.description and t.runtime
        assert set(t.resolved_op_types()) <= ORT_OPS and "Conv" in t.resolved_op_types()
        assert t.to_dict()["op_types"] == list(t.resolved_op_types())
    trt = get_target("tensorrt")
    assert (trt.activation_type, trt.activation_symmetric, trt.overflow_fix, trt.quantize_bias) == ("int8", True, "none", False)
    assert get_target("ort-cpu").resolved_op_types() == tuple(sorted(ORT_OPS))
    ov = get_target("openvino-cpu")
    assert "Mul" not in ov.resolved_op_types() and "Sigmoid" not in ov.resolved_op_types()


def test_default_latency_backends_and_user_override():
    assert get_target("ort-cpu").latency_spec() == "ort"
    assert get_target("openvino-cpu").latency_spec() == "openvino"
    assert get_target("tensorrt").latency_spec() == "bops"
    assert get_target("tensorrt").latency_spec('cmd:trtexec --onnx={model}') == 'cmd:trtexec --onnx={model}'
    assert get_target("tensorrt").latency_spec("table:layers.csv") == "table:layers.csv"


def test_aliases_overrides_and_unknown_names():
    assert get_target("trt").name == "tensorrt" and get_target("OpenVINO").name == "openvino-cpu"
    t = get_target("ort-cpu", "int8")
    assert (t.activation_type, t.activation_symmetric) == ("int8", True) and "overridden" in t.description
    with pytest.raises(SensqError) as e:
        get_target("hailo")
    assert "ort-cpu" in e.value.fix and "openvino-cpu" in e.value.fix and "tensorrt" in e.value.fix
    with pytest.raises(SensqError, match="not supported"):
        get_target("tensorrt", "int4")


@pytest.mark.parametrize("flags, arch, expected", [
    (("avx2", "avx512f"), "x86_64", "first_layer"),  # AVX-512 without VNNI: vpmaddubsw saturates
    (("avx2",), "x86_64", "first_layer"),
    (("avx2", "avx512f", "avx512_vnni"), "x86_64", "none"),
    (("avx2", "avx_vnni"), "x86_64", "none"),
    (("asimddp",), "aarch64", "none"),
])
def test_overflow_fix_is_read_from_the_cpu_at_run_time(monkeypatch, flags, arch, expected):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("test cpu", flags))
    monkeypatch.setattr(platform, "machine", lambda: arch)
    assert get_target("ort-cpu").overflow_fix == expected
    assert get_target("openvino-cpu").overflow_fix == expected
    assert get_target("tensorrt").overflow_fix == "none"


def test_this_machine_matches_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = {f for line in text.splitlines() if line.lower().startswith(("flags", "features"))
             for f in line.split(":", 1)[1].split()}
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    expected = x86 and not ({"avx512_vnni", "avx_vnni"} & flags)
    assert cpu_needs_reduced_range() == expected
    assert get_target("ort-cpu").overflow_fix == ("first_layer" if expected else "none")


def silu_chain() -> onnx.ModelProto:
    """x -> conv1 -> Sigmoid -> Mul(conv1, sigmoid) (SiLU) -> conv2 -> y."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig"),
             helper.make_node("Mul", ["c1", "s1"], ["m1"], name="mul"),
             helper.make_node("Conv", ["m1", "w2", "b2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [w("w1", [8, 3, 3, 3]), w("b1", [8]), w("w2", [4, 8, 1, 1]), w("b2", [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantized_tensors(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_builder_quantizes_the_op_set_each_target_declares():
    """SiLU = x * sigmoid(x): ORT's default set quantizes the Sigmoid output (QLinearSigmoid, QLinearMul); OpenVINO's
    set runs the SiLU in float, so the Sigmoid output gets no Q/DQ; TensorRT's writes symmetric int8 only."""
    b = builder(silu_chain())
    assert "s1" in _quantized_tensors(b.build(PrecisionPlan(target="ort-cpu")))
    ov = _quantized_tensors(b.build(PrecisionPlan(target="openvino-cpu")))
    assert "s1" not in ov and {"x", "m1"} <= ov  # conv inputs stay quantized
    trt = b.build(PrecisionPlan(target="tensorrt"))
    zps = [numpy_helper.to_array(i) for i in trt.graph.initializer if i.name.endswith("_zero_point")
           and i.data_type != onnx.TensorProto.INT32]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)


def test_conv_outputs_are_not_quantized_for_openvino():
    """NNCF places no FakeQuantize between a conv and its activation: the conv output stays float for openvino-cpu
    (for tensorrt the Sigmoid/Mul of the SiLU are in its INT8 op set, so their input c1 is quantized as an input)."""
    b = builder(silu_chain())
    assert "c1" not in _quantized_tensors(b.build(PrecisionPlan(target="openvino-cpu")))
    assert "c1" in _quantized_tensors(b.build(PrecisionPlan(target="ort-cpu")))
    assert "c1" in _quantized_tensors(b.build(PrecisionPlan(target="ort-cpu")))
