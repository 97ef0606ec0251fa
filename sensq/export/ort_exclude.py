"""onnxruntime `quantize_static` settings that reproduce the trial's model, node for node.

Everything sensq decides is expressed in quantize_static's own arguments: the float nodes (nodes_to_exclude), the
target's op types, activation/weight types and symmetry, per-channel weights, 7-bit weights (reduce_range for
overflow_fix "all"; TensorQuantOverrides reduce_range on first-layer weights for "first_layer"), and sensq's
activation ranges as TensorQuantOverrides scale/zero_point per tensor (ORT's calibrators cannot compute sensq's
percentile/KL/MSE ranges, so the ranges are frozen into the overrides instead). What remains outside the settings
is listed in the file under "caveats".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..targets import get_target

CONSUMER = "onnxruntime.quantization.quantize_static, onnxruntime 1.20-1.32 (tested 1.31.1, 1.32.0), quant_format QDQ"

SNIPPET = '''# run in the folder of this file (model_input is relative to it)
import json
import numpy as np
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

doc = json.load(open({settings!r}))
s = doc["quantize_static"]
zp_type = np.uint8 if s["activation_type"] == "QUInt8" else np.int8
extra = dict(s["extra_options"])
extra["TensorQuantOverrides"] = {{
    name: [{{k: (np.array(v, np.float32) if k == "scale" else np.array(v, zp_type) if k == "zero_point" else v) for k, v in o.items()}}
           for o in overrides]
    for name, overrides in s["extra_options"]["TensorQuantOverrides"].items()}}
quantize_static(
    s["model_input"], "model.ort.q.onnx",
    calibration_data_reader=your_reader,  # any CalibrationDataReader: the overrides fix every activation range
    quant_format=QuantFormat.QDQ, per_channel=s["per_channel"], reduce_range=s["reduce_range"],
    activation_type=QuantType[s["activation_type"]], weight_type=QuantType[s["weight_type"]],
    nodes_to_exclude=s["nodes_to_exclude"], op_types_to_quantize=s["op_types_to_quantize"],
    calibrate_method=CalibrationMethod[s["calibrate_method"]], extra_options=extra)
if doc["post_processing"]["shielded_float_nodes"]:  # as sensq built it (see "post_processing")
    import onnx
    from sensq.passes.float_shield import shield_float_nodes

    model = onnx.load("model.ort.q.onnx")
    shield_float_nodes(model, s["nodes_to_exclude"])
    onnx.save(model, "model.ort.q.onnx")
'''


def _dq_axis(model: onnx.ModelProto, scale_name: str) -> int | None:
    """Axis of the DequantizeLinear that uses `scale_name` when it is per-channel, else None."""
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] == scale_name:
            return next((a.i for a in n.attribute if a.name == "axis"), 1)  # ONNX default axis is 1
    return None


def tensor_overrides(ws, qmodel: onnx.ModelProto, first_layer_7bit: bool) -> tuple[dict, list[str]]:
    """TensorQuantOverrides reproducing `qmodel`: activations by their scale/zero point (as written by ORT's
    quantizer, `<tensor>_scale`/`<tensor>_zero_point`), first-layer weights by reduce_range (and their axis when
    the built model quantized them per channel)."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    weights = {i.name for i in ws.builder.model.graph.initializer}
    overrides, skipped = {}, []
    for t in ws.stats.tensors:
        s, z = inits.get(f"{t}_scale"), inits.get(f"{t}_zero_point")
        if t in weights or s is None or z is None:
            continue  # not quantized in this plan
        scale, zero = numpy_helper.to_array(s), numpy_helper.to_array(z)
        if scale.size != 1:
            skipped.append(t)
            continue
        overrides[t] = [{"scale": float(np.float32(scale.reshape(()))), "zero_point": int(zero.reshape(()))}]
    if first_layer_7bit:
        for w in ws.builder.first_layer_weights:
            scale = inits.get(f"{w}_scale")
            if scale is None:
                continue  # its layer is float in this plan
            o = {"reduce_range": True}
            axis = _dq_axis(qmodel, scale.name)
            if len(scale.dims) and scale.dims[0] > 1 and axis is not None:
                o["axis"] = axis
            overrides[w] = [o]
    return overrides, skipped


def shielded_float_nodes(qmodel: onnx.ModelProto, float_nodes) -> list[str]:
    """Float nodes that read a quantized activation through a per-axis DequantizeLinear: sensq's guard against
    onnxruntime (>= 1.21, WeightBiasQuantization) re-quantizing their weights. quantize_static does not write it."""
    floats = set(float_nodes)
    inits = {i.name: i for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    out = []
    for n in qmodel.graph.node:
        dq = producer.get(n.input[0]) if n.name in floats and n.input else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2 or dq.input[1] not in inits:
            continue
        source = producer.get(dq.input[0])
        if int(np.prod(inits[dq.input[1]].dims)) > 1 and source is not None and source.op_type == "QuantizeLinear":
            out.append(n.name)
    return sorted(out)


def settings(ws, plan, float_model: str, qmodel=None) -> dict:
    target = get_target(plan.target, plan.activation_type)
    fix = plan.overflow_fix or target.overflow_fix
    qmodel = ws.build(plan) if qmodel is None else qmodel
    overrides, skipped = tensor_overrides(ws, qmodel, fix == "first_layer")
    qs = {
        "model_input": float_model,
        "quant_format": "QDQ",
        "per_channel": plan.per_channel,
        "reduce_range": fix == "all",
        "activation_type": "QUInt8" if target.activation_type == "uint8" else "QInt8",
        "weight_type": "QInt8",
        "nodes_to_exclude": list(plan.float_nodes),
        "op_types_to_quantize": list(target.resolved_op_types()),
        "calibrate_method": "MinMax",
        "extra_options": {"ActivationSymmetric": target.activation_symmetric, "WeightSymmetric": True,
                          "QuantizeBias": target.quantize_bias, "TensorQuantOverrides": overrides,
                          **({"OpTypesToExcludeOutputQuantization": list(target.no_output_quantization)}
                             if target.no_output_quantization else {})},
    }
    caveats = [
        "model_input is the float graph sensq quantized (onnxslim-simplified, opset >= 13, unnamed nodes named "
        "<op>_<index>); the node names refer to it, not to the original .onnx",
        f"activation ranges are sensq's (method {plan.method}"
        + (f", percentile {plan.percentile}" if plan.method == "percentile" else "")
        + ") frozen as TensorQuantOverrides scale/zero_point; ORT's calibrators cannot recompute them, and new "
          "calibration data does not change them",
        "quantize_static still requires a calibration_data_reader; with the overrides any one sample gives the same model",
        "JSON has no numpy types: pass scale as a 0-d numpy.float32 array and zero_point as a 0-d numpy.uint8 (QUInt8) "
        "or numpy.int8 (QInt8) array, as in the snippet",
    ]
    if skipped:
        caveats.append(f"{len(skipped)} activation tensor(s) with non-scalar scales are not overridden: {skipped[:5]}")
    shielded = shielded_float_nodes(qmodel, plan.float_nodes)
    post = {"shielded_float_nodes": shielded,
            "why": "onnxruntime >= 1.21 quantizes the float weights of a Conv/ConvTranspose/Gemm that reads a "
                   "per-tensor DequantizeLinear (optimizer WeightBiasQuantization), so such a float node would run "
                   "int8 after all; sensq reads their input through a per-axis DequantizeLinear with the same values",
            "how": "sensq.passes.float_shield.shield_float_nodes(model, nodes_to_exclude) on quantize_static's output (as in the "
                   "snippet), or create the session with disabled_optimizers=['WeightBiasQuantization']"}
    if shielded:
        caveats.append(f"quantize_static cannot express the guard on {len(shielded)} float node(s): see post_processing")
    return {"consumer": CONSUMER, "target": target.name, "overflow_fix": fix, "quantize_static": qs,
            "post_processing": post,
            "reproduces": "the scored .q.onnx, node for node (node order may differ), after post_processing",
            "caveats": caveats}


def write(ctx, out: Path) -> dict:
    qmodel = ctx.scored_model()  # checked against the trial's hash before anything is written
    float_model = ctx.float_model(out)
    doc = settings(ctx.ws, ctx.choice.plan, float_model.name, qmodel)
    doc["trial"] = ctx.choice.number
    doc["snippet"] = SNIPPET.format(settings=out.name)
    out.write_text(json.dumps(doc, indent=1))
    return {"files": [out, float_model]}
