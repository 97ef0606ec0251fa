"""Layer groups and leave-one-out sensitivity: which group, kept float, recovers the most task accuracy.

Groups are module prefixes of node names ('/model.24/m.0/Conv' -> 'model.24' at depth 1) or single nodes. Any
split is executable: ONNX Runtime runs a QDQ graph with any set of float nodes (a float node reads dequantized
values), so grouping only decides what the search toggles together; grouping by module keeps a Conv with its
activation, which is also where the runtime fuses them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .targets import get_target

log = logging.getLogger("sensq")


def quantizable_groups(ws, depth: int = 1, by: str = "auto") -> dict[str, list[str]]:
    """Groups of nodes the base plan quantizes, in graph order (see sensq.grouping)."""
    from .grouping import layer_groups

    target = get_target(ws.base_plan.target, ws.base_plan.activation_type)
    ops = set(target.resolved_op_types())
    floating = set(ws.base_plan.float_nodes)
    nodes = [n.name for n in ws.builder.model.graph.node if n.name not in floating and n.op_type in ops]
    return layer_groups(ws.graph, nodes, "module" if by == "group" else by, depth)


def evaluator_signature(evaluator) -> str:
    sig = getattr(evaluator, "signature", None)
    return sig() if callable(sig) else f"{getattr(evaluator, 'name', type(evaluator).__name__)}:{len(evaluator)}:{evaluator.primary}"


@dataclass
class SensitivityResult:
    table: pd.DataFrame  # group, metric, delta, output_snr, n_nodes
    metric_name: str
    int8_metric: float
    fp32_metric: float
    limit: int | None
    seconds: float

    @property
    def ranked_groups(self) -> list[str]:
        """Most sensitive first: by task metric with the group float, ties (common for top-1 on a few hundred
        images) broken by the output SNR of the model with this group float: a lower SNR means the group's
        quantization did more damage, so floating it helps more."""
        order = self.table.assign(_snr=self.table.get("output_snr", 0.0))
        return list(order.sort_values(["metric", "_snr"], ascending=[False, True], kind="mergesort")["group"])

    def to_json(self) -> dict:
        return {"metric_name": self.metric_name, "int8_metric": self.int8_metric, "fp32_metric": self.fp32_metric,
                "limit": self.limit, "seconds": self.seconds, "rows": self.table.to_dict(orient="records")}

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityResult":
        return cls(pd.DataFrame(d["rows"]), d["metric_name"], d["int8_metric"], d["fp32_metric"], d["limit"], d["seconds"])


def sensitivity_key(ws, evaluator, limit, depth, by) -> str:
    raw = json.dumps([ws.stats.key, ws.base_plan.key(), evaluator_signature(evaluator), limit, depth, by], default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def run_sensitivity(ws, evaluator, limit: int | None = None, depth: int = 1, by: str = "group", progress: bool = True,
                    cache: Path | None = None, proxy_samples: int = 8) -> SensitivityResult:
    """Leave-one-out: the default INT8 model with one group float, scored by the task metric and by output SNR."""
    from .evaluators.layer_error import output_errors
    from .runtime import make_session

    key = sensitivity_key(ws, evaluator, limit, depth, by)
    cache_file = cache / f"sensitivity-{key}.json" if cache else None
    if cache_file and cache_file.is_file():
        log.info("sensitivity from cache %s", cache_file)
        return SensitivityResult.from_json(json.loads(cache_file.read_text()))
    t0 = time.perf_counter()
    groups = quantizable_groups(ws, depth, by)
    fp32 = evaluator.evaluate(ws.model, limit=limit, progress=False)
    int8 = evaluator.evaluate(ws.build(), limit=limit, progress=False)
    feeds = ws.samples(proxy_samples)
    fsess = make_session(ws.model)
    out_names = [o.name for o in fsess.get_outputs()]
    float_out = [fsess.run(out_names, f) for f in feeds]
    rows = []
    bar = tqdm(groups.items(), desc="sensitivity", unit="group", disable=not progress)
    for g, nodes in bar:
        qmodel = ws.build(ws.base_plan.with_float(nodes))
        res = evaluator.evaluate(qmodel, limit=limit, progress=False)
        qsess = make_session(qmodel)
        snr = output_errors(float_out, [qsess.run(out_names, f) for f in feeds])["Output SNR"]
        rows.append({"group": g, "metric": res.value, "delta": res.value - int8.value, "output_snr": snr, "n_nodes": len(nodes)})
        bar.set_postfix_str(f"{g}: {res.value:.4f}")
    table = pd.DataFrame(rows)
    result = SensitivityResult(table, int8.primary, int8.value, fp32.value, limit, time.perf_counter() - t0)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(result.to_json(), indent=1, default=float))
    return result


def write_report(result: SensitivityResult, out_dir: Path, top_k: int = 10) -> dict[str, Path]:
    from .reports.sensitivity_report import write_sensitivity_report

    return write_sensitivity_report(result.table, out_dir, result.metric_name, result.int8_metric, result.fp32_metric, top_k)


def summary(result: SensitivityResult, top_k: int = 10) -> str:
    from .reports.sensitivity_report import format_topk

    head = (f"Sensitive summary ({result.metric_name}; FP32 {result.fp32_metric:.4f}, all-INT8 {result.int8_metric:.4f}"
            f"{'' if result.limit is None else f', first {result.limit} samples'}):")
    return head + "\n" + format_topk(result.table, top_k, result.metric_name, result.int8_metric)
