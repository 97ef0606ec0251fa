"""An NNCF `IgnoredScope` that keeps the trial's float nodes float when NNCF quantizes the model, plus a snippet.

NNCF matches `names` exactly and `patterns` with re.match (anchored at the start) against the node names of the
graph it quantizes; on the ONNX backend those are the ONNX node names, so the scope refers to the float graph
sensq quantized (written next to it as .float.onnx). A module whose every node is float becomes one pattern
(its escaped path prefix, e.g. '/model\\.24/'); the rest are listed by name. Only the float set is carried over:
NNCF chooses its own ranges and quantizes its own op set elsewhere.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .paths import sibling

CONSUMER = ("NNCF 3.x (tested 3.4.0): nncf.quantize(onnx.ModelProto, ..., ignored_scope=nncf.IgnoredScope(**scope)), "
            "ONNX backend; installs without torch")

SNIPPET = '''# NNCF 3.x, ONNX backend. Run in the folder of this file.
import json

import nncf
import onnx

scope = json.load(open({scope!r}))["ignored_scope"]
model = onnx.load({model!r})
calibration = nncf.Dataset(your_samples)  # items: {{input name: numpy array}} as the model takes them
quantized = nncf.quantize(model, calibration, ignored_scope=nncf.IgnoredScope(**scope))
onnx.save(quantized, "model.nncf.q.onnx")
'''


def _prefixes(name: str) -> list[str]:
    """'/model.24/m.0/Conv' -> ['/model.24/', '/model.24/m.0/'] (module paths, shortest first)."""
    cut = [i for i, ch in enumerate(name) if ch == "/" and i > 0]
    return [name[: i + 1] for i in cut]


def ignored_scope(all_nodes: list[str], float_nodes: list[str]) -> dict:
    """{"names", "patterns", "types", "subgraphs", "validate"}: every float node, and only float nodes, matched."""
    floats = set(float_nodes)
    covered: set[str] = set()
    patterns: list[str] = []
    for n in sorted(floats):
        if n in covered:
            continue
        for prefix in _prefixes(n):
            matched = {m for m in all_nodes if m.startswith(prefix)}
            if len(matched) >= 2 and matched <= floats:
                patterns.append(re.escape(prefix))  # re.match(escaped prefix) == startswith(prefix)
                covered |= matched
                break
    names = sorted(floats - covered)
    return {"names": names, "patterns": patterns, "types": [], "subgraphs": [], "validate": True}


def write(ctx, out: Path) -> dict:
    float_model = ctx.float_model(out)
    nodes = [n.name for n in ctx.ws.builder.model.graph.node]
    scope = ignored_scope(nodes, ctx.choice.plan.float_nodes)
    snippet = sibling(out, ".nncf.py")
    snippet.write_text(SNIPPET.format(scope=out.name, model=float_model.name))
    out.write_text(json.dumps({
        "consumer": CONSUMER, "trial": ctx.choice.number, "model": float_model.name, "ignored_scope": scope,
        "float_nodes": ctx.choice.plan.float_nodes,
        "caveats": ["the names refer to the float graph sensq quantized (model), not the original .onnx; "
                    "converted to OpenVINO IR, operations take other names",
                    "only the float set carries over: NNCF's own ranges, presets and op set decide the rest"],
    }, indent=1))
    return {"files": [out, float_model, snippet]}
