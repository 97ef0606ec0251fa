"""The quantize pipeline: model -> statistics (cached) -> plan -> QDQ model, with float regions resolved up front.

`prepare()` does the expensive, plan-independent part once (load, simplify, calibrate or hit the cache) and returns
a `Workspace` that sensitivity analysis and search reuse to build many plans.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .build import QDQBuilder, RoundingSource, write_model
from .config import QuantizeConfig
from .data import SyntheticData, build_calibration_data
from .errors import SensqError
from .heads import HEAD_LAYERS_REASON, HeadInfo, confirm_head, detect_head, head_layer_nodes
from .locks import file_lock
from .model import Graph, load_model, simplify, truncation_region
from .passes.float_shield import shield_float_nodes
from .passes.rounding_stages import ROUNDING_SAMPLES
from .plan import PrecisionPlan
from .statistics import CalibrationStats, collect, stats_key

log = logging.getLogger("sensq")


def cache_dir(cfg: QuantizeConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq"))


@dataclass
class Workspace:
    """Plan-independent state of one model + calibration set."""

    cfg: QuantizeConfig
    model: onnx.ModelProto
    graph: Graph
    head: HeadInfo | None
    stats: CalibrationStats
    builder: QDQBuilder
    base_plan: PrecisionPlan
    float_reasons: dict[str, list[str]] = field(default_factory=dict)  # reason -> nodes
    stats_cached: bool = False
    calibration_seconds: float = 0.0
    data: object = None  # the calibration samples (CalibrationData or SyntheticData), re-read for analysis
    head_layers: set[str] = field(default_factory=set)  # a detector's head layers kept float (--head-layers float)

    def probe_float_nodes(self, plan: PrecisionPlan | None = None) -> list[str]:
        """Where error probes measure: at the inputs of the plan's float nodes other than the head layers, which
        carry the quantized features' error, float, into the decode (measuring before them would miss it)."""
        return sorted(set((plan or self.base_plan).float_nodes) - self.head_layers)

    def samples(self, n: int) -> list[dict]:
        """The first n calibration samples as feed dicts (analysis runs on these, as xquant's report does)."""
        out = []
        for feed in self.data:
            if len(out) >= n:
                break
            out.append(feed)
        return out

    def build(self, plan: PrecisionPlan | None = None) -> onnx.ModelProto:
        plan = plan or self.base_plan
        qmodel = self.builder.build(plan)
        shield_float_nodes(qmodel, plan.float_nodes)  # else onnxruntime re-quantizes float Conv/Gemm weights
        return qmodel

    def build_to(self, plan: PrecisionPlan | None, path: str | Path) -> onnx.ModelProto:
        return write_model(self.build(plan), path)


def load_and_simplify(cfg: QuantizeConfig) -> onnx.ModelProto:
    model = _simplified(cfg)
    if cfg.equalize != "none":  # before calibration: it changes the activation ranges (and so the statistics key)
        from .passes.equalization import equalize

        model, pairs = equalize(model, cfg.equalize)
        log.info("cross-layer equalization (%s): %d conv pairs", cfg.equalize, pairs)
    return model


def _simplified(cfg: QuantizeConfig) -> onnx.ModelProto:
    model = load_model(cfg.model_path)
    if cfg.skip_onnxsim:
        return model
    slim = simplify(model)
    # Simplifiers may rename or fold tensors the user refers to; never trade a working config for a smaller graph.
    needed = set(cfg.truncate_var_names) | {t for cs in cfg.custom_setting for t in cs.input_names + cs.output_names}
    needed_nodes = set(cfg.float_nodes) | {n for cs in cfg.custom_setting for n in cs.node_names}
    g, g0 = Graph(slim), Graph(model)
    needed = {t for t in needed if g0.has_tensor(t)}  # misspelled names are reported later, by the stage that uses them
    needed_nodes = {n for n in needed_nodes if n in g0.nodes}
    if any(not g.has_tensor(t) for t in needed) or any(n not in g.nodes for n in needed_nodes):
        log.warning("onnxslim removed a tensor or node named in the config; using the model unsimplified")
        return model
    return slim


def resolve_float_regions(cfg: QuantizeConfig, graph: Graph, head: HeadInfo | None,
                          warn: bool = True) -> tuple[PrecisionPlan, dict[str, list[str]]]:
    """The base plan: float nodes with their reasons (truncation, detector head, custom_setting, float_nodes, op
    types). Raises on names the graph does not have; `warn=False` checks without logging (prepare's early pass)."""
    reasons: dict[str, list[str]] = {}
    overrides: dict[str, dict] = {}
    if cfg.truncate_var_names:
        after, warnings = truncation_region(graph, cfg.truncate_var_names)
        for w in warnings if warn else []:
            log.warning(w)
        reasons[f"after truncate_var_names {cfg.truncate_var_names}"] = sorted(after)
    if head is not None and cfg.auto_float_head:
        covered = set().union(*reasons.values()) if reasons else set()
        extra = head.float_nodes - covered
        if extra:
            reasons[head.reason] = sorted(extra)
        layers = head_layer_nodes(graph, head) - covered if cfg.head_layers == "float" else set()
        if layers:
            reasons[HEAD_LAYERS_REASON.format(n=len(layers))] = sorted(layers)
    for i, cs in enumerate(cfg.custom_setting):
        nodes = set(cs.node_names) if cs.node_names else graph.subgraph(cs.input_names, cs.output_names)
        missing = [n for n in nodes if n not in graph.nodes]
        if missing:
            raise SensqError(f"custom_setting[{i}] node {missing[0]!r} not in graph", "check the node names against the model")
        if (cs.precision_level or 0) >= 1:
            reasons[f"custom_setting[{i}] precision_level {cs.precision_level}"] = sorted(nodes)
        elif cs.calibration_type or cs.max_percentile:
            o = {}
            if cs.calibration_type:
                o["method"] = cs.calibration_type
            if cs.max_percentile:
                from .ranges import normalize_percentile

                o["percentile"] = normalize_percentile(cs.max_percentile)
                o.setdefault("method", "percentile")
            for n in nodes:
                for t in graph.nodes[n].output:
                    overrides[t] = o
    if cfg.float_nodes:
        missing = [n for n in cfg.float_nodes if n not in graph.nodes]
        if missing:
            raise SensqError(f"float node {missing[0]!r} not in graph", "check the node names (Netron shows them)")
        reasons["listed in float_nodes"] = sorted(cfg.float_nodes)
    if cfg.float_op_types:
        ops = set(cfg.float_op_types)
        reasons[f"op type in float_op_types {sorted(ops)}"] = sorted(n for n, node in graph.nodes.items() if node.op_type in ops)
    if cfg.precision_level and warn:
        log.warning("global precision_level %s: sensq applies precision_level to custom_setting regions only", cfg.precision_level)
    float_nodes = sorted(set().union(*reasons.values())) if reasons else []
    plan = PrecisionPlan(method=cfg.calibration_type, percentile=cfg.max_percentile, per_channel=cfg.per_channel,
                         float_nodes=float_nodes, tensor_overrides=overrides, target=cfg.target,
                         activation_type=cfg.activation_type, overflow_fix=cfg.overflow_fix,
                         placement=None if cfg.placement in ("auto", "fused") else cfg.placement,
                         bias_correction=cfg.bias_correction, weight_range=cfg.weight_range, rounding=cfg.rounding,
                         notes=[f"{len(v)} node(s) float: {k}" for k, v in reasons.items()])
    return plan, reasons


def calibration_statistics(cfg: QuantizeConfig, model: onnx.ModelProto, yolo: bool, progress: bool = True):
    """Statistics from the cache when model, files and preprocessing match; else one calibration pass."""
    if cfg.data_free:
        data = SyntheticData(cfg, model, yolo)
        log.warning("data-free mode: activation ranges come from %d synthetic inputs; expect lower accuracy than "
                    "with real calibration images (the per-layer report shows where)", len(data))
    else:
        data = build_calibration_data(cfg, model, yolo)
    model_bytes = model.SerializeToString()
    key = stats_key(model_bytes, data.fingerprint())
    path = cache_dir(cfg) / "stats" / f"{key}.npz"
    stats = _cached_stats(path, key)
    if stats is not None:
        return stats, True, 0.0, data
    try:  # one process calibrates a given model and data at a time; the others wait and read its statistics
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = file_lock(path.with_suffix(".lock"))
    except OSError as e:
        log.warning("calibration cache folder %s is not writable (%s): calibrating without it", path.parent, e)
        lock = contextlib.nullcontext()
    with lock:
        stats = _cached_stats(path, key)  # written while this process waited for the lock
        if stats is not None:
            return stats, True, 0.0, data
        t = time.perf_counter()
        stats = collect(model, iter(data), len(data), progress=progress)
        seconds = time.perf_counter() - t
        stats.key = key
        try:
            stats.save(path)  # atomic rename: readers without the lock never see half a file
        except OSError as e:
            log.warning("could not write calibration cache %s: %s", path, e)
    return stats, False, seconds, data


def _cached_stats(path: Path, key: str) -> CalibrationStats | None:
    if not path.is_file():
        return None
    try:
        stats = CalibrationStats.load(path)
    except Exception:
        log.warning("calibration cache %s is unreadable; recalibrating", path)
        return None
    if stats.key != key:
        return None
    log.info("calibration statistics from cache %s (%d samples)", path, stats.n_samples)
    return stats


def prepare(cfg: QuantizeConfig, progress: bool = True) -> Workspace:
    model = load_and_simplify(cfg)
    graph = Graph(model)
    # Pass 1 (names, structure) decides the preprocessing; config errors surface before calibration.
    head = detect_head(graph)
    resolve_float_regions(cfg, graph, head, warn=False)
    stats, cached, seconds, data = calibration_statistics(cfg, model, yolo=head is not None, progress=progress)
    head = confirm_head(head, graph, stats.tensors)  # pass 2: what the statistics show, printed as the reason
    plan, reasons = resolve_float_regions(cfg, graph, head)
    if cfg.equalize != "none":
        plan.notes.append(f"cross-layer equalization ({cfg.equalize}) applied to the float model before calibration")
    builder = QDQBuilder(model, stats, range_cache=cache_dir(cfg) / "stats" / f"{stats.key}.ranges.json")
    ws = Workspace(cfg, model, graph, head, stats, builder, plan, reasons, cached, seconds, data)
    if head is not None and cfg.auto_float_head and cfg.head_layers == "float":
        ws.head_layers = head_layer_nodes(graph, head) & set(plan.float_nodes)
    builder.rounding = RoundingSource(lambda: ws.samples(ROUNDING_SAMPLES), set(plan.float_nodes), cfg.rounding_budget,
                                      cache_dir(cfg) / "stats", progress)
    if cfg.placement == "auto":
        from .recipe import choose_placement

        ws.base_plan = choose_placement(ws)
    return ws


@dataclass
class QuantizeResult:
    output: Path
    plan: PrecisionPlan
    float_reasons: dict[str, list[str]]
    stats_cached: bool
    calibration_seconds: float
    build_seconds: float
    reports: dict[str, Path] = field(default_factory=dict)


def quantize(cfg: QuantizeConfig, output: str | Path | None = None, progress: bool = True, analyze: bool | None = None) -> QuantizeResult:
    """Python API of `sensq quantize`."""
    ws = prepare(cfg, progress=progress)
    out = Path(output) if output else cfg.output_model
    t = time.perf_counter()
    ws.build_to(ws.base_plan, out)
    build_seconds = time.perf_counter() - t
    result = QuantizeResult(out, ws.base_plan, ws.float_reasons, ws.stats_cached, ws.calibration_seconds, build_seconds)
    if analyze if analyze is not None else cfg.analysis_enable:
        from .analysis import cumulative_report

        result.reports = cumulative_report(ws, out_prefix=out.parent / out.name.removesuffix(".onnx").removesuffix(".q"), progress=progress)
    return result
