"""A TensorRT 10 `trtexec` command that builds the trial as an engine: the QDQ model (explicit quantization) with each
float layer pinned to the precision the plan gave it by `--precisionConstraints=obey --layerPrecisions=...`: fp32
groups to fp32 (what the study measured), fp16 groups to fp16 (kept float32 in the ONNX file: TensorRT casts them).

Flag grammar (trtexec of TensorRT 10, samples/common/sampleOptions.cpp): `--key=value` splits at the first '=';
--layerPrecisions is split at every ',' (no escape exists), each pair at its last ':' into layer name and precision
(or, when it contains single quotes, exactly two of them: 'name':precision), all remaining single quotes are
removed from the name, and a name matches a layer exactly or, when it contains '*', by prefix*suffix around its
first '*'. The ONNX parser names each layer after its ONNX node, so node names are layer names. A node name
with ',', a single quote or '*' is written as a prefix*suffix pattern, but only when that pattern matches no
quantized layer; otherwise it is reported as not expressible.

TensorRT takes only symmetric int8 Q/DQ (zero point 0): a trial scored for another target (uint8 activations for
ort-cpu/openvino-cpu) is rebuilt with the same float nodes for the tensorrt target, and the file says so.
"""
from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from ..targets import get_target
from .paths import save_model, sibling

CONSUMER = "trtexec of TensorRT 10.x (flag grammar of sampleOptions.cpp in 10.0-10.x; --int8 --fp16 are build flags there)"
SPECIAL = (",", "'", "*")  # characters the --layerPrecisions grammar cannot carry inside a layer name


def layer_token(name: str, all_layers: list[str], float_layers: set[str]) -> str | None:
    """How `name` is written in --layerPrecisions, or None when the grammar cannot express it safely (a pattern
    must match only layers of `float_layers`: those pinned to the same precision)."""
    hits = [i for i, ch in enumerate(name) if ch in SPECIAL]
    if not hits and name:
        return name  # ':' and '=' are fine: the pair splits at its last ':', the flag at its first '='
    if not name:
        return None
    pattern_prefix, pattern_suffix = name[: hits[0]], name[hits[-1] + 1:]
    if not pattern_prefix and not pattern_suffix:
        return None  # "*" alone is trtexec's global precision
    matched = [n for n in all_layers if len(n) >= len(pattern_prefix) + len(pattern_suffix)
               and n.startswith(pattern_prefix) and n.endswith(pattern_suffix)]
    if any(n not in float_layers for n in matched):
        return None
    return f"{pattern_prefix}*{pattern_suffix}"


def layer_precisions(pinned: dict[str, str], all_layers: list[str]) -> tuple[str, list[str]]:
    """(value of --layerPrecisions for {node name: precision}, node names it cannot express)."""
    tokens, unexpressed = [], []
    for n, precision in pinned.items():
        tok = layer_token(n, all_layers, {m for m, p in pinned.items() if p == precision})
        if tok is None:
            unexpressed.append(n)
        elif f"{tok}:{precision}" not in tokens:
            tokens.append(f"{tok}:{precision}")
    return ",".join(tokens), unexpressed


def command(onnx_name: str, float_nodes: list[str] | dict[str, str], all_layers: list[str], precision: str = "fp32",
            engine_name: str | None = None) -> tuple[list[str], list[str]]:
    """(trtexec argv, unexpressed node names). float_nodes: names (all pinned to `precision`) or {name: precision}."""
    argv = ["trtexec", f"--onnx={onnx_name}", "--int8", "--fp16", "--precisionConstraints=obey"]
    pinned = float_nodes if isinstance(float_nodes, dict) else {n: precision for n in float_nodes}
    spec, unexpressed = layer_precisions(pinned, all_layers)
    if spec:
        argv.append(f"--layerPrecisions={spec}")
    if engine_name:
        argv.append(f"--saveEngine={engine_name}")
    return argv, unexpressed


def script(argv: list[str], comments: list[str]) -> str:
    """A POSIX shell script running `argv` from the script's own folder (file names in argv are relative to it)."""
    comments = [" ".join(c.splitlines()) for c in comments]  # a newline in a node name must not end the comment
    lines = ["#!/bin/sh", *[f"# {c}" for c in comments], 'cd "$(dirname "$0")" || exit 1',
             "exec " + " \\\n  ".join(shlex.quote(a) for a in argv), ""]
    return "\n".join(lines)


def tensorrt_plan(plan):
    """The plan as TensorRT can run it: same float nodes, symmetric int8 (the tensorrt target's rules)."""
    target = get_target(plan.target, plan.activation_type)
    if target.name == "tensorrt" and target.activation_symmetric and target.activation_type == "int8":
        return plan, None
    note = (f"the trial's plan (target {plan.target}) uses {target.activation_type} "
            f"{'symmetric' if target.activation_symmetric else 'asymmetric'} activations, which TensorRT does not take: "
            "the model for trtexec is rebuilt with the same float nodes for the tensorrt target (symmetric int8), "
            "so its accuracy was not scored by the study (run `sensq search --target tensorrt` to score it)")
    return replace(plan, target="tensorrt", activation_type=None, overflow_fix=None), note


def write(ctx, out: Path) -> dict:
    plan, note = tensorrt_plan(ctx.choice.plan)
    model_path = sibling(out, ".trt.q.onnx")
    # the builder's graph as onnxruntime's quantizer writes it: TensorRT needs no protection of float nodes against
    # onnxruntime's weight re-quantization, and takes no per-axis activation scales. fp16 groups stay float32 in the
    # file (no Cast islands): TensorRT runs them in fp16 because --layerPrecisions says so.
    pinned = {**{n: "fp32" for n in plan.float_nodes}, **{n: "fp16" for n in plan.fp16_nodes}}
    plan = replace(plan, float_nodes=sorted(pinned), fp16_nodes=[])
    qmodel = ctx.ws.builder.build(plan)
    save_model(qmodel, model_path)
    layers = [n.name for n in qmodel.graph.node]
    argv, unexpressed = command(model_path.name, pinned, layers, engine_name=sibling(out, ".engine").name)
    notes = [note] if note else []
    if unexpressed:
        notes.append(f"{len(unexpressed)} float node(s) cannot be written in --layerPrecisions (names with , ' or * "
                     f"whose pattern would also match quantized layers): {unexpressed[:5]}")
    header = [f"sensq export: trial {ctx.choice.number} of {ctx.workdir.name} for {CONSUMER}.",
              f"{sum(p == 'fp32' for p in pinned.values())} float node(s) pinned to fp32, "
              f"{sum(p == 'fp16' for p in pinned.values())} to fp16, as the plan's group precisions say.",
              *[f"note: {n}" for n in notes]]
    out.write_text(script(argv, header))
    out.chmod(0o755)
    return {"files": [out, model_path], "notes": notes, "argv": argv}
