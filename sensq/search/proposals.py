"""Where the next plan comes from, for each strategy, with repeats caught before they cost anything.

tpe     Optuna's multi-objective TPE, warm-started with the seeds and the sensitivity pass's leave-one-out plans. It
        learns from (gain over all-INT8 on the samples a trial was scored on, the sampler cost) — both deterministic,
        so the same seed proposes the same plans whatever the latency noise.
random  Optuna's RandomSampler on the same space (plus the all-INT8 seed every tool starts from).
greedy  AIMET AMP / NNCF accuracy-control style: all-INT8, then the most sensitive group float, then the two most
        sensitive, ... in sensitivity order, every step scored in full.
A proposal whose plan was already scored is a repeat: told to Optuna as FAIL (so the sampler ignores it), not run,
not counted; after a few repeats in a row a seeded mutation of a front trial is enqueued instead. A new plan that
builds an already scored model (same bytes) is a repeat too, found after the build: it takes the earlier trial's
results (told to Optuna, so the sampler learns the region), recorded as `repeat_of`, and is not counted either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import optuna

from ..plan import PrecisionPlan
from . import workers
from .pareto import front_indices

MAX_REPEATS_IN_A_ROW = 3
GIVE_UP_AFTER = 30  # repeats in a row with no unscored plan found by mutation: the space is exhausted


@dataclass
class Proposal:
    trial: optuna.Trial
    plan: PrecisionPlan
    float_groups: list[str]
    source: str
    label: str


def make_sampler(strategy: str, seed: int, n_warm: int):
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate + group: knobs are sampled jointly and the percentile only where method == percentile.
    # constant_liar: workers running in parallel do not all propose the same plan.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                      n_startup_trials=max(0, 10 - n_warm))


@dataclass
class ProposalContext:
    """What proposing reads: the study and its space, the ranked groups, and the scored plans so far."""

    study: optuna.Study
    space: object  # sensq.search_spaces.SearchSpace
    ranked: list[str]  # groups in sensitivity order
    ws: object  # sensq.quantize.Workspace (builds plans from choices)
    groups: dict[str, list[str]]
    settings: object  # SearchSettings: strategy, seed, worker
    scored_plans: Callable[[], dict[str, int]]  # plan key -> trial number (scored or in flight)
    records: Callable[[], list]  # the study's TrialRecords
    defaults: Callable[[dict | None], dict]  # a plan's default knobs (method, percentile, ...)


class Proposer:
    def __init__(self, ctx: ProposalContext):
        self.ctx = ctx
        self.repeats = 0
        self.model_repeats = 0  # of those, proposals whose plan was new but built an already scored model
        self.exhausted = False
        self._in_a_row = 0
        self._since_progress = 0

    def next(self) -> Proposal | None:
        """The next plan not scored yet (None when the strategy has nothing left, e.g. greedy after every group)."""
        ctx = self.ctx
        while not self.exhausted:
            if ctx.settings.strategy == "greedy":
                return self._greedy()
            trial = ctx.study.ask()
            workers.claim(ctx.study, trial, ctx.settings.worker)
            choice = ctx.space.suggest(trial, ctx.ranked)
            plan = ctx.space.plan(ctx.ws, ctx.groups, choice)
            attrs = trial.user_attrs
            earlier = ctx.scored_plans().get(plan.key())
            if earlier is None:
                return Proposal(trial, plan, choice["float_groups"], attrs.get("source", "search"), attrs.get("label", ""))
            trial.set_user_attr("duplicate_of", earlier)
            ctx.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.repeated()
        return None

    def progressed(self) -> None:
        """A proposal built a model not scored before."""
        self._in_a_row = self._since_progress = 0

    def repeated(self, model: bool = False) -> None:
        """A proposal repeated a scored plan (or, `model`, built an already scored model): after a few in a row a
        mutation is enqueued; after many without progress the space counts as exhausted."""
        self.repeats += 1
        self.model_repeats += int(model)
        self._in_a_row += 1
        self._since_progress += 1
        if self._since_progress >= GIVE_UP_AFTER:
            self.exhausted = True
        elif self._in_a_row >= MAX_REPEATS_IN_A_ROW:
            self._enqueue_mutation()
            self._in_a_row = 0

    def _greedy(self) -> Proposal | None:
        ctx = self.ctx
        done = ctx.scored_plans()
        for n in range(len(ctx.ranked) + 1):
            groups = ctx.ranked[:n]
            plan = ctx.space.plan(ctx.ws, ctx.groups, {"float_groups": groups, "group_methods": {}})
            if plan.key() not in done:
                label = "all-INT8" if n == 0 else f"greedy: top-{n} float"
                trial = ctx.study.ask()
                workers.claim(ctx.study, trial, ctx.settings.worker)
                return Proposal(trial, plan, groups, "greedy", label)
        return None

    def _enqueue_mutation(self) -> None:
        """A seeded one-knob change of a trial on the sampler's front that gives a plan not scored yet (any scored
        trial's neighbours, in a fixed order, when the front's are all scored)."""
        ctx = self.ctx
        recs = [r for r in ctx.records() if r.source != "sensitivity"]
        if not recs:
            return
        rng = np.random.default_rng([ctx.settings.seed, len(ctx.study.trials)])
        front = [recs[i] for i in front_indices([r.delta_int8 for r in recs], [r.cost_proxy for r in recs])]
        done = ctx.scored_plans()
        tries = [(front[int(rng.integers(len(front)))], None) for _ in range(50)] + [(r, k) for r in recs for k in self._knobs()]
        for base, knob in tries:
            params = self._mutate(base, knob, rng)
            if params is not None and self._plan(params).key() not in done:
                ctx.study.enqueue_trial(params, user_attrs={"source": "mutation", "label": ""})
                return

    def _knobs(self) -> list:
        """Every single change: each toggle flipped, each categorical knob set to each of its choices."""
        ctx = self.ctx
        precision = next((sp for sp in ctx.space.params.values() if sp.get("type") == "group_precision"), None)
        if precision:
            out = [("set", f"precision:{g}", c) for g in ctx.space.toggled(ctx.ranked) for c in precision["choices"]]
        else:
            out = [("toggle", g) for g in ctx.space.toggled(ctx.ranked)]
        for k, spec in sorted(ctx.space.params.items()):
            if spec.get("type") == "categorical":
                out += [("set", k, c) for c in spec["choices"]]
        return out

    def _mutate(self, base, knob, rng) -> dict | None:
        ctx = self.ctx
        toggled = ctx.space.toggled(ctx.ranked)
        params = ctx.space.seed_params(ctx.ranked, [g for g in base.float_groups if g in toggled], ctx.defaults(base.plan))
        for kind in ("a16", "fp16"):  # the base's 16-bit groups (records name float groups only)
            nodes = set(base.plan.get(f"{kind}_nodes") or [])
            for g in toggled:
                if nodes and f"precision:{g}" in params and set(ctx.groups[g]) <= nodes:
                    params[f"precision:{g}"] = kind
        if knob is None:  # random: a categorical knob 30 % of the time, else a toggle
            knobs = self._knobs()
            cats = [k for k in knobs if k[0] == "set" and not k[1].startswith("precision:")]
            flips = [k for k in knobs if k[0] == "toggle" or k[1].startswith("precision:")]
            pool = cats if (rng.random() < 0.3 and cats) or not flips else flips
            if not pool:
                return None
            knob = pool[int(rng.integers(len(pool)))]
        if knob[0] == "toggle":
            params[f"float:{knob[1]}"] = not params[f"float:{knob[1]}"]
        else:
            params[knob[1]] = knob[2]
        if params.get("method") == "percentile" and "percentile_tail" not in params:
            params["percentile_tail"] = 100.0 - ctx.ws.base_plan.percentile
        if params.get("method") != "percentile":
            params.pop("percentile_tail", None)
        return params

    def _plan(self, params: dict):
        """The plan space.suggest() will build from these (enqueued) params."""
        ctx = self.ctx
        toggled = ctx.space.toggled(ctx.ranked)
        categorical = {k for k, s in ctx.space.params.items() if s.get("type") == "categorical"}
        choice = {"float_groups": [g for g in toggled if params.get(f"float:{g}") or params.get(f"precision:{g}") == "fp32"],
                  "a16_groups": [g for g in toggled if params.get(f"precision:{g}") == "a16"],
                  "fp16_groups": [g for g in toggled if params.get(f"precision:{g}") == "fp16"], "group_methods": {},
                  **{k: v for k, v in params.items() if k in categorical}}
        if params.get("method") == "percentile":
            choice["percentile"] = round(100.0 - params["percentile_tail"], 6)
        return ctx.space.plan(ctx.ws, ctx.groups, choice)
