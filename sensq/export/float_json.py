"""The trial's float nodes as plain JSON, for tools of your own (schema "sensq-float-nodes" version 1)."""
from __future__ import annotations

import json
from pathlib import Path

CONSUMER = "any JSON reader; schema sensq-float-nodes v1: {float_nodes: [node name], float_groups, a16_nodes (16-bit activations), fp16_nodes (float16), target, trial, notes}"


def write(ctx, out: Path) -> dict:
    c = ctx.choice
    out.write_text(json.dumps({
        "schema": "sensq-float-nodes", "version": 1, "trial": c.number, "target": c.plan.target,
        "float_nodes": c.plan.float_nodes, "a16_nodes": c.plan.a16_nodes,
        "fp16_nodes": c.plan.fp16_nodes, "float_groups": c.attrs.get("float_groups", []),
        "node_names": "as in the graph sensq quantized (onnxslim-simplified, unnamed nodes named <op>_<index>); "
                      "export --format ort-exclude or nncf writes that graph as .float.onnx",
        "notes": c.plan.notes,
    }, indent=1))
    return {"files": [out]}
