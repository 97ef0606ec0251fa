"""QDQ builder: cached statistics + a precision plan -> a QDQ ONNX model that ONNX Runtime's CPU provider runs.

The QDQ graph itself is written by onnxruntime.quantization's QDQQuantizer, fed with precomputed ranges
(`tensors_range`) and `nodes_to_exclude`. Two things make a rebuild fast enough for a search (yolov5n: ~1.4 s with
the stock class, well under 1 s here), both checked byte-for-byte against the stock class in tests/test_build.py:
  * per-weight quantization parameters are computed once per builder and reused (weights never change);
  * ONNXModel helpers that scan the whole graph per call (replace_input_of_all_nodes, find_by_name) use an index.
These touch onnxruntime internals, hence the pinned range in pyproject.toml (onnxruntime>=1.20,<1.32).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import types
from pathlib import Path

import numpy as np
import onnx

from . import ort_compat  # noqa: F401  (the internals below exist, else a one-line error)
from onnxruntime.quantization import qdq_quantizer as _qdq_module  # noqa: E402
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import QuantType

from . import ranges as range_methods
from .errors import SensqError
from .passes.bias_correction import correct_biases
from .passes.learned_rounding import apply_rounding
from .passes.rounding_stages import RoundingSource
from .passes.weight_clipping import clip_weights_mse
from .passes.depthwise_inputs import quantize_depthwise_inputs_per_channel
from .plan import PrecisionPlan
from .precision import QUANT_TYPES, a16_overrides, fp16_islands, wide_tensors, wide_type
from .ranges import Grid, compute_range, normalize_percentile
from .statistics import CalibrationStats, depthwise_inputs
from .targets import get_target

log = logging.getLogger("sensq")


def prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy at opset >= 13 (per-channel QDQ needs it), done once per builder."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 10:
        raise SensqError(f"model opset {opset} is too old for QDQ quantization", "export the model with opset_version=13")
    if opset < 13:
        from onnx import version_converter

        m = version_converter.convert_version(m, 13)
    from .model import name_nodes

    name_nodes(m)  # also names nodes the opset converter added, never reusing a taken name
    return onnx.shape_inference.infer_shapes(m)


class _IndexedModelPatch:
    """Replaces ONNXModel.replace_input_of_all_nodes (a full graph scan per call) with a consumer index."""

    def __init__(self, onnx_model):
        self.m = onnx_model
        self.index: dict[str, list] = {}
        for node in onnx_model.model.graph.node:
            self._add(node)
        original_add_node = onnx_model.add_node

        def add_node(this, node):
            original_add_node(node)
            self._add(this.model.graph.node[-1])

        def add_nodes(this, nodes):
            for n in nodes:
                add_node(this, n)

        def replace_input_of_all_nodes(this, old, new):
            for node in self.index.pop(old, []):
                for j, x in enumerate(node.input):
                    if x == old:
                        node.input[j] = new
                self.index.setdefault(new, []).append(node)

        onnx_model.add_node = types.MethodType(add_node, onnx_model)
        onnx_model.add_nodes = types.MethodType(add_nodes, onnx_model)
        onnx_model.replace_input_of_all_nodes = types.MethodType(replace_input_of_all_nodes, onnx_model)
        # Float8/float16 zero-point checks scan every initializer per call; sensq only writes int8/uint8.
        onnx_model._check_init = lambda init, test=None: init
        onnx_model._check_node = lambda node: node

    def _add(self, node):
        for x in set(node.input):
            if x:
                self.index.setdefault(x, []).append(node)


def _find_by_name(name, items):
    for item in items:  # stops at the first match instead of building a list of all matches
        if item.name == name:
            return item
    return None


@contextlib.contextmanager
def _fast_find_by_name():
    original = _qdq_module.find_by_name
    _qdq_module.find_by_name = _find_by_name
    try:
        yield
    finally:
        _qdq_module.find_by_name = original


class _CachingQDQQuantizer(QDQQuantizer):
    """QDQQuantizer that reuses per-initializer quantization parameters across builds of the same model."""

    def __init__(self, *args, param_cache: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._param_cache = param_cache
        _IndexedModelPatch(self.model)

    def _param_key(self, name, info):
        return (name, str(info.tensor_type), info.axis, info.data_type, self.weight_qType, self.activation_qType,
                self.is_weight_symmetric(self.weight_qType), self.is_activation_symmetric, self.reduce_range,
                repr(self.tensor_quant_overrides.get(name)))

    def _calc_initializer_quant_params(self):
        cached, todo = {}, {}
        for name, info in self.tensors_to_quantize.items():
            key = self._param_key(name, info)
            if key in self._param_cache:
                cached[name] = copy.deepcopy(self._param_cache[key])
            else:
                todo[name] = info
        full = self.tensors_to_quantize
        self.tensors_to_quantize = todo
        try:
            fresh = super()._calc_initializer_quant_params()
        finally:
            self.tensors_to_quantize = full
        for name, params in fresh.items():
            self._param_cache[self._param_key(name, full[name])] = copy.deepcopy(params)
        cached.update(fresh)
        return cached


# Ops between a model input and the first layer that keep the input's values dense over the uint8 codes: in-graph
# normalisation (x - mean) / std, layout changes, crops and the YOLOv5 Focus slices.
_INPUT_PASS_THROUGH = {"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Transpose", "Reshape", "Flatten", "Squeeze",
                       "Unsqueeze", "Pad", "Slice", "Resize", "Concat"}


def weight_channel_axis(node: onnx.NodeProto) -> int:
    """The per-channel axis onnxruntime's QDQ quantizer gives this op's weight (operators/conv.py, gemm.py, matmul.py)."""
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0 if node.op_type == "Conv" else 1


def first_layer_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Weights of the compute layers whose activation input comes from a model input, directly or through
    normalisation / layout ops -> the weight's per-channel axis.

    Their uint8 input codes span the whole 0-255 range densely (raw 0-255 pixels and normalised images alike), which
    is what saturates the int16 pair sums of onnxruntime's u8s8 kernels on x86 without VNNI.
    """
    inits = {i.name for i in model.graph.initializer}
    constants = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    from_input = {i.name for i in model.graph.input if i.name not in inits}
    out = {}
    for node in model.graph.node:  # topological order
        variable = [x for x in node.input if x and x not in constants]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            if node.input[0] in from_input and len(node.input) > 1 and node.input[1] in inits:
                out[node.input[1]] = weight_channel_axis(node)
        elif node.op_type in _INPUT_PASS_THROUGH and variable and all(x in from_input for x in variable):
            from_input.update(o for o in node.output if o)
    return dict(sorted(out.items()))


class QDQBuilder:
    """Builds QDQ models for many plans from one set of statistics. Range computations are memoised."""

    # kl and mse take seconds over a whole model; they are kept on disk next to the statistics.
    PERSISTED_METHODS = ("kl", "mse")

    def __init__(self, model: onnx.ModelProto, stats: CalibrationStats, range_cache: Path | None = None):
        self.model = prepare_model(model)
        self.stats = stats
        self._ranges: dict[tuple, tuple[float, float]] = {}
        self.range_cache = range_cache
        self._load_ranges()
        self._param_cache: dict = {}
        self.node_names = [n.name for n in self.model.graph.node]
        inits = {i.name for i in self.model.graph.initializer}
        graph_inputs = {i.name for i in self.model.graph.input if i.name not in inits}
        # Weights of the layers reading model inputs (overflow_fix="first_layer") -> their per-channel axis.
        self.first_layer_weights = first_layer_weights(self.model)
        self.io_tensors = graph_inputs | {o.name for o in self.model.graph.output}
        self.depthwise = depthwise_inputs(self.model)
        self._opset21: onnx.ModelProto | None = None
        self.rounding: RoundingSource | None = None  # set by quantize.prepare: samples for rounding="learned"

    def _model_at_opset21(self) -> onnx.ModelProto:
        """The prepared model converted to opset 21 (once), where QuantizeLinear/DequantizeLinear take 16-bit types."""
        if self._opset21 is None:
            opset = next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
            m = self.model
            if opset < 21:
                from onnx import version_converter

                try:
                    m = onnx.shape_inference.infer_shapes(version_converter.convert_version(self.model, 21))
                except Exception as e:  # the converter raises bare RuntimeErrors/ValueErrors per op it cannot adapt
                    raise SensqError(f"16-bit activations need ONNX opset 21 and converting this opset-{opset} model failed: {e}",
                                     "export the model at opset 21, or use 8-bit activations") from e
            self._opset21 = m
        out = onnx.ModelProto()
        out.CopyFrom(self._opset21)
        return out

    # ranges ------------------------------------------------------------------------------------------------------
    def tensor_range(self, name: str, method: str, percentile: float, grid: Grid) -> tuple[float, float]:
        pct = normalize_percentile(percentile) if method == "percentile" else None
        key = (name, method, pct, grid)
        if key not in self._ranges:
            self._ranges[key] = compute_range(self.stats.tensors[name], method, grid, pct or 99.99, is_io=name in self.io_tensors)
        return self._ranges[key]

    def ranges(self, plan: PrecisionPlan, wide: set[str] = frozenset()) -> dict[str, tuple[float, float]]:
        """Range per tensor on the target's grid; the tensors in `wide` (16-bit in a mixed plan) on its 16-bit one."""
        target = get_target(plan.target, plan.activation_type)
        grid = Grid.for_activation(target.activation_type, target.activation_symmetric)
        grid16 = Grid.for_activation(wide_type(target.activation_type), target.activation_symmetric)
        before = len(self._ranges)
        out = {}
        for name in self.stats.tensors:
            o = plan.tensor_overrides.get(name, {})
            out[name] = self.tensor_range(name, o.get("method", plan.method), o.get("percentile", plan.percentile),
                                          grid16 if name in wide else grid)
        if len(self._ranges) > before:
            self._save_ranges()
        return out

    def _load_ranges(self) -> None:
        if self.range_cache is None or not self.range_cache.is_file():
            return
        try:
            data = json.loads(self.range_cache.read_text())
            if not isinstance(data, dict) or data.get("version") != range_methods.ALGORITHM_VERSION:
                log.info("range cache %s was computed by other range code; recomputing", self.range_cache)
                return
            for row in data["rows"]:
                name, method, qmin, qmax, symmetric, lo, hi = row
                self._ranges[(name, method, None, Grid(qmin, qmax, symmetric))] = (lo, hi)
        except (ValueError, TypeError, KeyError, OSError):
            log.warning("range cache %s unreadable; recomputing", self.range_cache)

    def _save_ranges(self) -> None:
        if self.range_cache is None:
            return
        rows = [[n, m, g.qmin, g.qmax, g.symmetric, lo, hi] for (n, m, _, g), (lo, hi) in self._ranges.items()
                if m in self.PERSISTED_METHODS]
        try:
            tmp = self.range_cache.with_suffix(f".{os.getpid()}.tmp")  # workers sharing the cache: one temp file each
            tmp.write_text(json.dumps({"version": range_methods.ALGORITHM_VERSION, "rows": rows}))
            tmp.replace(self.range_cache)
        except OSError as e:
            log.warning("could not write range cache %s: %s", self.range_cache, e)

    # build -------------------------------------------------------------------------------------------------------
    def build(self, plan: PrecisionPlan) -> onnx.ModelProto:
        target = get_target(plan.target, plan.activation_type).with_placement(plan.placement)
        unknown = [n for n in plan.float_nodes + plan.fp16_nodes if n not in set(self.node_names)]
        if unknown:
            raise SensqError(f"float node {unknown[0]!r} not in graph", "check node names (Netron shows them) or regenerate the plan for this model")
        act = QUANT_TYPES[target.activation_type]
        wide = act in (QuantType.QInt16, QuantType.QUInt16)
        mixed = bool(plan.a16_nodes) and not wide
        if wide or mixed:  # 16-bit QuantizeLinear/DequantizeLinear are standard ONNX from opset 21 on
            model = self._model_at_opset21()
        else:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
        a16 = a16_overrides(model, plan.a16_nodes, set(self.stats.tensors), target.activation_type,
                            target.activation_symmetric) if mixed else {}
        tensors_range = TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in self.ranges(plan, wide_tensors(a16)).items()
        })
        extra = {"ActivationSymmetric": target.activation_symmetric, "WeightSymmetric": True,
                 "QuantizeBias": target.quantize_bias}
        if target.no_output_quantization:  # TensorRT / NNCF place Q/DQ on inputs only
            extra["OpTypesToExcludeOutputQuantization"] = list(target.no_output_quantization)
        # no 8-bit kernel reads 16-bit activations, so nothing saturates: no 7-bit weights unless the plan asks
        fix = plan.overflow_fix or ("none" if wide else target.overflow_fix)
        if fix == "first_layer":
            # An override without "axis" makes onnxruntime quantize the weight per tensor: give the axis only when
            # the plan asks for per-channel weights, and then the one onnxruntime itself uses for that op.
            extra["TensorQuantOverrides"] = {w: [{"reduce_range": True, **({"axis": axis} if plan.per_channel else {})}]
                                             for w, axis in self.first_layer_weights.items()}
        if a16:
            extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}), **a16}  # weights vs activations: disjoint
        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT logs an info line per skipped tensor
        try:
            with _fast_find_by_name():
                q = _CachingQDQQuantizer(
                    model, plan.per_channel, fix == "all", QuantType.QInt8, act, tensors_range,
                    [], list(plan.float_nodes) + list(plan.fp16_nodes), list(target.resolved_op_types()), extra,
                    param_cache=self._param_cache)
                out = q.quantize_model()
        finally:
            logging.getLogger().setLevel(previous)
        per_channel_dw = target.depthwise_per_channel if plan.depthwise_per_channel is None else plan.depthwise_per_channel
        if per_channel_dw and self.stats.channels:
            grid = Grid.for_activation(target.activation_type, target.activation_symmetric)
            channels = {t: c for t, c in self.stats.channels.items() if t not in a16}  # 16-bit inputs keep theirs
            quantize_depthwise_inputs_per_channel(out, channels, self.depthwise, grid)
        if plan.weight_range == "mse":  # before bias correction: it corrects the final weights' rounding
            clip_weights_mse(out, self.model)
        if plan.bias_correction == "fast":
            if not self.stats.means:
                raise SensqError("fast bias correction needs conv-input means, which these statistics lack",
                                 "recalibrate (delete the statistics cache) or drop --bias-correction")
            correct_biases(out, self.model, self.stats.means)
        if plan.rounding == "learned":  # after the corrections: it starts from the model they made
            if self.rounding is None:
                raise SensqError("learned rounding needs calibration samples, which this builder was not given",
                                 "build through sensq.quantize.prepare(), or drop --rounding learned")
            apply_rounding(out, self.model, self.rounding.result_for(self, plan))
        if plan.fp16_nodes:  # last: every pass above reads float32 initializers
            out, _ = fp16_islands(out, plan.fp16_nodes)
        return out

    def build_to(self, plan: PrecisionPlan, path: str | Path) -> onnx.ModelProto:
        return write_model(self.build(plan), path)


def write_model(model: onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """Save a built model; an unwritable path is a user error."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    except OSError as e:
        raise SensqError(f"cannot write {path}: {e.strerror or e}", "choose an output path in a writable folder (-o / working_dir)") from e
    return model
