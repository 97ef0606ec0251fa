"""Which layer group, kept float, recovers the most task accuracy: a cheap proxy for every group, the task metric for
as many as a time budget allows.

1. Proxy, every group: that group alone quantized (the rest float), SNR = ||q - f||^2 / ||f||^2 at the quantized
   region's outputs (the tensors the float head reads, after their Q/DQ, else the model outputs) on a few
   calibration samples (evaluators/layer_error.RegionErrorProbe).
2. Task metric, the groups the proxy ranks worst first, while `budget_seconds` allows: the default INT8 model with
   that group float, scored on the given samples (leave-one-out). Every such model is a plan the search can start
   from; its per-sample results stay in the scorer's store.
3. Ranking: metric-scored groups by their gain over all-INT8 (ties by proxy), then proxy-only groups by proxy.
   Spearman's rho between the two rankings over the metric-scored groups tells how far the proxy can be trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .targets import get_target

log = logging.getLogger("sensq")

DEFAULT_BUDGET_SECONDS = 120.0


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


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs or a constant side."""
    a, b = pd.Series(np.asarray(a, np.float64)), pd.Series(np.asarray(b, np.float64))
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1])


@dataclass
class SensitivityResult:
    # group, n_nodes, proxy_snr, proxy_sqnr_db, metric, delta, scored_by ("metric" | "proxy"), model_hash
    table: pd.DataFrame
    metric_name: str
    int8_metric: float
    fp32_metric: float
    n_samples: int  # samples each metric score is computed on
    seconds: float
    budget_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ranked(self) -> pd.DataFrame:
        """The table, most sensitive first, with a 0-based `rank` column (the one ranking rule of sensq)."""
        t = self.table.copy()
        t["_scored"] = (t["scored_by"] == "metric").astype(int)
        t["_delta"] = t["delta"].fillna(-np.inf)
        t = t.sort_values(["_scored", "_delta", "proxy_snr"], ascending=[False, False, False], kind="mergesort")
        t = t.drop(columns=["_scored", "_delta"]).reset_index(drop=True)
        t.insert(0, "rank", np.arange(len(t)))
        return t

    @property
    def ranked_groups(self) -> list[str]:
        return list(self.ranked["group"])

    @property
    def proxy_agreement(self) -> float:
        """Spearman's rho between proxy SNR and metric gain over the groups scored by both."""
        scored = self.table[self.table["scored_by"] == "metric"]
        return spearman(scored["proxy_snr"], scored["delta"])

    def to_json(self) -> dict:
        return {"metric_name": self.metric_name, "int8_metric": self.int8_metric, "fp32_metric": self.fp32_metric,
                "n_samples": self.n_samples, "seconds": self.seconds, "budget_seconds": self.budget_seconds,
                "notes": self.notes, "rows": self.table.replace({np.nan: None}).to_dict(orient="records")}

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityResult":
        table = pd.DataFrame(d["rows"]).astype({"metric": float, "delta": float, "proxy_snr": float})
        return cls(table, d["metric_name"], d["int8_metric"], d["fp32_metric"], d["n_samples"], d["seconds"],
                   d.get("budget_seconds"), d.get("notes", []))


def sensitivity_key(ws, evaluator, indices, depth, by, budget_seconds, proxy_samples) -> str:
    idx = hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:12]
    raw = json.dumps([ws.stats.key, ws.base_plan.key(), evaluator_signature(evaluator), idx, depth, by,
                      budget_seconds, proxy_samples, 3], default=str)  # 3: weight-free groups folded
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def run_sensitivity(ws, evaluator, indices=None, depth: int = 1, by: str = "auto", progress: bool = True,
                    cache: Path | None = None, proxy_samples: int = 8, budget_seconds: float | None = DEFAULT_BUDGET_SECONDS,
                    scorer=None, limit: int | None = None) -> SensitivityResult:
    """Proxy for every group, leave-one-out task metric for the proxy's worst groups within `budget_seconds`
    (None: all groups). Scores use `indices` of the evaluation set (default: the first `limit`, else all)."""
    from .evaluators.samples import PairedBootstrap
    from .evaluators.scoring import SampleStore, Scorer, model_hash
    from .quantize import cache_dir

    n_all = len(evaluator)
    indices = np.arange(min(limit or n_all, n_all)) if indices is None else np.asarray(indices, np.int64)
    key = sensitivity_key(ws, evaluator, indices, depth, by, budget_seconds, proxy_samples)
    cache_file = cache / f"sensitivity-{key}.json" if cache else None
    if cache_file and cache_file.is_file():
        log.info("sensitivity from cache %s", cache_file)
        return SensitivityResult.from_json(json.loads(cache_file.read_text()))
    if scorer is None:
        scorer = Scorer(evaluator, SampleStore(cache_dir(ws.cfg) / "samples", evaluator), np.arange(n_all))
    t0 = time.perf_counter()
    groups = quantizable_groups(ws, depth, by)
    fp32 = scorer.score(ws.model, model_hash(ws.model), indices)
    int8_model = ws.build()
    int8 = scorer.score(int8_model, model_hash(int8_model), indices)
    int8_value = int8.value(indices)

    from .evaluators.layer_error import RegionErrorProbe

    probe = RegionErrorProbe(ws.builder.model, ws.probe_float_nodes(), ws.samples(proxy_samples))
    quantizable = {n for nodes in groups.values() for n in nodes}
    rows = {}
    for g, nodes in tqdm(groups.items(), desc="sensitivity: proxy", unit="group", disable=not progress, leave=False):
        isolated = ws.build(ws.base_plan.with_float(quantizable - set(nodes)))  # only this group quantized
        snr = float(probe(isolated)["Output SNR"])
        rows[g] = {"group": g, "n_nodes": len(nodes), "proxy_snr": snr,
                   "proxy_sqnr_db": float(-10 * np.log10(snr)) if snr > 0 else float("inf"),
                   "metric": np.nan, "delta": np.nan, "scored_by": "proxy", "model_hash": None}
    by_proxy = sorted(rows, key=lambda g: -rows[g]["proxy_snr"])
    boot = PairedBootstrap(indices, SENSITIVITY_BOOT, 0) if scorer.per_sample and len(indices) > 1 else None
    spent, costs = time.perf_counter() - t0, []
    bar = tqdm(by_proxy, desc="sensitivity: metric", unit="group", disable=not progress, leave=False)
    for g in bar:
        if budget_seconds is not None and costs and spent + float(np.mean(costs)) > budget_seconds:
            break
        t = time.perf_counter()
        model = ws.build(ws.base_plan.with_float(groups[g]))
        h = model_hash(model)
        samples = scorer.score(model, h, indices)
        value = samples.value(indices)
        rows[g].update(metric=value, delta=value - int8_value, scored_by="metric", model_hash=h)
        if boot is not None:  # the gain's paired interval: is it distinguishable from 0 on these samples?
            d = boot.difference(samples, int8)
            rows[g].update(delta_lo=d.lo, delta_hi=d.hi, distinguishable=bool(d.lo > 0 or d.hi < 0))
        costs.append(time.perf_counter() - t)
        spent = time.perf_counter() - t0
        bar.set_postfix_str(f"{g}: {value:.4f}")
    n_metric = sum(r["scored_by"] == "metric" for r in rows.values())
    notes = [f"all {n_metric} groups scored by the task metric" if n_metric == len(rows) else
             f"{n_metric} of {len(rows)} groups scored by the task metric, the rest by the proxy only"
             + (f" (budget {budget_seconds:.0f} s)" if budget_seconds is not None else "")]
    if boot is not None:
        notes += resolution_notes(rows, boot.difference(fp32, int8), len(indices))
    result = SensitivityResult(pd.DataFrame(list(rows.values())), int8.primary or getattr(evaluator, "primary", "metric"),
                               int8_value, fp32.value(indices), len(indices), time.perf_counter() - t0, budget_seconds,
                               notes)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(result.to_json(), indent=1, default=float))
    return result


SENSITIVITY_BOOT = 1000


def resolution_notes(rows: dict, gap, n: int) -> list[str]:
    """What the leave-one-out gains can say on n samples: which are distinguishable from 0 (paired 95 % interval),
    and whether a gain as large as the whole FP32 - all-INT8 gap would be resolvable at all."""
    scored = [r for r in rows.values() if "distinguishable" in r]
    clear = [r["group"] for r in sorted(scored, key=lambda r: -r["delta"]) if r["distinguishable"]]
    out = [f"{len(clear)} of {len(scored)} leave-one-out gains are distinguishable from 0 (paired 95 % interval, "
           f"{n} samples)" + (f": {', '.join(clear[:8])}" if clear else "; the ranking of the others is noise")]
    if not (gap.lo > 0 or gap.hi < 0):
        out.append(f"even FP32's gain over all-INT8 ({gap.value:+.4f} [{gap.lo:+.4f}, {gap.hi:+.4f}]) is not "
                   f"distinguishable from 0 on {n} samples: a group's gain, at most that, cannot be resolved here "
                   "(more samples: --limit / a larger --data set)")
    return out


def write_report(result: SensitivityResult, out_dir: Path, top_k: int = 10) -> dict[str, Path]:
    from .reports.sensitivity_report import write_sensitivity_report

    return write_sensitivity_report(result, out_dir, top_k)


def summary(result: SensitivityResult, top_k: int = 10) -> str:
    from .reports.sensitivity_report import format_topk

    head = (f"Sensitive summary ({result.metric_name}; FP32 {result.fp32_metric:.4f}, all-INT8 {result.int8_metric:.4f}"
            f" on {result.n_samples} samples; {result.notes[0] if result.notes else ''}):")
    return "\n".join([head, format_topk(result, top_k), *result.notes[1:]])
