"""Deployment exporters against their consumers: onnxruntime's quantize_static rebuilds the scored model from the
ort-exclude settings; the trtexec script, run by a shell and parsed by a port of TensorRT 10's flag grammar, pins
exactly the float nodes; NNCF with the exported IgnoredScope leaves exactly those nodes float."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from sensq.export import ExportContext, TrialChoice
from sensq.export import nncf_scope, ort_exclude, trtexec
from sensq.plan import PrecisionPlan

from test_search import make_tiny


# ------------------------------------------------------------------ TensorRT 10 trtexec grammar (reference port)
# A line-by-line port of samples/common/sampleOptions.cpp / sampleUtils.cpp (TensorRT 10): parseArguments,
# splitToStringVec, splitNameAndValue, removeSingleQuotationMarks, getLayerPrecisions, matchStringWithOneWildcard,
# findPlausible and setLayerPrecisions' global "*" rule.
TRT_PRECISIONS = {"fp32", "fp16", "bf16", "int8", "fp8", "int32", "int64", "bool", "uint8", "int4"}


def split_to_string_vec(s: str, sep: str, max_split: int = -1) -> list[str]:
    out, start = [], 0
    while start < len(s):
        if max_split >= 0 and len(out) == max_split:
            out.append(s[start:])
            break
        idx = s.find(sep, start)
        if idx == -1:
            idx = len(s)
        out.append(s[start:idx])
        if idx == len(s) - 1:
            out.append("")
        start = idx + 1
    return out


def split_name_and_value(s: str) -> tuple[str, str]:
    quoted = split_to_string_vec(s, "'")
    if len(quoted) != 1:
        if len(quoted) != 3:
            raise ValueError(f"invalid number of quotes in {s!r}")
        return quoted[0] + quoted[1], quoted[2][1:]
    parts = split_to_string_vec(s, ":")
    return ":".join(parts[:-1]), parts[-1]


def parse_trtexec(argv: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(options, layerPrecisions map) as trtexec reads them."""
    assert argv[0] == "trtexec"
    opts = {}
    for a in argv[1:]:
        assert a.startswith("--"), a
        key, _, value = a[2:].partition("=")
        opts[key] = value
    precisions = {}
    for pair in split_to_string_vec(opts.get("layerPrecisions", ""), ","):
        name, value = split_name_and_value(pair)
        assert value in TRT_PRECISIONS, f"invalid DataType {value!r} in {pair!r}"
        precisions[name.replace("'", "")] = value
    return opts, precisions


def match_one_wildcard(pattern: str, target: str) -> bool:
    parts = split_to_string_vec(pattern, "*", 1)
    if len(parts) == 1:
        return pattern == target
    return len(target) >= len(parts[0]) + len(parts[1]) and target.startswith(parts[0]) and target.endswith(parts[1])


def pinned_layers(layers: list[str], precisions: dict[str, str]) -> dict[str, str]:
    out = {}
    for layer in layers:
        if layer in precisions:
            out[layer] = precisions[layer]
        else:
            hit = next((p for p in precisions if match_one_wildcard(p, layer)), None)
            if hit is not None:
                out[layer] = precisions[hit]
            elif "*" in precisions:
                out[layer] = precisions["*"]
    return out


def run_script(script: Path, tmp_path: Path) -> list[str]:
    """Run the exported script with a fake `trtexec` on PATH that records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "trtexec"
    record = tmp_path / "argv.json"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv, open({str(record)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", str(script)], check=True, env=env, cwd=tmp_path)
    argv = json.loads(record.read_text())
    return ["trtexec", *argv[1:]]


def test_grammar_port_reads_documented_examples():
    """The port against examples of the TensorRT documentation and the parser's own comments."""
    assert parse_trtexec(["trtexec", "--layerPrecisions=*:fp16,layer_1:fp32"])[1] == {"*": "fp16", "layer_1": "fp32"}
    assert parse_trtexec(["trtexec", "--layerPrecisions='a:b':fp16"])[1] == {"a:b": "fp16"}
    assert parse_trtexec(["trtexec", "--layerPrecisions=a:b:fp16"])[1] == {"a:b": "fp16"}
    assert match_one_wildcard("/model.2/*", "/model.2/conv") and not match_one_wildcard("/model.2/*", "/model.20")
    with pytest.raises(ValueError):
        split_name_and_value("it's:fp16")


def test_trtexec_names_with_special_characters(tmp_path):
    floats = ["/model.0/conv", "a:b", "p,q", "x,y", "it's", "star*name", "sp ace", "eq=ual", "tail:", "$(touch pwned)",
              "new\nline", ",,,"]
    quantized = ["/model.1/conv", "x__y", "/model.0/conv_1", "other"]
    layers = floats + quantized
    argv, unexpressed = trtexec.command("m.trt.q.onnx", floats, layers, precision="fp16", engine_name="m.engine")
    # x,y -> x*y would also pin the quantized x__y; ",,," -> "*" would pin every layer
    assert sorted(unexpressed) == sorted(["x,y", ",,,"])
    script = tmp_path / "m.trtexec.sh"
    script.write_text(trtexec.script(argv, ["names: " + " | ".join(floats)]))
    got = run_script(script, tmp_path)
    assert got == argv and not (tmp_path / "pwned").exists()
    opts, precisions = parse_trtexec(got)
    assert opts["onnx"] == "m.trt.q.onnx" and opts["precisionConstraints"] == "obey" and opts["saveEngine"] == "m.engine"
    assert "int8" in opts and "fp16" in opts
    pinned = pinned_layers(layers, precisions)
    assert set(pinned) == set(floats) - set(unexpressed)
    assert set(pinned.values()) == {"fp16"}


# ------------------------------------------------------------------ yolov5n workspace (trtexec, ort-exclude, nncf)
@pytest.fixture(scope="module")
def yolo_ws(yolov5n_ws):
    return yolov5n_ws


@pytest.fixture(scope="module")
def yolo_plan(yolo_ws):
    """The base plan (decode float) plus two float groups, 7-bit first-layer weights."""
    extra = [n for n in yolo_ws.builder.node_names if n.startswith(("/model.2/", "/model.9/cv1/"))]
    return yolo_ws.base_plan.with_float(extra, overflow_fix="first_layer")


def context(ws, plan, tmp_path) -> ExportContext:
    return ExportContext(tmp_path, {}, TrialChoice(7, plan, 0.0, 0.0, "given"), progress=False, _ws=ws)


def test_trtexec_export_of_yolov5n_pins_exactly_the_float_nodes(yolo_ws, yolo_plan, tmp_path):
    out = tmp_path / "y.trtexec.sh"
    written = trtexec.write(context(yolo_ws, yolo_plan, tmp_path), out)
    model = onnx.load(str(tmp_path / "y.trt.q.onnx"))
    layers = [n.name for n in model.graph.node]
    opts, precisions = parse_trtexec(run_script(out, tmp_path))
    assert opts["onnx"] == "y.trt.q.onnx"
    assert set(pinned_layers(layers, precisions)) == set(yolo_plan.float_nodes)
    # TensorRT takes symmetric int8 Q/DQ only: every activation/weight zero point is an int8 zero
    zps = [numpy_helper.to_array(i) for i in model.graph.initializer
           if i.name.endswith("zero_point") and "bias" not in i.name]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert any("rebuilt" in n for n in written["notes"])  # the plan was scored for ort-cpu (uint8)


def test_tensorrt_build_keeps_biases_float(yolo_ws):
    """TensorRT dequantizes int8/fp8/int4 only: the tensorrt target must not write int32 bias Q/DQ."""
    from sensq.targets import get_target

    assert get_target("tensorrt").quantize_bias is False
    model = yolo_ws.build(PrecisionPlan(target="tensorrt"))
    int32_dq = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32]
    assert int32_dq == []


# ------------------------------------------------------------------ ort-exclude: quantize_static rebuilds the model
class OneSample(CalibrationDataReader):
    def __init__(self, model: onnx.ModelProto):
        inp = model.graph.input[0]
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        self.items = iter([{inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)}])

    def get_next(self):
        return next(self.items, None)


def quantize_with_exported_settings(doc: dict, folder: Path, out: Path) -> onnx.ModelProto:
    """What a user does with the file: its settings, numpy types for scale/zero point, one calibration sample."""
    s = doc["quantize_static"]
    zp_type = np.uint8 if s["activation_type"] == "QUInt8" else np.int8
    extra = dict(s["extra_options"])
    extra["TensorQuantOverrides"] = {
        name: [{k: (np.array(v, np.float32) if k == "scale" else np.array(v, zp_type) if k == "zero_point" else v) for k, v in o.items()}
               for o in overrides] for name, overrides in s["extra_options"]["TensorQuantOverrides"].items()}
    model_input = folder / s["model_input"]
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(str(model_input), str(out), OneSample(onnx.load(str(model_input))),
                        quant_format=QuantFormat[s["quant_format"]], per_channel=s["per_channel"],
                        reduce_range=s["reduce_range"], activation_type=QuantType[s["activation_type"]],
                        weight_type=QuantType[s["weight_type"]], nodes_to_exclude=s["nodes_to_exclude"],
                        op_types_to_quantize=s["op_types_to_quantize"],
                        calibrate_method=CalibrationMethod[s["calibrate_method"]], extra_options=extra)
    finally:
        logging.getLogger().setLevel(previous)
    model = onnx.load(str(out))
    if doc["post_processing"]["shielded_float_nodes"]:
        from sensq.passes.float_shield import shield_float_nodes

        shield_float_nodes(model, s["nodes_to_exclude"])
    return model


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes (any order), inputs, outputs, and initializers of the same names, types and values (stored as
    raw_data or typed fields alike)."""
    def canon(m):
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return (sorted(n.SerializeToString() for n in m.graph.node),
                [i.SerializeToString() for i in m.graph.input], [o.SerializeToString() for o in m.graph.output],
                {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in inits.items()})
    return canon(a) == canon(b)


def export_ort(ws, plan, tmp_path, name="t") -> tuple[dict, onnx.ModelProto]:
    out = tmp_path / f"{name}.ort_exclude.json"
    ort_exclude.write(context(ws, plan, tmp_path), out)
    doc = json.loads(out.read_text())
    return doc, quantize_with_exported_settings(doc, tmp_path, tmp_path / f"{name}.ort.q.onnx")


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny")).workspace()


@pytest.mark.parametrize("changes", [
    {}, {"overflow_fix": "first_layer"}, {"overflow_fix": "all"}, {"per_channel": False, "overflow_fix": "first_layer"},
    {"target": "tensorrt"}, {"activation_type": "int8", "overflow_fix": "first_layer"},
    {"method": "percentile", "percentile": 99.9, "float_nodes": ["conv2"]}, {"method": "kl", "float_nodes": ["conv1"]},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "base")
def test_quantize_static_with_exported_settings_rebuilds_the_model_tiny(tiny_ws, tmp_path, changes):
    plan = tiny_ws.base_plan.with_float(changes.pop("float_nodes", []), **changes)
    doc, rebuilt = export_ort(tiny_ws, plan, tmp_path)
    s = doc["quantize_static"]
    assert s["activation_type"] in ("QUInt8", "QInt8") and s["weight_type"] == "QInt8"
    assert s["nodes_to_exclude"] == plan.float_nodes
    assert same_model(rebuilt, tiny_ws.build(plan))


def test_quantize_static_with_exported_settings_rebuilds_yolov5n(yolo_ws, yolo_plan, tmp_path):
    doc, rebuilt = export_ort(yolo_ws, yolo_plan, tmp_path)
    assert doc["overflow_fix"] == "first_layer"
    assert set(doc["quantize_static"]["extra_options"]["TensorQuantOverrides"]) >= set(yolo_ws.builder.first_layer_weights)
    assert same_model(rebuilt, yolo_ws.build(yolo_plan))
    # without the scale/zero-point overrides, ORT's own MinMax calibration gives another model
    doc["quantize_static"]["extra_options"]["TensorQuantOverrides"] = {
        w: o for w, o in doc["quantize_static"]["extra_options"]["TensorQuantOverrides"].items() if "scale" not in o[0]}
    assert not same_model(quantize_with_exported_settings(doc, tmp_path, tmp_path / "plain.onnx"), yolo_ws.build(yolo_plan))


# ------------------------------------------------------------------ NNCF IgnoredScope
def test_ignored_scope_patterns_match_only_float_nodes():
    nodes = ["/model.2/cv1/Conv", "/model.2/cv1/act/Mul", "/model.2/m/Add", "/model.20/Conv", "/model.3/Conv",
             "/model.3/Relu", "Conv_7", "/model.9/cv1/Conv", "/model.9/cv1/Sigmoid", "/model.9/cv2/Conv"]
    floats = ["/model.2/cv1/Conv", "/model.2/cv1/act/Mul", "/model.2/m/Add", "/model.3/Conv", "Conv_7",
              "/model.9/cv1/Conv", "/model.9/cv1/Sigmoid"]
    scope = nncf_scope.ignored_scope(nodes, floats)
    matched = {n for n in nodes if n in scope["names"] or any(re.match(p, n) for p in scope["patterns"])}
    assert matched == set(floats)  # brute force over every node, as NNCF matches (names exact, patterns re.match)
    assert set(scope["patterns"]) == {re.escape("/model.2/"), re.escape("/model.9/cv1/")}
    assert scope["names"] == ["/model.3/Conv", "Conv_7"]


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes that read a dequantized tensor (activation or weight)."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(producer.get(i) == "DequantizeLinear" for i in n.input)}


def test_nncf_with_exported_scope_leaves_exactly_the_float_nodes_float(yolo_ws, yolo_plan, tmp_path):
    nncf = pytest.importorskip("nncf", reason="nncf not installed (pip install -e '.[nncf]'; it needs no torch)")
    out = tmp_path / "y.nncf.json"
    nncf_scope.write(context(yolo_ws, yolo_plan, tmp_path), out)
    doc = json.loads(out.read_text())
    model = onnx.load(str(tmp_path / doc["model"]))
    assert (tmp_path / "y.nncf.py").is_file() and doc["ignored_scope"]["patterns"]
    samples = nncf.Dataset(yolo_ws.samples(2))
    params = nncf.AdvancedQuantizationParameters(disable_bias_correction=True)

    def quantize(scope):
        return quantized_nodes(nncf.quantize(model, samples, subset_size=2, advanced_parameters=params, ignored_scope=scope))

    plain = quantize(None)
    scoped = quantize(nncf.IgnoredScope(**doc["ignored_scope"]))
    floats = set(yolo_plan.float_nodes)
    assert plain & floats, "NNCF would quantize some of the float nodes without the scope"
    assert scoped == plain - floats
