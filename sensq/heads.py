"""Detector heads: which tail of a model stays float, and why.

A detector ends in a decode tail without learned weights: sigmoid scores, grid and stride arithmetic, distribution
expectations (DFL), top-k selection, and a final Concat that puts pixel coordinates, probabilities and sometimes
class indices into one tensor. One INT8 scale cannot hold 0-640 next to 0-1 (the probabilities keep 0-2 of 256
levels), and scores below one INT8 step (1/255 of 0-1, i.e. 0.0039) vanish although mAP counts candidates down to
0.001. So the tail stays float.

Two passes, because the head kind decides the calibration preprocessing before any statistics exist:
  1. `detect_head(graph)`: Ultralytics names first (YOLOv5 `/model.N/m.i/Conv`; YOLOv8/11/26 `/model.N/cv2|cv3.*`;
     end-to-end YOLO26/YOLOv10 `one2one_cv2|cv3`), else graph structure: walk back from the outputs through ops
     without learned weights; the learned layers reached first are the head layers, everything after them is the
     tail (a softmax expectation such as DFL is decode, not a learned layer). Structure alone calls it a detector
     when several head layers meet in a tail that ends in a per-candidate output (rank >= 3) through a Concat or a
     probability op.
  2. `confirm_head(head, graph, stats)`, after calibration: the tail's Concats are checked for branches whose
     ranges differ by RANGE_RATIO or more, and its probability outputs for an INT8 step above LOW_SCORE. A tail
     found from names is always kept (the known decode); one found from structure only when the statistics show
     one of these problems. Either way the measured reason is what gets printed.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .model import Graph

log = logging.getLogger("sensq")

LEARNED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
PROBABILITY_OPS = ("Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid")
SELECTION_OPS = ("TopK", "GatherElements", "GatherND", "NonMaxSuppression", "ArgMax")
RANGE_RATIO = 16.0  # branches whose spans differ this much lose >= 4 of the 8 bits under one scale
LOW_SCORE = 1e-3  # the confidence threshold of COCO mAP evaluation: scores above it still count
INT8_LEVELS = 255

_V5_HEAD = re.compile(r"^/model\.(\d+)/m\.(\d+)/Conv$")
_V8_HEAD = re.compile(r"^/model\.(\d+)/(one2one_)?cv([23])\.(\d+)/(?:one2one_)?cv[23]\.\d+\.2/Conv$")


@dataclass
class HeadInfo:
    kind: str  # "yolov5", "yolov8" (also YOLO11/26 default export), "end2end" (YOLO26/YOLOv10 NMS-free), "detector"
    cut_tensors: list[str]  # outputs of the head layers; everything downstream stays float
    float_nodes: set[str]
    reason: str
    source: str = "names"  # "names" (Ultralytics rule) or "structure"
    evidence: list[str] = field(default_factory=list)  # what the calibration statistics showed (confirm_head)

    @property
    def layout(self) -> str | None:
        """Output layout for the COCO evaluator (evaluators/coco/decode.py), when the kind implies one."""
        return self.kind if self.kind in ("yolov5", "yolov8", "end2end") else None


def detect_head(graph: Graph) -> HeadInfo | None:
    """The decode tail to keep float: Ultralytics names first, else graph structure (see the module docstring)."""
    return ultralytics_head(graph) or structural_head(graph)


detect_yolo_head = detect_head  # the name callers used when only Ultralytics heads were recognised


# --------------------------------------------------------------------------------------------- Ultralytics names
def ultralytics_head(graph: Graph) -> HeadInfo | None:
    names = list(graph.nodes)
    v8 = [(int(m.group(1)), n, bool(m.group(2))) for n in names if (m := _V8_HEAD.match(n))]
    v5 = [(int(m.group(1)), n, False) for n in names if (m := _V5_HEAD.match(n))]
    for family, hits in (("yolov8", v8), ("yolov5", v5)):
        if not hits:
            continue
        top = max(i for i, _, _ in hits)
        convs = sorted(n for i, n, _ in hits if i == top)
        cut = [graph.nodes[n].output[0] for n in convs]
        region = graph.downstream(cut)
        if not _reaches_outputs(graph, region):
            continue
        end2end = any(o2o for i, _, o2o in hits if i == top) or _has_selection(graph, region)
        kind = "end2end" if family == "yolov8" and end2end else family
        return HeadInfo(kind, cut, region, _name_reason(kind, f"/model.{top}", len(convs), graph, region), "names")
    return None


def _name_reason(kind: str, module: str, n_convs: int, graph: Graph, region: set[str]) -> str:
    if kind == "yolov5":
        return (f"YOLOv5 Detect decode after {module}/m.{{0..{n_convs - 1}}}/Conv: its final Concat mixes pixel "
                "coordinates (0-640) with probabilities (0-1), which one INT8 scale cannot hold")
    if kind == "yolov8":
        dfl = "DFL softmax, " if any(graph.nodes[n].op_type == "Softmax" for n in region) else ""
        return (f"YOLOv8/11/26 Detect decode after the {module}/cv2.* (box) and {module}/cv3.* (class) branches: "
                f"{dfl}anchors and the final Concat of pixel coordinates with probabilities stay float")
    ops = sorted({graph.nodes[n].op_type for n in region} & set(SELECTION_OPS))
    return (f"end-to-end (NMS-free) YOLO26/YOLOv10 head after the {module}/one2one_cv2.* (box) and one2one_cv3.* "
            f"(class) branches: decode, top-k selection ({', '.join(ops) or 'none'}: indices must not pass through "
            "Q/DQ) and the final Concat of pixel corners, scores and class indices stay float")


HEAD_LAYERS_REASON = (
    "detector head layers ({n} convs feeding the float decode): one INT8 scale for their outputs rounds box offsets, "
    "objectness and class logits together just before they are dequantized (yolov5n: +0.0073 mAP50-95 [+0.0036, "
    "+0.0121] kept float, docs/benchmarks.md); --head-layers int8 quantizes them")


def head_layer_nodes(graph: Graph, head: HeadInfo) -> set[str]:
    """The learned layers whose outputs the decode tail reads (the head's cut tensors' producers)."""
    return {graph.producer[t].name for t in head.cut_tensors if t in graph.producer}


# ----------------------------------------------------------------------------------------------- graph structure
def _constant_tensors(graph: Graph) -> set[str]:
    return graph.initializers | {o for n in graph.nodes.values() if n.op_type == "Constant" for o in n.output}


def _is_expectation(graph: Graph, node) -> bool:
    """A weighted layer applied to a softmax (through shape-only ops) computes an expectation: DFL's integral."""
    t = node.input[0] if node.input else ""
    while (p := graph.producer.get(t)) is not None and p.op_type in SHAPE_OPS:
        t = p.input[0]
    return p is not None and p.op_type == "Softmax"


def head_layers(graph: Graph) -> tuple[list, set[str]]:
    """(head layers, tail nodes): walking back from the outputs through ops without learned weights, the learned
    layers (Conv/Gemm/MatMul with a constant weight) reached first, and the nodes walked through."""
    constants = _constant_tensors(graph)
    heads, tail, seen = [], set(), set()
    stack = list(reversed(graph.outputs))
    while stack:
        node = graph.producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        learned = node.op_type in LEARNED_OPS and len(node.input) > 1 and node.input[1] in constants
        if learned and not _is_expectation(graph, node):
            heads.append(node)
            continue
        if node.op_type != "Constant":
            tail.add(node.name)
        stack.extend(x for x in reversed(node.input) if x and x not in constants)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(heads, key=lambda n: order[n.name]), tail


def structural_head(graph: Graph) -> HeadInfo | None:
    heads, tail = head_layers(graph)
    if len(heads) < 2 or not tail:
        return None
    shapes = graph.shapes()
    if not any(len(shapes.get(o, [])) == 3 for o in graph.outputs):
        return None  # classifier logits (rank 2) or maps (rank 4); a detector emits [batch, candidates, fields]
    ops = {graph.nodes[n].op_type for n in tail}
    if not (ops & ({"Concat"} | set(PROBABILITY_OPS) | set(SELECTION_OPS))):
        return None
    cut = [n.output[0] for n in heads]
    region = graph.downstream(cut)
    if not _reaches_outputs(graph, region):
        return None
    kind = "end2end" if _has_selection(graph, region) else "detector"
    first, last = heads[0].name, heads[-1].name
    reason = (f"detection decode found from graph structure after {len(heads)} head layers ({first} .. {last}): "
              f"{len(region)} weight-free nodes ({', '.join(sorted(ops & _NOTABLE))}) lead to the outputs")
    return HeadInfo(kind, cut, region, reason, "structure")


_NOTABLE = {"Concat", "Split", "Slice", *PROBABILITY_OPS, *SELECTION_OPS, "Mul", "Add", "Pow"}


def _reaches_outputs(graph: Graph, region: set[str]) -> bool:
    return bool(region) and bool(set(graph.outputs) & {o for n in region for o in graph.nodes[n].output})


def _has_selection(graph: Graph, region: set[str]) -> bool:
    return any(graph.nodes[n].op_type in ("TopK", "NonMaxSuppression") for n in region)


# ------------------------------------------------------------------------------------------ statistics (pass 2)
def tail_findings(graph: Graph, region: set[str], tensors: dict) -> list[str]:
    """Measured reasons to keep `region` float, from calibration statistics {tensor: TensorStats (min, max)}."""
    findings = []
    worst = None
    for name in sorted(region, key=list(graph.nodes).index):
        node = graph.nodes[name]
        if node.op_type == "Concat":
            spans = []
            for x in node.input:
                st = tensors.get(x)
                if st is None or not (st.max >= st.min):
                    if x in graph.producer and x not in tensors:
                        spans.append((x, None))  # not a float tensor: integer indices
                    continue
                spans.append((x, max(abs(float(st.min)), abs(float(st.max)))))
            floats = [s for _, s in spans if s]
            if any(s is None for _, s in spans) and floats:
                findings.append(f"{name} joins integer indices with float values")
            if len(floats) >= 2 and min(floats) > 0:
                ratio = max(floats) / min(floats)
                if ratio >= RANGE_RATIO and (worst is None or ratio > worst[0]):
                    worst = (ratio, name, min(floats), max(floats))
        elif node.op_type in PROBABILITY_OPS:
            st = tensors.get(node.output[0])
            if st is not None and 0 <= st.min and st.max <= 1.0 + 1e-6:
                step = (float(st.max) - min(float(st.min), 0.0)) / INT8_LEVELS
                if step > LOW_SCORE and not any(f.startswith("probabilities") for f in findings):
                    findings.append(f"probabilities ({name}) would lose every score below one INT8 step ({step:.4f}), "
                                    f"above the {LOW_SCORE:g} threshold detection metrics count down to")
    if worst:
        ratio, name, lo, hi = worst
        findings.insert(0, f"{name} joins branches spanning |x| <= {lo:.3g} and <= {hi:.3g} ({ratio:.0f}x: one INT8 "
                           f"scale leaves the small branch {max(0, int(INT8_LEVELS / ratio))} levels)")
    return findings


def confirm_head(head: HeadInfo | None, graph: Graph, tensors: dict) -> HeadInfo | None:
    """Pass 2: attach what the statistics show; drop a structural tail they do not support."""
    if head is None:
        return None
    findings = tail_findings(graph, head.float_nodes, tensors)
    head.evidence = findings
    if findings:
        head.reason = f"{head.reason}; measured: {'; '.join(findings)}"
        return head
    if head.source == "names":
        return head
    log.info("the tail after %s looked like a detection decode, but its branches have similar ranges and no "
             "probabilities: it is quantized", ", ".join(head.cut_tensors[:3]))
    return None
