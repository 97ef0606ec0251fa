"""Latency confirmation: after the trials, the plans that may be on the front are re-timed together.

During the search each graph structure is timed once, at its own moment, against its own FP32 rounds; on a shared
machine the ratio drifts between such moments by more than one measurement's interval shows, so a plan with more
float groups can come out faster than all-INT8. Here FP32, all-INT8 and every plan whose latency interval overlaps
the front's run in the same interleaved rounds (sensq.latency.paired.measure_together), and the front, the
recommendation and the "ms" column are rebuilt from those rounds. Deterministic backends (bops, table) are exact
and need no confirmation.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import asdict, dataclass, field

from ..latency import measure_together
from ..latency.paired import CONFIRM_MIN_ROUNDS, RUNS_PER_ROUND
from .pareto import front_indices

log = logging.getLogger("sensq")

LATENCY_CONFIRM_SECONDS = 60.0  # default budget of the stage (builds, sessions and rounds)
SESSION_OVERHEAD_S = 0.5  # per model: session creation and warm-up runs, for planning what fits the budget
MAX_PLANS = 8  # plans re-timed besides FP32 and all-INT8: a few measured well beat many measured loosely (each
# model in a round costs the others rounds; with 28 plans yolov5n got 14 rounds and +-12 % intervals in 60 s)


@dataclass
class LatencyConfirmation:
    """Ratios to FP32 of the re-timed models, all from the same rounds; keyed by model hash."""

    by_hash: dict[str, dict]
    trials: list[int]  # trials re-timed (all-INT8's trial included when it has one)
    skipped: dict[int, str] = field(default_factory=dict)  # trial -> why it was not re-timed
    rounds: int = 0
    seconds: float = 0.0
    budget: float = LATENCY_CONFIRM_SECONDS
    fp32_hash: str = ""
    date: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def candidates(rows: list[dict]) -> tuple[list[dict], dict[int, str]]:
    """Rows (full trials, FP32 first with trial -1) that could be on the front once latency is re-measured, front
    points first (cheapest first), then the others by how much their interval overlaps the front's: a plan is left
    out only when a front point at least as accurate is faster with disjoint intervals."""
    idx = front_indices([r["metric"] for r in rows], [r["ratio"] for r in rows], [r["trial"] for r in rows])
    front = [rows[i] for i in idx]
    chosen, skipped = [], {}
    for r in rows:
        if r["trial"] < 0 or r.get("ratio") is None:
            continue
        by = next((f for f in front if f is not r and f["metric"] >= r["metric"] and f["ratio_hi"] is not None
                   and r["ratio_lo"] is not None and f["ratio_hi"] < r["ratio_lo"]), None)
        if by is None:
            chosen.append(r)
        else:
            skipped[r["trial"]] = (f"dominated at search time by {'FP32' if by['trial'] < 0 else 'trial %d' % by['trial']} "
                                   f"(as accurate, faster with disjoint latency intervals)")
    on_front = {id(f) for f in front}

    def gap(r) -> float:  # how far r's interval starts above that of the fastest front point as accurate as r
        return max((r["ratio_lo"] - f["ratio_hi"] for f in front if f is not r and f["metric"] >= r["metric"]
                    and f["ratio_hi"] is not None and r["ratio_lo"] is not None), default=-math.inf)

    chosen.sort(key=lambda r: (id(r) not in on_front, r["ratio"] if id(r) in on_front else gap(r), r["trial"]))
    return chosen, skipped


def confirm_latency(rows: list[dict], build, backend, fp32_model, fp32_hash: str, int8_model, int8_hash: str,
                    budget: float = LATENCY_CONFIRM_SECONDS, seed: int = 0, lock_dir=None,
                    progress: bool = False) -> LatencyConfirmation | None:
    """Re-time FP32, all-INT8 and the candidate plans of `rows` together within `budget` seconds.

    `build(plan_dict)` gives a plan's model. Candidates are added front first while the planned cost (their
    search-time ms x runs x the minimum rounds, plus session set-up) fits the budget; the rest are listed as skipped."""
    if backend.deterministic or budget <= 0:
        return None
    t0 = time.perf_counter()
    chosen, skipped = candidates(rows)
    per_ms = {r["model_hash"]: r.get("latency_value") or 0.0 for r in rows}
    models = {fp32_hash: fp32_model, int8_hash: int8_model}
    trial_of = {}
    planned_ms = per_ms.get(fp32_hash, 0.0) + per_ms.get(int8_hash, 0.0)
    for r in chosen:
        if r["model_hash"] in models:  # all-INT8's own trial: already in every round
            trial_of[r["model_hash"]] = r["trial"]
            continue
        if len(models) - 2 >= MAX_PLANS:
            skipped[r["trial"]] = f"not re-timed: {MAX_PLANS} plans closer to the front were (front points first)"
            continue
        need = CONFIRM_MIN_ROUNDS * (RUNS_PER_ROUND + 1) * (planned_ms + per_ms[r["model_hash"]]) / 1e3 \
            + SESSION_OVERHEAD_S * (len(models) + 1)
        if time.perf_counter() - t0 + need > budget:
            skipped[r["trial"]] = f"not re-timed: the {budget:.0f} s latency-confirmation budget was used up"
            continue
        models[r["model_hash"]] = build(r["plan"])
        trial_of[r["model_hash"]] = r["trial"]
        planned_ms += per_ms[r["model_hash"]]
    remaining = budget - (time.perf_counter() - t0) - SESSION_OVERHEAD_S * len(models)
    log.info("latency confirmation: %d models (FP32, all-INT8 and %d plans) in one interleaved session, %.0f s budget",
             len(models), len(models) - 2, budget)
    measured = measure_together(backend, models, fp32_hash, max(remaining, 0.0), seed=seed, lock_dir=lock_dir,
                                progress=progress)
    by_hash = {h: {**m.to_dict(), "round_ratios": m.details["round_ratios"]} for h, m in measured.items()}
    for v in by_hash.values():
        v.pop("details", None)
    rounds = next(iter(measured.values())).rounds
    return LatencyConfirmation(by_hash, sorted(trial_of.values()), skipped, rounds, round(time.perf_counter() - t0, 2),
                               budget, fp32_hash, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
