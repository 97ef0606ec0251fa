"""One-pass streaming activation statistics: exact min/max plus a histogram fine enough for every range method.

Activations are never stored. Each tensor keeps a fixed-size histogram of |x| per sign over [0, R): when a larger
value arrives, R doubles and adjacent bin pairs merge (exact re-binning, no interpolation). Large tensors are
histogrammed on a subsample (at most SAMPLE_CAP values per image; min/max stay exact), which keeps the pass within a
small multiple of plain inference; 200 images x 65k samples still leave thousands of values above the 99.99th
percentile.

The subsample is every k-th value with k coprime to the tensor's size. A stride sharing a factor with the innermost
dimension would see a fixed subset of channels or columns (a 1x3x80x80x85 tensor read every 25th value sees every
5th column; an NHWC RGB input read every 3rd value sees one channel). With gcd(k, size) = 1, k is coprime to every
product P of trailing dimensions (each divides the size), so the positions sampled run through all P residues once
per P samples: every channel, row and column alike (see `sample_step`). On yolov5n (30 COCO images) the
99.99th-percentile ranges from this sample are within 0.25 % of those from every value (mean over tensors; 3.4 % for
the worst tensor); the aliasing stride was off by 0.5 % (mean) and 17 % (worst).
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import SensqError

BINS_PER_SIGN = 4096
SAMPLE_CAP = 1 << 16
CACHE_VERSION = 5  # 2: sample stride coprime with the size; 3: per-channel min/max of depthwise-conv inputs; 4: + means of conv inputs; 5: + exact zeros


@dataclass
class TensorStats:
    """Running statistics of one tensor. hist[:H] counts x >= 0 by |x|, hist[H:] counts x < 0 by |x|."""

    min: float = np.inf
    max: float = -np.inf
    scale: float = 0.0  # R: histogram covers |x| in [0, R)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(2 * BINS_PER_SIGN, np.int64))
    count: int = 0  # values seen (not subsampled)
    zeros: int = 0  # exact zeros among the histogrammed values (they sit in bin 0 with the tiny non-zero ones)

    def update(self, x: np.ndarray) -> None:
        flat = x.reshape(-1)
        if flat.size == 0:
            return
        self.update_summary(float(flat.min()), float(flat.max()), sample_values(flat), flat.size)

    def update_summary(self, lo: float, hi: float, sample: np.ndarray, count: int) -> None:
        """Add one tensor given its exact min/max and its strided sample (what the augmented graph returns)."""
        sample = sample.reshape(-1)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = sample[np.isfinite(sample)]
            if finite.size == 0:
                return
            count = int(round(count * finite.size / sample.size))  # non-finite values are not counted
            sample, lo, hi = finite, float(finite.min()), float(finite.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += count
        absmax = max(abs(lo), abs(hi))
        if self.scale == 0.0:
            self.scale = _pow2_at_least(absmax)
        while absmax >= self.scale:
            self._double()
        flat = sample
        idx = (np.abs(flat) * np.float32(BINS_PER_SIGN / self.scale)).astype(np.int32)
        np.minimum(idx, BINS_PER_SIGN - 1, out=idx)
        idx += (flat < 0) * np.int32(BINS_PER_SIGN)
        self.hist += np.bincount(idx, minlength=2 * BINS_PER_SIGN)
        self.zeros += int(np.count_nonzero(flat == 0))

    def _double(self) -> None:
        h = BINS_PER_SIGN
        for half in (self.hist[:h], self.hist[h:]):
            merged = half.reshape(h // 2, 2).sum(axis=1)
            half[: h // 2] = merged
            half[h // 2:] = 0
        self.scale *= 2.0

    # Views used by the range methods -----------------------------------------------------------------
    @property
    def bin_width(self) -> float:
        return self.scale / BINS_PER_SIGN

    def signed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left edges, right edges, counts) over [-R, R) in ascending order."""
        h, w = BINS_PER_SIGN, self.bin_width
        pos_l = np.arange(h) * w
        counts = np.concatenate([self.hist[h:][::-1], self.hist[:h]]).astype(np.float64)
        left = np.concatenate([-(pos_l + w)[::-1], pos_l])
        return left, left + w, counts

    def absolute(self) -> np.ndarray:
        """Counts of |x| over [0, R)."""
        return (self.hist[:BINS_PER_SIGN] + self.hist[BINS_PER_SIGN:]).astype(np.float64)


def sample_step(size: int) -> int:
    """Stride of the histogram sample: 1 up to SAMPLE_CAP values, else the smallest k >= size / SAMPLE_CAP that is
    coprime with `size`, so that no channel, row or column is skipped (see the module docstring)."""
    k = max(1, -(-size // SAMPLE_CAP))
    while k > 1 and math.gcd(k, size) != 1:
        k += 1
    return k


def sample_values(flat: np.ndarray) -> np.ndarray:
    """The sample of a flat array that the observer graph returns for it (numpy twin of `observer_model`)."""
    return flat[:: sample_step(flat.size)]


def _pow2_at_least(v: float) -> float:
    v = max(float(v), 1e-12)
    return float(2.0 ** np.ceil(np.log2(v) + 1e-12)) if v > 0 else 1.0


@dataclass
class CalibrationStats:
    tensors: dict[str, TensorStats]
    key: str = ""
    n_samples: int = 0
    # tensor -> (min per channel, max per channel) for the inputs of depthwise convs (axis 1), which may be
    # quantized per channel (passes/depthwise_inputs.py)
    channels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # tensor -> mean per channel (axis 1) of every conv's activation input (passes/bias_correction.py)
    means: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        names = sorted(self.tensors)
        arr = {
            "names": np.array(names, dtype=object),
            "minmax": np.array([[self.tensors[n].min, self.tensors[n].max] for n in names], np.float64).reshape(-1, 2),
            "scale": np.array([self.tensors[n].scale for n in names], np.float64),
            "count": np.array([self.tensors[n].count for n in names], np.int64),
            "hist": np.stack([self.tensors[n].hist for n in names]) if names else np.zeros((0, 2 * BINS_PER_SIGN), np.int64),
            "zeros": np.array([self.tensors[n].zeros for n in names], np.int64),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        channels = {f"ch_lo_{i}": lo for i, (lo, _) in enumerate(self.channels.values())}
        channels.update({f"ch_hi_{i}": hi for i, (_, hi) in enumerate(self.channels.values())})
        channels.update({f"mean_{i}": m for i, m in enumerate(self.means.values())})
        np.savez_compressed(tmp, meta=json.dumps({"key": self.key, "n_samples": self.n_samples, "version": CACHE_VERSION,
                                                  "channels": list(self.channels), "means": list(self.means)}),
                            names=np.array(names), minmax=arr["minmax"], scale=arr["scale"], count=arr["count"], hist=arr["hist"],
                            zeros=arr["zeros"], **channels)
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            tensors = {
                str(n): TensorStats(min=float(mm[0]), max=float(mm[1]), scale=float(s), hist=h.astype(np.int64), count=int(c),
                                    zeros=int(k))
                for n, mm, s, c, h, k in zip(z["names"], z["minmax"], z["scale"], z["count"], z["hist"], z["zeros"])
            }
            channels = {t: (z[f"ch_lo_{i}"], z[f"ch_hi_{i}"]) for i, t in enumerate(meta.get("channels", []))}
            means = {t: z[f"mean_{i}"] for i, t in enumerate(meta.get("means", []))}
        return cls(tensors=tensors, key=meta["key"], n_samples=meta["n_samples"], channels=channels, means=means)


def float_activation_names(model: onnx.ModelProto) -> list[str]:
    """Every float tensor produced by a node or fed as a graph input (candidates for activation quantization)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        names.extend(o for o in node.output if o)
    # Unknown type (0) is kept: shape inference misses some custom ops; ORT will tell us the dtype at run time.
    return [n for n in dict.fromkeys(names) if types.get(n, 0) in (0, onnx.TensorProto.FLOAT)]


def depthwise_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Activation input -> node name of every depthwise Conv (group > 1, one input channel per group)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if w is not None and group > 1 and len(w.dims) == 4 and w.dims[1] == 1 and n.input[0] not in inits:
            out.setdefault(n.input[0], n.name)
    return out


def conv_inputs(model: onnx.ModelProto) -> list[str]:
    """The activation input of every Conv with an initializer weight."""
    inits = {i.name for i in model.graph.initializer}
    return list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                              and n.input[1] in inits and n.input[0] not in inits))


def _channel_reduce_nodes(model: onnx.ModelProto, tensors: list[str], ops=("ReduceMin", "ReduceMax"),
                          tag: str = "ch") -> tuple[list, list, dict[str, tuple[str, ...]]]:
    """Reductions over every axis but 1 (NCHW channels) for each tensor."""
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, inits, names = [], [], {}
    axes = f"__sensq_{tag}_axes"
    if opset >= 18:  # axes became an input
        inits.append(_int64s(axes, [0, 2, 3]))
    for i, t in enumerate(tensors):
        outs = tuple(f"__sensq_{tag}{op.lower()}_{i}" for op in ops)
        for op, out in zip(ops, outs):
            if opset >= 18:
                nodes.append(helper.make_node(op, [t, axes], [out], keepdims=0, name=out + "_n"))
            else:
                nodes.append(helper.make_node(op, [t], [out], axes=[0, 2, 3], keepdims=0, name=out + "_n"))
        names[t] = outs
    return nodes, inits, names


def observer_model(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """The model plus, per observed tensor, ReduceMin/ReduceMax and a strided sample as extra outputs.

    ONNX Runtime then reduces inside the graph (multi-threaded, on cache-hot data) and returns a few scalars and at
    most SAMPLE_CAP values per tensor, instead of copying every activation out (yolov5n: 60 M floats per image).
    Returns the model and {tensor: (min output, max output, sample output, element count or None)}; a tensor of
    unknown size is returned whole (sample output = the tensor, count None).
    """
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shapes[v.name] = int(np.prod([d.dim_value for d in dims]))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    outputs, nodes, inits, plan = [], [], [_int64s("__sensq_flat", [-1])], {}
    for i, t in enumerate(tensors):
        size = shapes.get(t)
        mn, mx = f"__sensq_min_{i}", f"__sensq_max_{i}"
        nodes.append(helper.make_node("ReduceMin", [t], [mn], keepdims=0, name=f"__sensq_rmin_{i}"))
        nodes.append(helper.make_node("ReduceMax", [t], [mx], keepdims=0, name=f"__sensq_rmax_{i}"))
        sample = t if size is None else _sample_nodes(t, f"__sensq_{i}", size, nodes, inits)
        plan[t] = (mn, mx, sample, size)
        outputs += [mn, mx] + ([sample] if sample not in existing else [])
    ch_nodes, ch_inits, channels = _channel_reduce_nodes(m, [t for t in depthwise_inputs(model) if t in tensors])
    for t, (mn, mx) in channels.items():
        plan[("channels", t)] = (mn, mx)
        outputs += [mn, mx]
    mean_nodes, mean_inits, means = _channel_reduce_nodes(m, [t for t in conv_inputs(model) if t in tensors],
                                                          ("ReduceMean",), "mean")
    for t, (mean,) in means.items():
        plan[("means", t)] = (mean,)
        outputs.append(mean)
    m.graph.node.extend(nodes + ch_nodes + mean_nodes)
    m.graph.initializer.extend(inits + ch_inits + mean_inits)
    m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in dict.fromkeys(outputs) if o not in existing)
    return m, plan


def _int64s(name: str, values: list[int]) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(values, np.int64), name)


def _sample_nodes(tensor: str, prefix: str, size: int, nodes: list, inits: list) -> str:
    """Append the nodes computing `sample_values(tensor.reshape(-1))`; return the name of the sample output."""
    from onnx import helper

    flat = f"{prefix}_flat"
    nodes.append(helper.make_node("Reshape", [tensor, "__sensq_flat"], [flat], name=f"{prefix}_reshape"))
    step = sample_step(size)
    if step == 1:
        return flat
    names = [f"{prefix}_s_{a}" for a in ("starts", "ends", "axes", "steps")]
    inits += [_int64s(n, v) for n, v in zip(names, ([0], [size], [0], [step]))]
    nodes.append(helper.make_node("Slice", [flat] + names, [f"{prefix}_sample"], name=f"{prefix}_slice"))
    return f"{prefix}_sample"


def augmented_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The model with every tensor to observe added as a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in existing)
    return m


def stats_key(model_bytes: bytes, data_fingerprint: str, extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(model_bytes).digest())
    h.update(data_fingerprint.encode())
    h.update(f"{extra}|bins={BINS_PER_SIGN}|cap={SAMPLE_CAP}|v={CACHE_VERSION}".encode())
    return h.hexdigest()[:24]


def collect(model: onnx.ModelProto, feeds, n_batches: int, threads: int | None = None, progress: bool = True,
            desc: str = "calibrating") -> CalibrationStats:
    """One forward pass over `feeds` (an iterable of input dicts) observing every float activation.

    Histogramming of image i runs in a worker thread while ONNX Runtime infers image i+1 (both release the GIL).
    """
    from tqdm import tqdm

    from .runtime import make_session

    graph_inputs = {i.name for i in model.graph.input}
    names = float_activation_names(model)
    observed = [n for n in names if n not in graph_inputs]
    observer, plan = observer_model(model, observed)
    session = make_session(observer, threads=threads)
    out_names = [o.name for o in session.get_outputs()]
    stats = {n: TensorStats() for n in names}
    channels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mean_sums: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    def accumulate(feed, outputs):
        values = dict(zip(out_names, outputs))
        with lock:
            for name, value in feed.items():  # model inputs: already in numpy
                if name in stats and value.dtype == np.float32:
                    stats[name].update(value)
            for name, entry in plan.items():
                if isinstance(name, tuple) and name[0] == "means":  # per-channel mean of one sample (equal sizes)
                    mean_sums[name[1]] = mean_sums.get(name[1], 0.0) + values[entry[0]].astype(np.float64)
                    continue
                if isinstance(name, tuple):  # ("channels", tensor): per-channel min/max vectors
                    lo, hi = values[entry[0]].astype(np.float64), values[entry[1]].astype(np.float64)
                    old = channels.get(name[1])
                    channels[name[1]] = (lo, hi) if old is None else (np.minimum(old[0], lo), np.maximum(old[1], hi))
                    continue
                mn, mx, sample, size = entry
                v = values[sample]
                if not isinstance(v, np.ndarray) or v.dtype != np.float32:
                    continue  # shape inference missed a non-float tensor
                stats[name].update_summary(float(values[mn]), float(values[mx]), v if size else sample_values(v.reshape(-1)),
                                           size or v.size)

    n = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed in tqdm(feeds, total=n_batches, desc=desc, unit="img", disable=not progress, leave=False):
            try:
                outputs = session.run(out_names, feed)
            except Exception as e:
                raise SensqError(f"inference failed on a calibration sample: {str(e).splitlines()[0][:200]}",
                                 "check input_shape, dtype and preprocessing against the model's inputs") from e
            if pending is not None:
                pending.result()
            pending = pool.submit(accumulate, feed, outputs)
            n += 1
        if pending is not None:
            pending.result()
    observed = {k: v for k, v in stats.items() if v.count > 0}
    return CalibrationStats(tensors=observed, n_samples=n, channels=channels,
                            means={t: v / max(n, 1) for t, v in mean_sums.items()})
