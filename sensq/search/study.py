"""The search as a staged object: reference -> sensitivity -> study -> warm start -> trials -> confirm -> report.

Each stage reads what the previous ones left on the object and adds its own part; `run()` times them and always
writes the reports, also when interrupted (finished trials live in the Optuna storage, so rerunning the same
command resumes). A trial is data (search/records.py); the front rule lives in search/pareto.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import optuna
from tqdm import tqdm

from ..errors import SensqError
from ..evaluators.samples import PairedBootstrap
from ..evaluators.scoring import model_hash
from ..latency import (Reference, evaluation_lock, macs_per_node, machine_info, make_latency_backend,
                       measurement_lock)
from ..plan import PrecisionPlan
from ..quantize import cache_dir
from ..runtime import scoring_runtime
from ..precision import target_precisions
from ..search_spaces import load_space
from ..sensitivity import SensitivityResult, evaluator_signature, quantizable_groups, run_sensitivity
from ..targets import get_target
from .fidelity import PRUNE_BOOT, ratio_and_ci
from .proposals import ProposalContext, Proposer, make_sampler
from .records import ATTR, LatencyBook, TrialRecord, records
from .reference import check_reference, reference_doc, reference_values
from .settings import STRATEGIES, SearchSettings
from .confirmation import confirm_front, labeled_confirm_scorer, make_scorer
from .latency_confirm import confirm_latency
from .results import ReportInputs, SearchResult, build_result, fp32_row, front_records, full_records, trial_row
from .splits import Split, make_split
from .warm_start import SensitivityTrials, seed_study
from . import workers
from .coordination import Coordinator, open_storage
from .trials import TrialContext, TrialEvaluator

log = logging.getLogger("sensq")



class SearchRun:
    def __init__(self, ws, evaluator, settings: SearchSettings, progress: bool = True, book: LatencyBook | None = None,
                 confirm_evaluator=None):
        if settings.strategy not in STRATEGIES:
            raise SensqError(f"unknown search strategy {settings.strategy!r}", f"use one of: {', '.join(STRATEGIES)}")
        if settings.budget < 1:
            raise SensqError(f"budget {settings.budget} must be >= 1", "give the number of plans to evaluate, e.g. --budget 50")
        self.ws, self.evaluator, self.settings, self.progress = ws, evaluator, settings, progress
        # --rank-by agreement: trials are scored label-free, the front is confirmed on this (labeled) evaluator
        self.confirm_evaluator = confirm_evaluator
        self.workdir = Path(settings.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.space = load_space(settings.space)
        if settings.top_k is not None:
            knob = self.space._group_knob() or self.space.params.setdefault("float_groups", {"type": "group_toggles"})
            knob["top_k"] = settings.top_k
        self.groups = quantizable_groups(ws, settings.depth, settings.group_by)
        if not self.groups:
            raise SensqError("nothing left to search: every node is already float", "check truncate_var_names / float_nodes")
        self.target = get_target(ws.base_plan.target, ws.base_plan.activation_type)
        self.backend = make_latency_backend(self.target.latency_spec(settings.latency))
        dropped = self.space.restrict(target_precisions(self.target))
        if dropped:
            why = f" ({self.target.fp16_note})" if "fp16" in dropped and self.target.fp16_note else ""
            log.info("search space: group precision(s) %s left out: target %s does not run them%s", dropped,
                     self.target.name, why)
        self.run_id = uuid.uuid4().hex[:8]
        # per machine (not the cache dir, which may be shared by several machines): one timing at a time here
        self.lock_dir = Path(tempfile.gettempdir()) / f"sensq-{getattr(os, 'getuid', lambda: 0)()}"
        self._shared_book = book
        self.stage_seconds: dict[str, float] = {}
        self.latency_confirmation = None
        self.low_values: dict[int, float] = {}  # trial number -> value on the low-fidelity samples (pruning's memo)

    # ---------------------------------------------------------------------------------------------- helpers
    def hash(self, model) -> str:
        return model_hash(model)

    def records(self) -> list[TrialRecord]:
        return records(self.study)

    def scored_plans(self) -> dict[str, int]:
        """plan key -> trial number, for plans scored beyond a warm-start entry or being scored by a worker right now
        (those are repeats if proposed)."""
        return {**self._in_flight(), **{r.plan_key: r.number for r in self.records() if r.source != "sensitivity"}}

    def _in_flight(self, exclude: int | None = None) -> dict[str, int]:
        """plan key -> trial number of the RUNNING trials that claimed a plan (any worker's, but `exclude`)."""
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return {t.user_attrs[workers.PLAN_KEY]: t.number for t in running
                if workers.PLAN_KEY in t.user_attrs and t.number != exclude}

    def finished_candidates(self):
        """(number, plan, load, measured latency) of full trials: the possible dominators in a pruning decision;
        load() reads that trial's per-sample results from the store when the decision needs them."""
        return [(r.number, r.plan, lambda key=r.model_hash: self.store.get(key), ratio_and_ci(r.latency))
                for r in self.records() if r.full]

    def float_mac_share(self, plan) -> float:
        """Share of the model's MACs in float nodes: the sampler's cost for every trial it learns from, whatever the
        backend. Deterministic and ordered like latency (more float work, more time), so measurement noise never
        changes which plans are proposed; and one scale: stopped plans and the sensitivity warm start have no
        backend ratio, so a backend ratio for full trials only would make them look cheaper than all-INT8."""
        get = (lambda k: getattr(plan, k)) if hasattr(plan, "float_nodes") else (lambda k: plan.get(k) or [])
        # a16 nodes count as float: ORT CPU and OpenVINO run them as float ops between 16-bit fake-quant steps;
        # fp16 nodes as half of it (their bit width: what an fp16 target's arithmetic costs)
        floating = set(get("float_nodes")) | set(get("a16_nodes"))
        half = set(get("fp16_nodes") or [])
        work = sum(m for n, m in self.macs.items() if n in floating) + 0.5 * sum(m for n, m in self.macs.items() if n in half)
        return work / max(self.total_macs, 1)

    def sampler_cost(self, rec: TrialRecord) -> float:
        return rec.cost_proxy  # the reports' latency is the backend's; the sampler's cost is one definition

    def defaults(self, plan: dict | None = None) -> dict:
        p = plan or self.ws.base_plan.to_dict()
        return {"method": p["method"], "percentile": p["percentile"], "per_channel": p["per_channel"],
                "target": p["target"], "activation_type": p["activation_type"],
                "overflow_fix": p["overflow_fix"] or self.target.overflow_fix}

    # ---------------------------------------------------------------------------------------------- stages
    def reference(self) -> None:
        """Split the evaluation set; score FP32 and all-INT8 on the search part; FP32 latency in this run."""
        s, ev = self.settings, self.evaluator
        if callable(getattr(ev, "probe", None)):  # plugins: one FP32 run tells whether they give per-sample values
            ev.probe(self.ws.model)
        n = min(s.limit or len(ev), len(ev))
        # may be shared with other workers; few results in memory: one COCO model's is ~70 MB at 5,000 images
        # accuracy is scored by the runtime the target deploys on (OpenVINO for openvino-cpu), results kept apart
        self.scored_by, self.session_factory = scoring_runtime(self.target.name, getattr(self.backend, "threads", None))
        runtime = "" if self.session_factory is None else self.scored_by
        busy = lambda: evaluation_lock(self.lock_dir)  # noqa: E731
        self.scorer = make_scorer(ev, cache_dir(self.ws.cfg) / "samples", runtime, n, busy, self.session_factory)
        self.store = self.scorer.store
        if self.scorer.per_sample:
            labels = getattr(getattr(ev, "data", None), "labels", None)
            confirm = 0 if self.confirm_evaluator is not None else s.confirm  # the labeled set is the held-out part
            self.split = make_split(n, confirm, s.low_fidelity, s.seed, None if labels is None else labels[:n])
        else:
            log.warning("evaluator %s returns no per-sample results: no held-out confirmation, no intervals, no pruning",
                        getattr(ev, "name", type(ev).__name__))
            self.split = Split(np.arange(n), np.zeros(0, np.int64), n, s.seed)
        if self.confirm_evaluator is None:
            self.confirm_scorer, self.confirm_indices = self.scorer, self.split.confirm
        else:
            self.confirm_scorer, self.confirm_indices = labeled_confirm_scorer(
                self.confirm_evaluator, cache_dir(self.ws.cfg) / "samples", runtime, s.limit, busy, self.session_factory)
        self.low_boot = PairedBootstrap(self.split.low_indices, PRUNE_BOOT, s.seed)  # not n_boot (report-only); level per decision
        self.fp32_hash = model_hash(self.ws.model)
        int8_model = self.ws.build()
        self.int8_hash = model_hash(int8_model)
        from ..guard import PlanGuard

        self.guard = PlanGuard(self.ws) if self.ws.data is not None and not self.ws.cfg.data_free else None
        self._connect()
        # scored by the study's first worker (the others wait, then read its per-sample results from the store)
        def publish() -> dict:
            return reference_doc(self.scorer.score(self.ws.model, self.fp32_hash, self.split.search),
                                 self.scorer.score(int8_model, self.int8_hash, self.split.search),
                                 self.fp32_hash, self.int8_hash, self.split, self.settings.worker)

        shared, _ = self.coord.shared("reference", publish)
        self.fp32 = self.scorer.score(self.ws.model, self.fp32_hash, self.split.search)
        self.int8 = self.scorer.score(int8_model, self.int8_hash, self.split.search)
        check_reference(shared, self.fp32_hash, self.int8_hash, reference_values(self.fp32, self.int8, self.split),
                        self.study_name)
        self.macs = macs_per_node(self.ws.model)
        self.total_macs = sum(self.macs.values())
        threads = getattr(self.backend, "threads", None)
        self.machine = machine_info(threads)
        self.reference_timer = Reference(self.backend, self.ws.model)
        with measurement_lock(self.lock_dir):
            self.fp32_latency = self.backend.measure(self.ws.model)  # this run's FP32, for "measured ms (this run)"

    def sensitivity(self) -> None:
        from ..sensitivity import sensitivity_key, summary, write_report

        s = self.settings

        def compute() -> dict:
            return run_sensitivity(self.ws, self.evaluator, indices=self.split.sensitivity_indices, depth=s.depth, by=s.group_by,
                                   progress=self.progress, cache=self.workdir / "cache",
                                   budget_seconds=s.sensitivity_budget, scorer=self.scorer).to_json()

        # one pass per study: every worker ranks (and so toggles) the same groups
        key = sensitivity_key(self.ws, self.evaluator, self.split.sensitivity_indices, s.depth, s.group_by, s.sensitivity_budget, 8)
        doc, _ = self.coord.shared(f"sensitivity:{key}", compute)
        self.sens = SensitivityResult.from_json(doc)
        self.ranked = [g for g in self.sens.ranked_groups if g in self.groups]
        self.sens_paths = write_report(self.sens, self.workdir)
        print(summary(self.sens, 10))

    def _connect(self) -> None:
        """The study's storage and its coordinator, opened before anything is scored: FP32, all-INT8 and the
        sensitivity pass are computed once per study and shared through it."""
        s = self.settings
        key = s.study_key(self.ws.stats.key, self.ws.base_plan.key(), Path(self.space.source).read_text(),
                          evaluator_signature(self.evaluator), self.split.to_dict(), self.backend.spec, self.groups)
        self.study_name = s.study_name or f"sensq-{Path(self.ws.cfg.model_path).stem}-{key}"
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        url = s.storage_url()
        try:
            self.storage = open_storage(url, workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
            optuna.create_study(study_name=self.study_name, storage=self.storage, load_if_exists=True,
                                directions=["maximize", "minimize"])
        except Exception as e:
            raise SensqError(f"cannot open Optuna storage {url}: {str(e).splitlines()[0][:200]}",
                             "give a valid URL such as sqlite:///runs/study.db or postgresql://user:pw@host/db") from e
        self.coord = Coordinator(self.storage, self.study_name)

    def open_study(self) -> None:
        s = self.settings
        n_warm = 0 if s.strategy != "tpe" else 4 + min(len(self.ranked), self.space.top_k or 0)
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                       sampler=make_sampler(s.strategy, s.seed + s.worker, n_warm))
        self.study.set_metric_names([f"gain in {self.sens.metric_name} over all-INT8", "sampler cost"])
        workers.reclaim(self.study, self.coord)  # trials left RUNNING by a killed worker are failed and retried
        # a book passed in (benchmarks: several strategies measured side by side) stays the caller's
        self.book = self._shared_book if self._shared_book is not None else LatencyBook(self.study)
        self.write_search_json()
        # the trial and proposal stages get what they read, now that the reference and the study exist
        self.evaluate_trial = TrialEvaluator(TrialContext(
            self.ws, self.split, self.scorer, self.int8, self.low_boot, self.low_values, self.book, self.backend,
            self.reference_timer, self.machine, self.lock_dir, self.run_id, cost=self.float_mac_share,
            candidates=self.finished_candidates, guard=self.guard, session_factory=self.session_factory))
        self.proposer = Proposer(ProposalContext(self.study, self.space, self.ranked, self.ws, self.groups, s,
                                                 self.scored_plans, self.records, self.defaults))

    def warm_start(self) -> None:
        if self.settings.strategy == "greedy":
            return
        with self.coord.lock():
            seed_study(self.study, self.space, self.ranked, self.settings, self.defaults(), self.run_id,
                       SensitivityTrials(self.sens.table, self.groups, self.ws.base_plan, self.evaluate_trial.record,
                                         len(self.split.sensitivity_indices)))

    def budget_used(self) -> int:
        """Distinct built models scored (a plan that built an earlier trial's model is not counted)."""
        return len({r.plan_key for r in self.records() if r.source != "sensitivity" and r.repeat_of is None})

    def same_model(self, trial, model_hash: str) -> TrialRecord | None:
        """The scored trial (not a warm-start entry) that built this very model, else None after claiming the hash
        for `trial` (study lock); a model another worker is scoring right now is waited for."""
        def scored():
            return next((r for r in self.records() if r.model_hash == model_hash and r.source != "sensitivity"
                         and r.repeat_of is None), None)

        return workers.claim_model(self.study, self.coord, trial, model_hash, scored)

    def trials(self) -> None:
        """Until the study (all its workers together) has scored `budget` distinct plans. Plans other workers are
        scoring count as in flight: when they fill the budget this worker waits for them (and retries those of a
        worker that dies) instead of starting one more."""
        s = self.settings
        bar = tqdm(total=s.budget, initial=min(self.budget_used(), s.budget), desc="search", unit="plan",
                   disable=not self.progress)
        try:
            while True:
                workers.reclaim(self.study, self.coord)
                used = self.budget_used()
                bar.update(min(used, s.budget) - bar.n)
                if used >= s.budget:
                    break
                if used + len(self._in_flight()) >= s.budget:
                    time.sleep(workers.POLL_SECONDS)
                    continue
                proposal = self.proposer.next()
                if proposal is None:
                    log.warning("the search space has no unscored plan left (%d scored); stopping before the budget",
                                self.budget_used())
                    break
                if self._claim(proposal):
                    self._run_proposal(proposal)
                bar.set_postfix_str(f"repeats {self.proposer.repeats}")
        finally:
            bar.close()

    def _claim(self, p) -> bool:
        """Atomically (study lock): the proposal's plan is neither scored nor in flight and the budget has room, and
        the trial says which plan it scores. Else the trial is told FAIL, marked so it is not retried."""
        key = p.plan.key()
        with self.coord.lock():
            taken = {**self._in_flight(exclude=p.trial.number),
                     **{r.plan_key: r.number for r in self.records() if r.source != "sensitivity"}}
            if key in taken:
                p.trial.set_user_attr("duplicate_of", taken[key])
                self.proposer.repeats += 1
            elif self.budget_used() + len(self._in_flight(exclude=p.trial.number)) >= self.settings.budget:
                p.trial.set_user_attr(workers.RELEASED, "budget reached by trials in flight")
            else:
                p.trial.set_user_attr(workers.PLAN_KEY, key)
                return True
        self.study.tell(p.trial, state=optuna.trial.TrialState.FAIL)
        return False

    def _run_proposal(self, p) -> None:
        rec = self.evaluate_trial.record(p.trial.number, p.plan, p.label, p.source, p.float_groups)
        try:
            with workers.heartbeat(self.study, p.trial):
                rec = self.evaluate_trial.evaluate(rec, prune=self.settings.strategy != "greedy",
                                                   same_model=lambda h: self.same_model(p.trial, h))
        except BaseException:  # Ctrl-C, SIGTERM, an error: the trial is failed (and retried), never left RUNNING
            self.study.tell(p.trial, state=optuna.trial.TrialState.FAIL)
            raise
        p.trial.set_user_attr(ATTR, rec.to_json())
        p.trial.set_user_attr("label", rec.label)
        if rec.repeat_of is not None:
            self.proposer.repeated(model=True)
        else:
            self.proposer.progressed()
        if rec.rejected and math.isnan(rec.metric):  # the collapse guard stopped it before scoring: nothing to learn;
            # PRUNED, not FAIL: a failed trial is retried, and this one would be rejected again, forever
            self.study.tell(p.trial, state=optuna.trial.TrialState.PRUNED)
            return
        self.study.tell(p.trial, [rec.delta_int8, self.sampler_cost(rec)])
        state = (f"stopped after {rec.fidelity} (worse than trial {rec.pruned['by']}: "
                 f"{rec.pruned['diff']:+.4f} [{rec.pruned['lo']:+.4f}, {rec.pruned['hi']:+.4f}])") if rec.pruned else \
            f"{self.sens.metric_name} {rec.metric:.4f}, {rec.ratio:.3f}x FP32"
        log.info("trial %d (%s) %s; float=[%s] method=%s", rec.number, rec.source, state, ",".join(rec.float_groups),
                 rec.plan["method"])

    def confirm_latency(self) -> None:
        """Re-time the plans that may be on the front together with FP32 and all-INT8 (search/latency_confirm.py)."""
        self.latency_confirmation = None
        budget = self.settings.latency_confirm
        if self.backend.deterministic or not budget:
            return
        rows = [self.fp32_row()] + [trial_row(r) for r in full_records(self.records())]
        if len(rows) < 2:
            return
        self.latency_confirmation = confirm_latency(
            rows, lambda plan: self.ws.build(PrecisionPlan.from_dict(plan)), self.backend, self.ws.model,
            self.fp32_hash, self.ws.build(), self.int8_hash, budget, self.settings.seed, self.lock_dir, self.progress)
        doc = self.latency_confirmation.to_dict()
        (self.workdir / "latency_confirm.json").write_text(json.dumps(doc, indent=1, default=str))

    def confirm(self) -> None:
        """Re-score FP32, all-INT8 and the front on the held-out part (nothing was selected on it)."""

        targets = [(self.fp32_hash, None), (self.int8_hash, self.ws.base_plan)]
        targets += [(r.model_hash, PrecisionPlan.from_dict(r.plan))
                    for r in front_records(self.records(), self.latency_confirmation)]
        confirm_front(self.confirm_scorer, self.confirm_indices, targets, self.ws.build, self.ws.model, self.progress)

    def write_search_json(self) -> None:
        s = self.settings
        doc = {"study_name": self.study_name, "storage": s.storage_url(), "settings": s.to_dict(),
               "quantize_config": self.ws.cfg.to_xquant(), "config_base_dir": self.ws.cfg.base_dir,
               "cache_dir": self.ws.cfg.cache_dir, "stats_key": self.ws.stats.key,
               "evaluator": evaluator_signature(self.evaluator), "evaluator_spec": getattr(self.evaluator, "spec", None),
               "metric_name": self.sens.metric_name, "split": self.split.to_dict(), "groups": self.groups,
               "ranked_groups": self.ranked, "target": self.target.name, "latency_backend": self.backend.spec,
               "latency_unit": self.backend.unit, "machine": self.machine}
        tmp = self.workdir / f".search.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.workdir / "search.json")  # atomic: export and other workers never read half a file

    def fp32_row(self) -> dict:
        return fp32_row(self.fp32.value(self.split.search), self.fp32_latency, self.machine, self.fp32_hash)

    def report_inputs(self) -> ReportInputs:
        return ReportInputs(self.records(), self.fp32_row(), self.fp32_hash, self.int8_hash, self.store, self.split,
                            self.settings, self.scorer.per_sample, self.sens, self.workdir, dict(self.stage_seconds),
                            self.proposer.repeats, self.backend.unit, self.backend.spec, self.target.name,
                            self.scored_by, self.machine, self.latency_confirmation, self.sens_paths,
                            self.confirm_scorer.store, self.confirm_indices,
                            None if self.confirm_evaluator is None else _metric_name(self.confirm_evaluator))

    # ---------------------------------------------------------------------------------------------- driver
    def run(self) -> SearchResult:

        t0 = time.perf_counter()
        stages = [("reference", self.reference), ("sensitivity", self.sensitivity), ("study", self.open_study),
                  ("warm start", self.warm_start), ("trials", self.trials),
                  ("latency confirm", self.confirm_latency), ("confirm", self.confirm)]
        done = []
        try:
            for name, stage in stages:
                t = time.perf_counter()
                stage()
                self.stage_seconds[name] = round(time.perf_counter() - t, 2)
                done.append(name)
        finally:
            if "study" in done:  # whatever finished is reported, also after Ctrl-C or an error
                self.reference_timer.close()
                result = build_result(self.report_inputs(), time.perf_counter() - t0)
        return result


def _metric_name(evaluator) -> str:
    return getattr(evaluator, "metric_name", None) or getattr(evaluator, "primary", None) or "metric"


def run_search(ws, evaluator, settings: SearchSettings, progress: bool = True, book: LatencyBook | None = None,
               confirm_evaluator=None) -> SearchResult:
    """Python API of `sensq search`. `confirm_evaluator`: --rank-by agreement's labeled evaluator (trials are scored
    by `evaluator`, the label-free one, and the front is confirmed on all of this one's samples)."""
    return SearchRun(ws, evaluator, settings, progress, book, confirm_evaluator).run()
