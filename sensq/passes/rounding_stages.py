"""Learned rounding, stage by stage, and its cache: the driver around passes/learned_rounding.py's per-conv solve.

A conv's stage is one past the deepest conv it reads from. Each stage is fitted on the quantized model with the
earlier stages' learned weights in place (sequential, as AdaRound and AIMET's Sequential MSE do), so every conv's
moments are taken on the inputs the final model feeds it.
Results are cached by the statistics key and the plan's weight-relevant fields (the plan with its search-added
float set and 16-bit groups removed), so a search pays once per distinct weight setting.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx

from .learned_rounding import (ConvSite, Moments, RoundingResult, accumulate, apply_rounding, find_sites, nearest_weights,
                               per_row, solve)

log = logging.getLogger("sensq")

ALGORITHM_VERSION = 3  # 3: act order; 2: GPTQ on ||(W - Ŵ)x̃||², bias kept; 1: fitted FP32 outputs, refit biases
ROUNDING_SAMPLES = 32  # calibration images the moments are taken on (alternately fitting and checking)


def conv_levels(model: onnx.ModelProto, names: set[str]) -> list[list[str]]:
    """The named convs in stages: a conv's stage is one past the latest conv it reads from (through any other
    nodes). No conv reads another of its own stage, so a stage's convs can be fitted together without one
    compensating an error the other is about to remove."""
    from graphlib import TopologicalSorter

    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = [n.name for n in model.graph.node]
    preds = {n.name: [producer[t].name for t in n.input if t in producer] for n in model.graph.node}
    level: dict[str, int] = {}
    for name in TopologicalSorter(preds).static_order():  # a built QDQ graph lists its Q/DQ nodes out of order
        level[name] = max((level[p] + (p in names) for p in preds[name]), default=0)
    stages: dict[int, list[str]] = {}
    for name in nodes:
        if name in names:
            stages.setdefault(level[name], []).append(name)
    return [stages[k] for k in sorted(stages)]


def prefix(model: onnx.ModelProto, outputs: list[str]) -> bytes:
    """The part of the graph the given tensors depend on, with those tensors as its outputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(t for t in node.input if t)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(n for n in model.graph.node if id(n) in keep)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs)
    used = {t for n in m.graph.node for t in n.input}
    kept_inits = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    inputs = [i for i in m.graph.input if i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    return m.SerializeToString()


def learn_rounding(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, feeds, budget_s: float = 600.0,
                   seed: int = 0, progress: bool = True) -> RoundingResult:
    """Learned weights for every conv site of qmodel, from the calibration feeds (an iterable of dicts),
    stage by stage (conv_levels); stages past the time budget keep nearest rounding."""
    import onnxruntime as ort
    from tqdm import tqdm

    from ..runtime import session_options

    t0 = time.perf_counter()
    sites = {s.name: s for s in find_sites(qmodel, float_model)}
    result = RoundingResult()
    if not sites:
        return result
    order = {name: i for i, name in enumerate(sites)}
    stages = conv_levels(qmodel, set(sites))
    feeds = list(feeds)
    work = copy.deepcopy(qmodel)
    opts = session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DQ outputs as the kernels see them
    bar = tqdm(total=len(stages) * len(feeds), desc="learned rounding", unit="img", disable=not progress, leave=False)
    for k, stage in enumerate(stages):
        if time.perf_counter() - t0 > budget_s:
            log.warning("learned rounding: time budget (%.0f s) reached after %d of %d stages; the rest keep "
                        "nearest rounding", budget_s, k, len(stages))
            result.kept_nearest.extend(n for st in stages[k:] for n in st)
            result.truncated = True
            break
        halves = _stage_moments([sites[n] for n in stage], work, feeds, opts, seed, order, bar)
        changed = RoundingResult()
        for name in stage:
            s = sites[name]
            w, errors = solve(s, nearest_weights(work, s), halves[0][name], halves[1][name])
            result.errors[name] = errors
            if errors["choice"] == 0:
                result.kept_nearest.append(name)
                continue
            changed.weights[name] = np.clip(np.round(w / per_row(s.weight_scale, w.ndim)), -s.qmax, s.qmax).astype(np.int8)
        apply_rounding(work, float_model, changed, [sites[n] for n in stage])  # work is a copy: same names
        result.weights.update(changed.weights)
    bar.close()
    result.images = len(feeds)
    result.seconds = time.perf_counter() - t0
    return result


def _stage_moments(stage: list[ConvSite], qmodel, feeds, opts, seed: int, order: dict, bar):
    from ..runtime import make_session

    q_inputs = {i.name for i in qmodel.graph.input}
    q_names = sorted({s.q_input for s in stage} - q_inputs)  # a conv reading a graph input: taken from the feed
    q_sess = make_session(prefix(qmodel, q_names), options=opts) if q_names else None
    qi = {i.name for i in q_sess.get_inputs()} if q_sess else set()
    halves: list[dict[str, Moments]] = [{}, {}]
    for i, feed in enumerate(feeds):
        q_out = dict(zip(q_names, q_sess.run(q_names, {k: v for k, v in feed.items() if k in qi}))) if q_sess else {}
        q_out.update({k: v for k, v in feed.items() if k in q_inputs})
        half = halves[i % 2]
        for s in stage:
            rng = np.random.default_rng([seed, order[s.name], i])  # the same positions whatever else runs
            half[s.name] = accumulate(half.get(s.name), s, q_out[s.q_input][0], rng)
        bar.update(1)
    return halves


class RoundingSource:
    """What the builder needs for plans with rounding="learned": calibration samples, the base plan's float nodes
    (the weight setting ignores search-added float groups), the time budget and the cache folder."""

    def __init__(self, feeds, base_float_nodes: set[str], budget_s: float, cache: Path | None, progress: bool = True):
        self.feeds, self.base_float_nodes, self.budget_s = feeds, set(base_float_nodes), budget_s
        self.cache, self.progress = cache, progress
        self._memo: dict[str, RoundingResult] = {}

    def reference_plan(self, plan):
        from ..plan import PrecisionPlan

        d = plan.to_dict()
        d.update(float_nodes=sorted(set(plan.float_nodes) & self.base_float_nodes), a16_nodes=[], fp16_nodes=[],
                 rounding=None)
        return PrecisionPlan.from_dict(d)

    def result_for(self, builder, plan) -> RoundingResult:
        ref = self.reference_plan(plan)
        key = hashlib.sha256(f"{builder.stats.key}|{ref.key()}|{ALGORITHM_VERSION}|{ROUNDING_SAMPLES}".encode()).hexdigest()[:16]
        if key in self._memo:
            return self._memo[key]
        path = self.cache / f"{builder.stats.key}.rounding.{key}.npz" if self.cache else None
        result = _load(path) if path is not None else None
        if result is None:
            result = learn_rounding(builder.build(ref), builder.model, self.feeds(), self.budget_s, progress=self.progress)
            log.info("%s", result.summary())
            if path is not None and not result.truncated:
                _save(path, result)
        else:
            log.info("learned rounding from cache %s (%d convs changed)", path, len(result.weights))
        self._memo[key] = result
        return result


def _save(path: Path, result: RoundingResult) -> None:
    names = sorted(result.weights)
    arrays = {f"w{i}": result.weights[n] for i, n in enumerate(names)}
    meta = {"names": names, "errors": result.errors, "kept_nearest": result.kept_nearest, "images": result.images,
            "seconds": result.seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)
    except OSError as e:
        log.warning("could not write learned-rounding cache %s: %s", path, e)


def _load(path: Path) -> RoundingResult | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            out = RoundingResult(errors=meta["errors"], kept_nearest=meta["kept_nearest"], images=meta["images"],
                                 seconds=meta["seconds"])
            for i, n in enumerate(meta["names"]):
                out.weights[n] = z[f"w{i}"]
        return out
    except Exception:
        log.warning("learned-rounding cache %s is unreadable; recomputing", path)
        return None
