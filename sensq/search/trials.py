"""One trial, start to finish: build the plan's QDQ model, score it on the low-fidelity samples, stop it there when
the paired evidence says it cannot reach the front, else score the rest of the search split and measure its latency
(once per graph structure and machine)."""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import RuntimeRejected
from ..evaluators.scoring import model_hash
from ..latency import bops, measure_paired, measurement_lock, structure_key
from ..latency.paired import SEARCH_RUNS_PER_ROUND
from ..latency.fusion import fusion_report
from ..plan import PrecisionPlan
from ..runtime import make_session
from .fidelity import prune_decision, ratio_and_ci
from .records import LatencyBook, TrialRecord

log = logging.getLogger("sensq")


@dataclass
class TrialContext:
    """What a trial reads, set up by the search's reference and study stages."""

    ws: object  # sensq.quantize.Workspace: builds the plan
    split: object  # search/splits.Split
    scorer: object  # evaluators/scoring.Scorer (per-sample results in the shared store)
    int8: object  # all-INT8's per-sample results (delta_int8)
    low_boot: object  # PairedBootstrap over the low-fidelity samples (pruning)
    low_values: dict  # trial -> value on the low-fidelity samples (pruning's memo, shared across trials)
    book: LatencyBook  # latency per graph structure and machine
    backend: object  # latency backend
    reference_timer: object  # FP32 side of paired timing
    machine: dict
    lock_dir: object
    run_id: str
    cost: Callable  # plan -> the sampler's cost (float-MAC share)
    candidates: Callable  # () -> finished full trials: (number, plan, load, measured latency)
    guard: Callable | None = None  # (model, plan) -> rejection reason or None
    session_factory: Callable | None = None  # the scoring runtime's sessions (OpenVINO), None: ORT


class TrialEvaluator:
    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def record(self, number: int, plan: PrecisionPlan, label: str, source: str, float_groups) -> TrialRecord:
        return TrialRecord(number=number, plan=plan.to_dict(), plan_key=plan.key(), label=label, source=source,
                           float_groups=list(float_groups), cost_proxy=self.ctx.cost(plan))

    def evaluate(self, rec: TrialRecord, prune: bool = True, same_model=None) -> TrialRecord:
        """Build, guard, score (low fidelity, then full unless pruned) and time one plan. `same_model(hash)` returns
        the earlier trial that built the very same model, if any: then nothing is scored again (one model, one trial)."""
        ctx, split = self.ctx, self.ctx.split
        plan = PrecisionPlan.from_dict(rec.plan)
        t0 = time.perf_counter()
        qmodel = ctx.ws.build(plan)
        rec.model_hash, rec.structure_key = model_hash(qmodel), structure_key(qmodel)
        earlier = same_model(rec.model_hash) if same_model is not None else None
        if earlier is not None:
            rec.copy_measurements(earlier)
            rec.seconds["build"] = round(time.perf_counter() - t0, 3)
            log.info("trial %d builds the same model as trial %d: its results are reused, not scored again",
                     rec.number, earlier.number)
            return rec
        guard = ctx.guard
        rec.rejected = guard(qmodel, plan) if guard is not None else None
        rec.seconds["build"] = round(time.perf_counter() - t0, 3)
        if rec.rejected:  # never scored: its number would be a builder bug on the record (sensq/guard.py)
            log.warning("trial %d: %s", rec.number, rec.rejected)
            return rec
        session = _LazySession(qmodel, ctx.session_factory)
        t1 = time.perf_counter()
        low = ctx.scorer.score(session, rec.model_hash, split.low_indices)
        rec.seconds["low"] = round(time.perf_counter() - t1, 3)
        self._set_metric(rec, low, split.low_indices)
        if prune and split.low < len(split.search) and ctx.scorer.per_sample:
            decision = prune_decision(rec.plan, low, ctx.candidates(), ctx.low_boot, ctx.low_values,
                                      latency=lambda: self._measured_value(rec, qmodel))
            if decision is not None:
                rec.pruned = decision.to_dict()
                return rec
        t2 = time.perf_counter()
        full = ctx.scorer.score(session, rec.model_hash, split.search)
        rec.seconds["full"] = round(time.perf_counter() - t2, 3)
        self._set_metric(rec, full, split.search)
        t3 = time.perf_counter()
        try:
            rec.latency = self.latency(qmodel, rec.structure_key)
        except RuntimeRejected as e:  # the plan cannot run on the target runtime: recorded, never on the front
            rec.rejected = e.problem
            log.warning("trial %d: %s", rec.number, e.problem)
        rec.gbops = bops(qmodel) / 1e9
        rec.seconds["latency"] = round(time.perf_counter() - t3, 3)
        return rec

    def _measured_value(self, rec: TrialRecord, qmodel):
        """This trial's (latency ratio, its interval), booked by structure: a trial that goes on is not timed again."""
        try:
            return ratio_and_ci(self.latency(qmodel, rec.structure_key))
        except RuntimeRejected:
            return None

    def _set_metric(self, rec: TrialRecord, samples, indices) -> None:
        rec.fidelity = len(indices)
        rec.metric = samples.value(indices)
        rec.delta_int8 = rec.metric - self.ctx.int8.value(indices)

    def latency(self, model, skey: str) -> dict:
        """Paired latency of a built model vs FP32, shared by every trial with the same structure on this machine.
        A structure the runtime rejected is booked as such too: it raises RuntimeRejected again without a retry."""
        ctx = self.ctx
        key = LatencyBook.key(skey, ctx.machine["machine_id"], ctx.backend.spec)
        found = ctx.book.get(key)
        if found is not None:
            return _booked(found)
        with measurement_lock(ctx.lock_dir):  # re-entrant: measure_paired takes it again
            found = ctx.book.get(key)  # another worker may have measured this structure while we waited
            if found is not None:
                return _booked(found)
            try:
                lat = measure_paired(ctx.backend, model, ctx.reference_timer, runs=SEARCH_RUNS_PER_ROUND,
                                     lock_dir=ctx.lock_dir)
            except RuntimeRejected as e:
                ctx.book.put(key, {"rejected": e.problem})
                raise
        value = {**lat.to_dict(), "machine_id": ctx.machine["machine_id"], "run_id": ctx.run_id,
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        details = value.pop("details", None) or {}
        if "round_ratios" in details:  # 12 numbers: the evidence the ratio and its interval come from
            value["round_ratios"] = details["round_ratios"]
        if ctx.backend.name == "ort":  # what ORT left unfused: the conversions a float island costs on every run
            value["fusion"] = fusion_report(model, reference=ctx.ws.model)
        ctx.book.put(key, value)
        return value


def _booked(value: dict) -> dict:
    if "rejected" in value:
        raise RuntimeRejected(value["rejected"])
    return value


class _LazySession:
    """An InferenceSession made on first use (a fully cached model is never loaded) and then reused."""

    def __init__(self, model, factory=None):
        self.model, self._session, self.factory = model, None, factory

    def _get(self):
        if self._session is None:
            self._session = (self.factory or make_session)(self.model)
        return self._session

    def run(self, *args, **kwargs):
        return self._get().run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._get(), name)
