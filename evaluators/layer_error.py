"""Per-layer quantization error: cumulative (graphwise) and isolated (layerwise), as PPQ's analyse/ does.

cumulative  every quantized tensor of the fully quantized model against the same tensor of the float model, on the
            same inputs; errors accumulate through the graph (what xquant's report shows).
isolated    one layer (or group) quantized at a time, everything else float; the error is measured where the
            quantized region ends (`region_outputs`: the inputs of a float head such as a detector's decode, else the
            model outputs), so each row is that layer's own contribution, not drowned in decoded box pixels.

Measures are aggregated over samples as totals: SNR = sum||q-f||^2 / sum||f||^2, Cosine over the concatenation.
F.Hist is the 32-bin histogram of the float values (computed on up to HIST_SAMPLE values per tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pandas as pd
from onnx import numpy_helper
from tqdm import tqdm

from sensq.evaluators import measure
from sensq.passes.float_shield import shield_float_nodes
from sensq.runtime import make_session
from sensq.statistics import augmented_model

HIST_SAMPLE = 1 << 16
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ErrorAccumulator:
    """Streaming totals for one (quantized, float) tensor pair across samples."""

    noise: float = 0.0
    signal: float = 0.0
    dot: float = 0.0
    qq: float = 0.0
    n: int = 0
    qmin: float = np.inf
    qmax: float = -np.inf
    fmin: float = np.inf
    fmax: float = -np.inf
    fsample: list = field(default_factory=list)

    def add(self, q: np.ndarray, f: np.ndarray) -> None:
        # float32 BLAS dots (accumulated per call into Python floats): float64 copies cost 4x more on 640x640 maps
        dtype = np.float64 if np.size(f) < 65536 else np.float32
        q = np.asarray(q, dtype).reshape(-1)
        f = np.asarray(f, dtype).reshape(-1)
        d = q - f
        self.noise += float(np.dot(d, d))
        self.signal += float(np.dot(f, f))
        self.dot += float(np.dot(q, f))
        self.qq += float(np.dot(q, q))
        self.n += f.size
        self.qmin, self.qmax = min(self.qmin, float(q.min())), max(self.qmax, float(q.max()))
        self.fmin, self.fmax = min(self.fmin, float(f.min())), max(self.fmax, float(f.max()))
        step = max(1, -(-f.size // HIST_SAMPLE))
        self.fsample.append(f[::step])

    def row(self) -> dict:
        if self.signal == 0:
            ratio = 0.0 if self.noise == 0 else float("inf")
        else:
            ratio = self.noise / self.signal
        if self.qq == 0 and self.signal == 0:
            cos = 1.0
        elif self.qq == 0 or self.signal == 0:
            cos = 0.0
        else:
            cos = self.dot / np.sqrt(self.qq * self.signal)
        return {"SNR": ratio, "SQNR_dB": measure.sqnr_db(ratio), "MSE": self.noise / max(self.n, 1), "Cosine": float(cos),
                "Q.MinMax": (self.qmin, self.qmax), "F.MinMax": (self.fmin, self.fmax),
                "F.Hist": measure.histogram32(np.concatenate(self.fsample)) if self.fsample else [0] * 32}


def quantized_tensor_map(qmodel: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, onnx.NodeProto]]:
    """Original activation name -> the dequantized tensor consumers see in the QDQ model; and weight DQ nodes."""
    float_tensors = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    inits = {i.name for i in qmodel.graph.initializer}
    acts, weights = {}, {}
    for node in qmodel.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in inits:
            weights[node.output[0]] = node
            continue
        q = producer.get(src)
        if q is None or q.op_type != "QuantizeLinear":
            continue
        original = node.output[0] if node.output[0] in float_tensors else q.input[0]
        if original in float_tensors and original not in acts:
            acts[original] = node.output[0]
    return acts, weights


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.name}[{node.op_type}]"


def _dequantize_initializer(inits: dict, dq: onnx.NodeProto) -> np.ndarray:
    x = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (x - zp) * scale


def cumulative_errors(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, feeds: list[dict], progress: bool = True,
                      threads: int | None = None) -> pd.DataFrame:
    """One row per quantized tensor (activations in graph order, then weights), xquant's columns."""
    acts, weight_dqs = quantized_tensor_map(qmodel, float_model)
    order = [o for n in float_model.graph.node for o in n.output if o in acts]
    order = [i.name for i in float_model.graph.input if i.name in acts] + order
    fsess = make_session(augmented_model(float_model, order), threads=threads)
    qsess = make_session(augmented_model(qmodel, [acts[t] for t in order]), threads=threads)
    f_names = [o.name for o in fsess.get_outputs()]
    q_names = [o.name for o in qsess.get_outputs()]
    acc = {t: ErrorAccumulator() for t in order}
    for feed in tqdm(feeds, desc="cumulative error", unit="img", disable=not progress, leave=False):
        fout = dict(zip(f_names, fsess.run(f_names, feed)))
        fout.update(feed)
        qout = dict(zip(q_names, qsess.run(q_names, feed)))
        for t in order:
            acc[t].add(qout[acts[t]], fout[t])
    producer = {o: n for n in float_model.graph.node for o in n.output}
    rows = []
    for t in order:
        node = producer.get(t)
        rows.append({"Op": _node_label(node) if node is not None else f"{t}[Input]", "Var": t, **acc[t].row()})
    # Weights: dequantized values against the float initializers (no inference needed).
    float_inits = {i.name: i for i in float_model.graph.initializer}
    q_inits = {i.name: i for i in qmodel.graph.initializer}
    consumers = {}
    for n in qmodel.graph.node:
        for x in n.input:
            consumers.setdefault(x, n)
    for dq_out, dq in weight_dqs.items():
        name = dq.input[0]
        base = name[: -len("_quantized")] if name.endswith("_quantized") else name
        if base not in float_inits:
            continue
        f = numpy_helper.to_array(float_inits[base])
        q = _dequantize_initializer(q_inits, dq)
        if q.shape != f.shape:
            continue
        a = ErrorAccumulator()
        a.add(q, f)
        node = consumers.get(dq_out)
        rows.append({"Op": _node_label(node) if node is not None else base, "Var": f"{base}[Constant]", **a.row()})
    return pd.DataFrame(rows)


def output_errors(float_outputs: list[list[np.ndarray]], q_outputs: list[list[np.ndarray]]) -> dict:
    """SNR and cosine over all samples and all tensors given (per sample: one array per tensor, same order)."""
    a = ErrorAccumulator()
    for fo, qo in zip(float_outputs, q_outputs):
        for f, q in zip(fo, qo):
            a.add(q, f)
    r = a.row()
    return {"Output SNR": r["SNR"], "Output SQNR_dB": r["SQNR_dB"], "Output Cosine": r["Cosine"]}


def float_tail(model: onnx.ModelProto, float_nodes) -> set[str]:
    """Float nodes whose every consumer is float too, up to the model outputs: the float head (a decode) that
    takes over where the quantized region ends. Float nodes in the middle of the graph are not part of it."""
    floating = set(float_nodes)
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n.name)
    tail: set[str] = set()
    for n in reversed(model.graph.node):  # consumers come later in topological order
        if n.name in floating and all(c in tail for o in n.output for c in consumers.get(o, [])):
            tail.add(n.name)
    return tail


def region_outputs(model: onnx.ModelProto, float_nodes=()) -> list[str]:
    """Float tensors where the quantized region ends: inputs of the float tail (see `float_tail`) computed outside it,
    and model outputs computed outside it. Without a float tail these are the model outputs.

    For a YOLOv5 whose decode is kept float these are the three detection convs' outputs (/model.24/m.{0,1,2}/Conv),
    i.e. box, objectness and class logits on their own scale, instead of decoded boxes in pixels (0-640) that
    outweigh the class scores in 1x25200x85. (Those convs are float head layers by default; callers pass the float
    nodes without them, Workspace.probe_float_nodes, so that the error is read after them.)
    """
    tail = float_tail(model, float_nodes)
    inferred = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in
              list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    computed = {o: n for n in model.graph.node if n.name not in tail and n.op_type != "Constant" for o in n.output}
    out = [x for n in model.graph.node if n.name in tail for x in n.input if x in computed]
    out += [o.name for o in model.graph.output if o.name in computed]
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    out = [t for t in dict.fromkeys(out) if dtypes.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
    return sorted(out, key=order.__getitem__)


class RegionErrorProbe:
    """Error of a QDQ model against the float model at fixed tensors (default: `region_outputs`), on fixed samples.

    The float reference is computed once; each call runs one QDQ model. What a QDQ model's consumers see of a
    tensor is its dequantized value, so a tensor quantized in that model is read after its DequantizeLinear.

        probe = RegionErrorProbe(ws.builder.model, ws.probe_float_nodes(), ws.samples(8))
        probe(ws.build(plan))  # {"Output SNR": ..., "Output SQNR_dB": ..., "Output Cosine": ..., "per_tensor": {...}}
    """

    def __init__(self, float_model: onnx.ModelProto, float_nodes=(), feeds: list[dict] = (), tensors: list[str] | None = None,
                 threads: int | None = None):
        self.float_model = float_model
        self.tensors = list(tensors) if tensors is not None else region_outputs(float_model, float_nodes)
        self.feeds = list(feeds)
        self.threads = threads
        fsess = make_session(augmented_model(float_model, self.tensors), threads=threads)
        self.reference = [fsess.run(self.tensors, feed) for feed in self.feeds]

    def quantized_values(self, qmodel: onnx.ModelProto) -> list[list[np.ndarray]]:
        acts, _ = quantized_tensor_map(qmodel, self.float_model)
        names = [acts.get(t, t) for t in self.tensors]
        qsess = make_session(augmented_model(qmodel, list(dict.fromkeys(names))), threads=self.threads)
        return [qsess.run(names, feed) for feed in self.feeds]

    def __call__(self, qmodel: onnx.ModelProto) -> dict:
        """{"Output SNR", "Output SQNR_dB", "Output Cosine"} over all tensors and samples, and "per_tensor":
        {tensor: SNR} (SNR = ||q-f||^2 / ||f||^2, lower is better)."""
        accs = [ErrorAccumulator() for _ in self.tensors]
        for f, q in zip(self.reference, self.quantized_values(qmodel)):
            for acc, fi, qi in zip(accs, f, q):
                acc.add(qi, fi)
        total = ErrorAccumulator(**{k: sum(getattr(a, k) for a in accs) for k in ("noise", "signal", "dot", "qq", "n")})
        r = total.row()
        return {"Output SNR": r["SNR"], "Output SQNR_dB": r["SQNR_dB"], "Output Cosine": r["Cosine"],
                "per_tensor": {t: a.row()["SNR"] for t, a in zip(self.tensors, accs)}}


def region_output_errors(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, feeds: list[dict], float_nodes=(),
                         tensors: list[str] | None = None) -> dict:
    """One-off `RegionErrorProbe`: error of qmodel where the quantized region ends (or at `tensors`)."""
    return RegionErrorProbe(float_model, float_nodes, feeds, tensors)(qmodel)


def isolated_errors(builder, base_plan, units: dict[str, list[str]], feeds: list[dict], float_model: onnx.ModelProto,
                    progress: bool = True, threads: int | None = None, tensors: list[str] | None = None) -> pd.DataFrame:
    """Quantize one unit (a node or a group of nodes) at a time; measure the error where the quantized region of
    `base_plan` ends (`region_outputs`, or the given `tensors`).

    `units` maps a label to node names; every other node stays float. Statistics are the cached ones (no calibration).
    """
    probe = RegionErrorProbe(float_model, base_plan.float_nodes, feeds, tensors, threads)
    all_nodes = set(builder.node_names)
    nodes = {n.name: n for n in float_model.graph.node}
    rows = []
    for label, members in tqdm(units.items(), desc="isolated error", unit="layer", disable=not progress, leave=False):
        plan = base_plan.with_float(all_nodes - set(members))
        qmodel = builder.build(plan)
        shield_float_nodes(qmodel, plan.float_nodes)  # else ORT re-quantizes the float convs' weights per tensor
        errors = probe(qmodel)
        errors.pop("per_tensor")
        first = nodes.get(members[0])
        rows.append({"Op": _node_label(first) if len(members) == 1 and first is not None else f"{label}[{len(members)} nodes]",
                     "Var": first.output[0] if len(members) == 1 and first is not None else label, **errors})
    return pd.DataFrame(rows)


def compute_units(graph, plan, by: str = "node", depth: int = 1, op_types=COMPUTE_OPS) -> dict[str, list[str]]:
    """Quantizable units for the isolated view: each compute node, or layer groups (module prefixes when node names
    carry them, else graph structure; see sensq.grouping)."""
    from sensq.grouping import layer_groups

    floating = set(plan.float_nodes)
    names = [n for n, node in graph.nodes.items() if n not in floating and (by == "group" or node.op_type in op_types)]
    if by == "node":
        return {n: [n] for n in names}
    return layer_groups(graph, names, "auto", depth)
