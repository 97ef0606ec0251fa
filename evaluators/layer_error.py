"""Per-layer quantization error: cumulative (graphwise) and isolated (layerwise), as PPQ's analyse/ does.

cumulative  every quantized tensor of the fully quantized model against the same tensor of the float model, on the
            same inputs; errors accumulate through the graph (what xquant's report shows).
isolated    one layer (or group) quantized at a time, everything else float; the error is measured at the model
            outputs, so each row is that layer's own contribution.

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
    """SNR and cosine at the model outputs over all samples and outputs."""
    a = ErrorAccumulator()
    for fo, qo in zip(float_outputs, q_outputs):
        for f, q in zip(fo, qo):
            a.add(q, f)
    r = a.row()
    return {"Output SNR": r["SNR"], "Output SQNR_dB": r["SQNR_dB"], "Output Cosine": r["Cosine"]}


def isolated_errors(builder, base_plan, units: dict[str, list[str]], feeds: list[dict], float_model: onnx.ModelProto,
                    progress: bool = True, threads: int | None = None) -> pd.DataFrame:
    """Quantize one unit (a node or a group of nodes) at a time; measure the error at the model outputs.

    `units` maps a label to node names; every other node stays float. Statistics are the cached ones (no calibration).
    """
    fsess = make_session(float_model, threads=threads)
    out_names = [o.name for o in fsess.get_outputs()]
    float_outputs = [fsess.run(out_names, feed) for feed in feeds]
    all_nodes = set(builder.node_names)
    nodes = {n.name: n for n in float_model.graph.node}
    rows = []
    for label, members in tqdm(units.items(), desc="isolated error", unit="layer", disable=not progress, leave=False):
        plan = base_plan.with_float(all_nodes - set(members))
        qmodel = builder.build(plan)
        qsess = make_session(qmodel, threads=threads)
        q_outputs = [qsess.run(out_names, feed) for feed in feeds]
        first = nodes.get(members[0])
        rows.append({"Op": _node_label(first) if len(members) == 1 and first is not None else f"{label}[{len(members)} nodes]",
                     "Var": first.output[0] if len(members) == 1 and first is not None else label,
                     **output_errors(float_outputs, q_outputs)})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["SNR"] = df["Output SNR"]  # isolated rows are judged by their effect at the outputs
    return df


def compute_units(graph, plan, by: str = "node", depth: int = 1, op_types=COMPUTE_OPS) -> dict[str, list[str]]:
    """Quantizable units for the isolated view: each compute node, or nodes grouped by module prefix."""
    from sensq.model import group_name

    floating = set(plan.float_nodes)
    names = [n for n, node in graph.nodes.items() if n not in floating and (by == "group" or node.op_type in op_types)]
    if by == "node":
        return {n: [n] for n in names}
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(group_name(n, depth), []).append(n)
    return units
