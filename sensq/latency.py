"""Latency backends: swappable ways to put a cost on a (QDQ) ONNX model, chosen by a string on the command line.

    make_latency_backend("ort")                      ONNX Runtime CPU wall time (median of blocks), unit ms
    make_latency_backend("ort:threads=2,warmup=3")   options may follow the name as key=value pairs
    make_latency_backend("bops")                     analytic cost sum(MACs x weight bits x activation bits), unit GBOPs
    make_latency_backend('cmd:"trtexec --onnx={model}"')  a user command that prints the latency, unit ms
    make_latency_backend("table:layers.csv")         per-layer float/int8 costs measured on the target, unit ms

Every backend returns a LatencyResult whose `ms` is the number the search minimizes (in the backend's `unit`).
Whether a layer runs in int8 is read from the QDQ graph itself (quantized_nodes), so bops and table agree with
what onnxruntime.quantization actually wrote.
"""
from __future__ import annotations

import gc
import inspect
import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import onnx

from .errors import SensqError
from .runtime import DEFAULT_THREADS, make_session, session_options

ModelLike = onnx.ModelProto | str | Path | bytes

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_FREE_OPS = _QDQ_OPS + ("Constant",)  # never costed: Q/DQ belong to the layer they wrap, Constant is folded


# ---------------------------------------------------------------------------------------------------------------
# Result, protocol, registry
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LatencyResult:
    ms: float  # the cost the search minimizes, in `unit` (milliseconds except for bops: GBOPs)
    spread_ms: float | None  # run-to-run spread in `unit`; see each backend; None when it cannot be known
    repeats: int
    backend: str
    details: dict[str, Any] = field(default_factory=dict)
    unit: str = "ms"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class LatencyBackend(Protocol):
    """Puts a cost on a model. `model` is an onnx.ModelProto, a path or serialized bytes."""

    name: str
    unit: str

    def measure(self, model: ModelLike) -> LatencyResult: ...


_REGISTRY: dict[str, type] = {}


def register_latency_backend(name: str) -> Callable[[type], type]:
    """Class decorator: makes `name` (and `name:...`) a valid latency spec. The class needs a `from_spec(arg, **opts)`."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def available_latency_backends() -> list[str]:
    return sorted(_REGISTRY)


def make_latency_backend(spec: str = "ort", **opts: Any) -> LatencyBackend:
    """Backend from a spec string: `ort`, `ort:threads=2`, `bops`, `cmd:<command>`, `table:<file.csv>`.

    Keyword options override options written in the spec."""
    name, _, arg = (spec or "ort").strip().partition(":")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        raise SensqError(f"unknown latency backend {name.strip()!r}",
                         f"use one of {', '.join(available_latency_backends())} (e.g. --latency ort or --latency 'cmd:mytool {{model}}')")
    return cls.from_spec(arg.strip(), **opts)


def _coerce(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_kv(arg: str, backend: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SensqError(f"latency option {part!r} of backend {backend!r} is not key=value",
                             f"write options as {backend}:key=value,key=value (e.g. {backend}:threads=2)")
        opts[key.strip()] = _coerce(value.strip())
    return opts


def _construct(cls: type, *args: Any, **opts: Any):
    """cls(*args, **opts) with unknown option names reported as a user error instead of a TypeError."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"][len(args):]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise SensqError(f"unknown option(s) {', '.join(unknown)} for latency backend {cls.name!r}",
                         f"accepted options: {', '.join(accepted) or 'none'}")
    return cls(*args, **opts)


# ---------------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------------

def _load_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    path = Path(model)
    if not path.is_file():
        raise SensqError(f"model file not found: {path}", "check the path given to --model")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf decode errors have unhelpful types
        raise SensqError(f"cannot read ONNX model {path}: {str(e).strip()[:200] or type(e).__name__}",
                         "export the model again or check that the file is a complete .onnx") from e


def node_key(node: onnx.NodeProto) -> str:
    """Name used for a node everywhere in sensq. Exporters name nodes; for unnamed ones the first output name is
    stable across QDQ quantization (the quantizer re-routes inputs and appends Q nodes, it keeps compute outputs)."""
    return node.name or node.output[0]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    cons: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                cons.setdefault(name, []).append(node)
    return cons


def _from_dq(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    producer = producers.get(name)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _is_quantized(node, producers, consumers) -> bool:
    if node.op_type in _FREE_OPS or not node.input or not _from_dq(node.input[0], producers):
        return False
    if node.op_type in COMPUTE_OPS:
        # Data alone is not enough: ORT re-routes *every* consumer of a quantized tensor to the DQ output, so an
        # excluded Conv still reads a DQ output but keeps its float weight (and runs in float).
        return len(node.input) > 1 and _from_dq(node.input[1], producers)
    # Other ops run in int8 when wrapped DQ -> op -> Q (the QDQ "node unit" ORT writes for MaxPool, Concat, ...).
    return any(c.op_type == "QuantizeLinear" for out in node.output for c in consumers.get(out, []))


def quantized_nodes(model: ModelLike) -> set[str]:
    """Keys (node_key) of the original nodes that run quantized in a QDQ model.

    Conv/ConvTranspose/Gemm/MatMul: data input (0) and weight (1) both come from a DequantizeLinear.
    Other ops: first input comes from a DequantizeLinear and an output feeds a QuantizeLinear.
    A float model gives the empty set."""
    graph = _load_model(model).graph
    producers, consumers = _producers(graph), _consumers(graph)
    return {node_key(n) for n in graph.node if _is_quantized(n, producers, consumers)}


# ---------------------------------------------------------------------------------------------------------------
# Analytic cost: MACs and BOPs
# ---------------------------------------------------------------------------------------------------------------

_TP = onnx.TensorProto
_BITS_BY_NAME = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "FLOAT16": 16,
                 "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8,
                 "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4}
_ELEM_BITS = {getattr(_TP, k): v for k, v in _BITS_BY_NAME.items() if hasattr(_TP, k)}  # older onnx lacks int4/fp4


@dataclass
class LayerCost:
    node: str
    op_type: str
    macs: int
    weight_bits: int
    act_bits: int
    quantized: bool
    shape_known: bool = True

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


def _with_static_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """Copy of the model whose graph inputs have concrete dims (override, else symbolic -> 1), only if needed."""
    input_shapes = input_shapes or {}
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    needs = any(i.name in input_shapes or any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
                for i in inputs)
    if not needs:
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name in input_shapes:
            wanted = list(input_shapes[inp.name])
            if len(wanted) != len(dims):
                raise SensqError(f"input shape {wanted} for {inp.name!r} has {len(wanted)} dims, the model input has {len(dims)}",
                                 "give one size per dimension of that input")
            for d, v in zip(dims, wanted):
                d.dim_value = int(v)
        else:
            for d in dims:
                if not d.HasField("dim_value"):
                    d.dim_value = 1
    return fixed


def _shapes_and_types(model: onnx.ModelProto, input_shapes=None) -> tuple[dict[str, list[int]], dict[str, int]]:
    shapes: dict[str, list[int]] = {}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_with_static_inputs(model, input_shapes), data_prop=True)
    except SensqError:
        raise
    except Exception:  # inference fails on some custom-domain graphs; fall back to declared shapes only
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            # symbolic dims left after inference (data-dependent) count as 1, like the ORT backend's inputs
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _node_macs(node, shape) -> int | None:
    """MACs of one compute node from its tensor shapes; None when a needed shape is unknown."""
    op = node.op_type
    if op == "Conv":
        out, w = shape(node.output[0]), shape(node.input[1])
        if out is None or w is None:
            return None
        return math.prod(out) * math.prod(w[1:])  # out elems x (Cin/groups) x kernel volume
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        if x is None or w is None:
            return None
        return math.prod(x) * math.prod(w[1:])  # every input elem meets (Cout/groups) x kernel volume weights
    if op == "Gemm":
        a, b = shape(node.input[0]), shape(node.input[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        attrs = {at.name: at.i for at in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * n * k
    if op == "MatMul":
        a, b = shape(node.input[0]), shape(node.input[1])
        if a is None or b is None or not a or not b:
            return None
        a = a if len(a) >= 2 else [1] + a
        b = b if len(b) >= 2 else b + [1]
        try:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        except ValueError:
            return None
        return math.prod(batch) * a[-2] * a[-1] * b[-1]
    return 0


def layer_costs(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> list[LayerCost]:
    """Per compute node (graph order): MACs and the bits of its weight and data inputs, read from the QDQ graph.

    Quantized nodes (see quantized_nodes) take the bit width of the integer tensor behind each DequantizeLinear
    (8 for int8/uint8, 16 for int16, 4 for int4); other nodes the width of their float inputs (32 for float32).
    Shapes come from one onnx shape inference; symbolic input dims are 1 unless `input_shapes` gives them."""
    model = _load_model(model)
    graph = model.graph
    shapes, types = _shapes_and_types(model, input_shapes)
    producers, consumers = _producers(graph), _consumers(graph)

    def shape(name: str) -> list[int] | None:
        if name in shapes:
            return shapes[name]
        producer = producers.get(name)  # a DQ output has the shape of its integer input (e.g. the int8 initializer)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return shapes.get(producer.input[0])
        return None

    def dq_bits(name: str) -> int:
        dq = producers[name]
        elem = types.get(dq.input[0]) or (types.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None)
        return _ELEM_BITS.get(elem, 8)  # Q without zero point defaults to uint8

    def float_bits(name: str) -> int:
        return _ELEM_BITS.get(types.get(name), 32)

    costs = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        macs = _node_macs(node, shape)
        quant = _is_quantized(node, producers, consumers)
        bits = dq_bits if quant else float_bits
        costs.append(LayerCost(node_key(node), node.op_type, macs or 0, bits(node.input[1]), bits(node.input[0]),
                               quant, macs is not None))
    return costs


def macs_per_node(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """MACs of every Conv/ConvTranspose/Gemm/MatMul by node key; other ops cost 0 and are left out."""
    return {c.node: c.macs for c in layer_costs(model, input_shapes)}


def bops(model: ModelLike, input_shapes: dict[str, list[int]] | None = None) -> float:
    """Bit operations: sum over compute layers of MACs x weight bits x activation bits (float layers are 32x32)."""
    return float(sum(c.bops for c in layer_costs(model, input_shapes)))


@register_latency_backend("bops")
class BopsLatency:
    """Analytic cost in GBOPs: deterministic, instant, hardware-agnostic (spread is 0)."""

    name = "bops"
    unit = "GBOPs"

    def __init__(self, input_shapes: dict[str, list[int]] | None = None):
        self.input_shapes = input_shapes

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "BopsLatency":
        return _construct(cls, **{**_parse_kv(arg, cls.name), **opts})

    def measure(self, model: ModelLike) -> LatencyResult:
        costs = layer_costs(model, self.input_shapes)
        gbops = sum(c.bops for c in costs) / 1e9
        details = {
            "gbops": gbops,
            "gmacs": sum(c.macs for c in costs) / 1e9,
            "n_layers": len(costs),
            "n_quantized_layers": sum(c.quantized for c in costs),
            "unknown_shape_nodes": [c.node for c in costs if not c.shape_known],
        }
        return LatencyResult(ms=gbops, spread_ms=0.0, repeats=1, backend=self.name, details=details, unit=self.unit)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime CPU wall time
# ---------------------------------------------------------------------------------------------------------------

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def random_inputs(model_or_session, seed: int = 0, input_shapes: dict[str, list[int]] | None = None,
                  threads: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random feeds shaped from the model inputs (symbolic dims -> 1 unless given in `input_shapes`).

    Floats in [0, 1) (image-like), uint8 in [0, 256), other integers in [0, 10), bools 50/50."""
    session = make_session(model_or_session, threads=threads)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise SensqError(f"model input {inp.name!r} has type {inp.type}, which the latency backend cannot generate",
                             "use --latency bops, cmd:... or table:... for this model")
        given = (input_shapes or {}).get(inp.name)
        shape = [int(v) for v in given] if given is not None else [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, 256 if dtype is np.uint8 else 10, size=shape).astype(dtype)
    return feeds


def measure_session_creation(model: ModelLike, threads: int | None = None, repeats: int = 3) -> float:
    """Median wall time in ms to build an ORT session (graph optimization + QDQ fusion), separate from inference."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        make_session(model, threads=threads)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _relative_iqr(values) -> float:
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return float((p75 - p25) / p50) if p50 > 0 else 0.0


@register_latency_backend("ort")
class OrtLatency:
    """ONNX Runtime CPU inference time with a fixed thread count.

    After `warmup` runs, the repeats are split into `blocks` consecutive blocks; `ms` is the median of the block
    medians, so a burst of load from another process spoils a block or two rather than the result. While the block
    medians disagree by more than `tolerance` (their interquartile range relative to their median), more blocks
    are added, up to `max_blocks` and `max_seconds` of measurement.
    Repeats: at least `min_repeats` and at least `min_seconds` of measurement (estimated from the warm-up).
    `spread_ms` is the interquartile range (p75 - p25) of all individual repeats.
    `spinning` is off by default: ORT's spin-waiting worker threads are a little faster on idle cores but collapse
    when another process competes for them (YOLOv5n, 2 threads on 2 cores under load: ~145 ms and +-140 % run to
    run with spinning, ~55 ms and +-6 % without), which would let background load decide the search. Use
    spinning=true on a dedicated machine to time what a deployment with ORT defaults sees; None keeps
    sensq.runtime's session options unchanged."""

    name = "ort"
    unit = "ms"

    def __init__(self, threads: int | None = None, warmup: int = 5, min_repeats: int = 20, min_seconds: float = 0.5,
                 max_seconds: float = 10.0, blocks: int = 5, max_blocks: int = 10, tolerance: float = 0.05,
                 seed: int = 0, input_shapes: dict[str, list[int]] | None = None, spinning: bool | None = False):
        if warmup < 0 or min_repeats < 1 or blocks < 1 or min_seconds < 0 or max_seconds <= 0 or tolerance < 0:
            raise SensqError("ort latency options out of range",
                             "use warmup >= 0, min_repeats >= 1, blocks >= 1, min_seconds >= 0, max_seconds > 0, tolerance >= 0")
        self.threads = int(threads or DEFAULT_THREADS)
        self.warmup, self.min_repeats, self.blocks = int(warmup), int(min_repeats), int(blocks)
        self.max_blocks, self.tolerance = max(int(max_blocks), self.blocks), float(tolerance)
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        self.seed, self.input_shapes = int(seed), input_shapes
        if spinning is not None and not isinstance(spinning, bool):
            raise SensqError(f"ort option spinning={spinning!r} is not a boolean", "use spinning=true or spinning=false")
        self.spinning = spinning

    def session_options(self):
        options = session_options(self.threads)
        if self.spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "OrtLatency":
        return _construct(cls, **{**_parse_kv(arg, cls.name), **opts})

    def measure(self, model: ModelLike) -> LatencyResult:
        t0 = time.perf_counter()
        session = make_session(model, options=self.session_options())
        create_ms = (time.perf_counter() - t0) * 1e3
        feeds = random_inputs(session, self.seed, self.input_shapes)
        run = session.run
        clock = time.perf_counter_ns

        def timed() -> float:
            start = clock()
            run(None, feeds)
            return (clock() - start) / 1e6

        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a timed run adds jitter that has nothing to do with the model
        try:
            warm = [timed() for _ in range(max(1, self.warmup))]
            per_run = float(np.median(warm[1:] if len(warm) > 1 else warm))  # the first run pays lazy allocation
            per_run_s = max(per_run / 1e3, 1e-6)
            wanted = max(self.min_repeats, math.ceil(self.min_seconds / per_run_s))
            wanted = min(wanted, max(self.min_repeats, int(self.max_seconds / per_run_s)))
            per_block = max(1, math.ceil(wanted / self.blocks))
            t_measure = time.perf_counter()
            block_samples = [[timed() for _ in range(per_block)] for _ in range(self.blocks)]
            while (len(block_samples) < self.max_blocks and time.perf_counter() - t_measure < self.max_seconds
                   and _relative_iqr([np.median(b) for b in block_samples]) > self.tolerance):
                block_samples.append([timed() for _ in range(per_block)])
            measure_s = time.perf_counter() - t_measure
        finally:
            if gc_was_enabled:
                gc.enable()

        samples = np.array([s for block in block_samples for s in block])
        block_medians = [float(np.median(b)) for b in block_samples]
        p10, p25, p75, p90 = np.percentile(samples, [10, 25, 75, 90])
        details = {
            "threads": self.threads,
            "spinning": self.spinning,
            "warmup": len(warm),
            "blocks": len(block_samples),
            "block_agreement": round(_relative_iqr(block_medians), 4),  # IQR / median of the block medians
            "per_block": per_block,
            "block_medians_ms": [round(m, 4) for m in block_medians],
            "min_ms": float(samples.min()),
            "mean_ms": float(samples.mean()),
            "p10_ms": float(p10),
            "p90_ms": float(p90),
            "measure_seconds": round(measure_s, 3),
            "session_create_ms": round(create_ms, 2),
            "spread": "iqr",
            # other processes competing for the cores show up here; lets a search flag contaminated trials
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }
        return LatencyResult(ms=float(np.median(block_medians)), spread_ms=float(p75 - p25), repeats=int(samples.size),
                             backend=self.name, details=details)

    def measure_relative(self, model: ModelLike, reference, rounds: int = 8, runs: int = 3) -> tuple[float, LatencyResult]:
        """Latency of `model` relative to `reference` (a model or an already-made session), measured interleaved.

        Shared machines drift in speed by tens of percent over seconds to minutes; timing the two models in
        alternating rounds and taking the median of the per-round ratios cancels that drift. Returns
        (ratio, LatencyResult of `model` from the same runs)."""
        session = make_session(model, options=self.session_options())
        ref = reference if hasattr(reference, "run") else make_session(reference, options=self.session_options())
        feeds, ref_feeds = random_inputs(session, self.seed, self.input_shapes), random_inputs(ref, self.seed, self.input_shapes)
        clock = time.perf_counter_ns

        def timed(sess, feed) -> float:
            start = clock()
            sess.run(None, feed)
            return (clock() - start) / 1e6

        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(max(1, self.warmup)):
                timed(session, feeds), timed(ref, ref_feeds)
            own, ratios = [], []
            for _ in range(rounds):
                a = [timed(session, feeds) for _ in range(runs)]
                b = [timed(ref, ref_feeds) for _ in range(runs)]
                own += a
                ratios.append(float(np.median(a) / np.median(b)))
        finally:
            if gc_was_enabled:
                gc.enable()
        p25, p75 = np.percentile(own, [25, 75])
        ratio = float(np.median(ratios))
        details = {"threads": self.threads, "rounds": rounds, "runs_per_round": runs,
                   "ratio_iqr": float(np.subtract(*np.percentile(ratios, [75, 25])))}
        return ratio, LatencyResult(ms=float(np.median(own)), spread_ms=float(p75 - p25), repeats=len(own),
                                    backend=self.name, details=details)


# ---------------------------------------------------------------------------------------------------------------
# User command (board, TensorRT, ...)
# ---------------------------------------------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_KEY_VALUE = re.compile(r"^\s*latency_ms\s*[=:]\s*" + _NUM, re.MULTILINE)
# trtexec prints several "median = X ms" lines (Latency, H2D, GPU Compute, D2H ...); GPU Compute Time is the model's.
_TRT_GPU_MEDIAN = re.compile(r"GPU Compute Time:.*?\bmedian\s*=\s*" + _NUM + r"\s*ms\b")
_MEDIAN = re.compile(r"\bmedian\s*=\s*" + _NUM + r"\s*ms\b")
_ANY_MS = re.compile(_NUM + r"\s*ms\b")


def _json_latency(stdout: str) -> float | None:
    candidates = [stdout.strip()] + [line.strip() for line in reversed(stdout.splitlines()) if line.strip().startswith("{")]
    for text in candidates:
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("latency_ms"), (int, float)) and not isinstance(obj["latency_ms"], bool):
            return float(obj["latency_ms"])
    return None


def _last_number(regex: re.Pattern, text: str) -> float | None:
    matches = list(regex.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if "ms" in regex.groupindex:
        return float(m.group("ms"))
    if regex.groups:
        return float(m.group(1))
    number = re.search(_NUM, m.group(0))  # pattern without a group: first number inside the last match
    return float(number.group(1)) if number else None


def parse_latency_ms(stdout: str, pattern: str | re.Pattern | None = None) -> float | None:
    """Latency in ms printed by a command, or None.

    With `pattern`: its last match (named group `ms`, else group 1, else the first number in the match); nothing else
    is tried, so a custom pattern never silently falls back to another number. Without: in order of preference,
    a JSON object with key latency_ms, a line `latency_ms=X`, trtexec's `GPU Compute Time: ... median = X ms`,
    the last `median = X ms`, the last `<number> ms`."""
    if pattern is not None:
        return _last_number(re.compile(pattern) if isinstance(pattern, str) else pattern, stdout)
    value = _json_latency(stdout)
    if value is not None:
        return value
    for regex in (_KEY_VALUE, _TRT_GPU_MEDIAN, _MEDIAN, _ANY_MS):
        value = _last_number(regex, stdout)
        if value is not None:
            return value
    return None


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@register_latency_backend("cmd")
class CommandLatency:
    """Runs a shell command per model and reads the latency in ms from its stdout (see parse_latency_ms).

    `{model}` in the command is replaced by the (shell-quoted) model path, else the path is appended as the last
    argument. A ModelProto is written to a temporary .onnx first. With repeats > 1 the command runs that many
    times; `ms` is the median and `spread_ms` the interquartile range (None for a single run)."""

    name = "cmd"
    unit = "ms"

    def __init__(self, command: str, timeout: float = 600.0, pattern: str | None = None, repeats: int = 1):
        command = command.strip()
        if len(command) >= 2 and command[0] == command[-1] and command[0] in "\"'":
            command = command[1:-1].strip()  # cmd:"..." form
        if not command:
            raise SensqError("the cmd latency backend needs a command",
                             "write --latency 'cmd:mytool --model {model}' (the tool prints e.g. 'latency: 12.3 ms')")
        if repeats < 1 or timeout <= 0:
            raise SensqError("cmd latency options out of range", "use repeats >= 1 and timeout > 0 (seconds)")
        try:
            self.pattern = re.compile(pattern) if pattern else None
        except re.error as e:
            raise SensqError(f"latency pattern {pattern!r} is not a valid regular expression: {e}",
                             "give a Python regex whose group 1 (or group named ms) captures the milliseconds") from e
        self.command, self.timeout, self.repeats = command, float(timeout), int(repeats)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "CommandLatency":
        return _construct(cls, arg, **opts)

    def command_for(self, model_path: str | Path) -> str:
        quoted = shlex.quote(str(model_path))
        # str.replace, not str.format: commands often contain braces (JSON, awk) that format() would choke on
        return self.command.replace("{model}", quoted) if "{model}" in self.command else f"{self.command} {quoted}"

    def _run_once(self, command: str) -> float:
        expected = "a line like 'latency: 12.3 ms', 'latency_ms=12.3' or JSON {\"latency_ms\": 12.3}"
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # own process group, so a timeout kills the whole pipeline
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.communicate()
            raise SensqError(f"latency command timed out after {self.timeout:g} s: {_short(command)}",
                             "make the command finish sooner or pass a larger timeout= option") from None
        if proc.returncode != 0:
            raise SensqError(f"latency command exited with code {proc.returncode}: {_short(command)}"
                             + (f" (stderr: {_short(_tail(err))})" if err.strip() else ""),
                             "run the command by hand on a model file and fix it so it exits 0 and prints " + expected)
        value = parse_latency_ms(out, self.pattern)
        if value is None or not math.isfinite(value) or value < 0:
            found = f"got {value}" if value is not None else f"stdout ends with: {_short(_tail(out)) or '(empty)'}"
            wanted = f"a match of pattern {self.pattern.pattern!r}" if self.pattern else expected
            raise SensqError(f"no latency in milliseconds in the output of: {_short(command)} ({found})",
                             f"make it print {wanted}")
        return value

    def measure(self, model: ModelLike) -> LatencyResult:
        with tempfile.TemporaryDirectory(prefix="sensq_lat_") as tmp:
            if isinstance(model, (str, Path)):
                path = Path(model).resolve()  # absolute: the command may change directory
                if not path.is_file():
                    raise SensqError(f"model file not found: {path}", "check the path given to --model")
            else:
                path = Path(tmp) / "model.onnx"
                proto = _load_model(model)
                onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 2**31 - 2**24)
            command = self.command_for(path)
            t0 = time.perf_counter()
            values = [self._run_once(command) for _ in range(self.repeats)]
            seconds = time.perf_counter() - t0
        spread = float(np.subtract(*np.percentile(values, [75, 25]))) if len(values) > 1 else None
        return LatencyResult(ms=float(np.median(values)), spread_ms=spread, repeats=len(values), backend=self.name,
                             details={"command": command, "runs_ms": values, "seconds": round(seconds, 3),
                                      "spread": "iqr" if spread is not None else "unknown (single run)"})


# ---------------------------------------------------------------------------------------------------------------
# Per-layer table measured on the target
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _TableRow:
    float_ms: float
    int8_ms: float
    op_type: str | None


def _read_latency_table(path: Path) -> dict[str, _TableRow]:
    import csv

    fix = "give a CSV with header node,float_ms,int8_ms (optionally op_type), one row per node of the float model"
    if not path.is_file():
        raise SensqError(f"latency table not found: {path}", fix)
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
        missing = [c for c in ("node", "float_ms", "int8_ms") if c not in header]
        if missing:
            raise SensqError(f"latency table {path} lacks column(s) {', '.join(missing)}", fix)
        rows: dict[str, _TableRow] = {}
        for line_no, row in enumerate(reader, start=2):
            node = (row.get(header["node"]) or "").strip()
            if not node:
                continue
            if node in rows:
                raise SensqError(f"latency table {path} lists node {node!r} twice (line {line_no})", "keep one row per node")
            try:
                float_ms, int8_ms = (float((row.get(header[c]) or "").strip()) for c in ("float_ms", "int8_ms"))
            except ValueError:
                raise SensqError(f"latency table {path} line {line_no}: float_ms/int8_ms of {node!r} are not numbers",
                                 "write plain numbers in milliseconds, e.g. 0.42") from None
            op_type = None
            if "op_type" in header:
                op_type = (row.get(header["op_type"]) or "").strip() or None
            rows[node] = _TableRow(float_ms, int8_ms, op_type)
    if not rows:
        raise SensqError(f"latency table {path} has no rows", fix)
    return rows


@register_latency_backend("table")
class TableLatency:
    """Sum of per-layer target costs: int8_ms for nodes quantized in this model (see quantized_nodes), float_ms for
    the others. Q/DQ and Constant nodes are not costed (their cost belongs in the layer's int8_ms). Model nodes
    absent from the table cost 0 and are listed in details["missing_nodes"]. Deterministic: spread is 0."""

    name = "table"
    unit = "ms"

    def __init__(self, path: str | Path):
        self.path = Path(str(path).strip().strip("\"'"))
        self.rows = _read_latency_table(self.path)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "TableLatency":
        if not arg and "path" not in opts:
            raise SensqError("the table latency backend needs a CSV file", "write --latency table:layers.csv")
        return _construct(cls, arg, **opts) if arg else _construct(cls, **opts)

    def measure(self, model: ModelLike) -> LatencyResult:
        proto = _load_model(model)
        quantized = quantized_nodes(proto)
        total, n_int8, missing, op_mismatch = 0.0, 0, [], []
        seen = set()
        for node in proto.graph.node:
            if node.op_type in _FREE_OPS:
                continue
            key = node_key(node)
            row = self.rows.get(key)
            if row is None:
                missing.append(key)
                continue
            seen.add(key)
            if row.op_type and row.op_type != node.op_type:
                op_mismatch.append(key)
            if key in quantized:
                total += row.int8_ms
                n_int8 += 1
            else:
                total += row.float_ms
        if not seen:
            raise SensqError(f"no node of the model appears in latency table {self.path}",
                             "the table's node column must hold node names of this model (as in Netron or onnx.load(...).graph.node)")
        details = {"table": str(self.path), "n_costed": len(seen), "n_int8": n_int8, "n_missing_nodes": len(missing),
                   "missing_nodes": missing, "n_unmatched_table_rows": len(set(self.rows) - seen),
                   "op_type_mismatches": op_mismatch}
        return LatencyResult(ms=total, spread_ms=0.0, repeats=1, backend=self.name, details=details)
