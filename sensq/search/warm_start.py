"""The study's warm start: seeds (all-INT8 and the first steps of the greedy path: top 1..k groups float,
k = budget/10 within 3..5) and the sensitivity pass's leave-one-out plans as finished trials the sampler learns
from. Entered once per study, under the study lock (the caller holds it); each entry is skipped when a trial with its
label exists, so a worker killed halfway through seeding leaves no duplicate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import optuna

from .records import ATTR


@dataclass
class SensitivityTrials:
    """What entering the sensitivity pass's rows as trials needs: its table, the groups, the base plan, a record
    factory (TrialEvaluator.record) and how many samples its metric rests on."""

    table: object  # pandas DataFrame: group, metric, delta, scored_by, model_hash
    groups: dict[str, list[str]]
    base_plan: object
    record: Callable
    n_samples: int


def seed_study(study: optuna.Study, space, ranked, settings, defaults: dict, run_id: str,
               sensitivity: SensitivityTrials) -> None:
    if study.user_attrs.get("seeded"):
        return
    have = {(t.user_attrs.get("source"), t.user_attrs.get("label")) for t in study.get_trials(deepcopy=False)}
    toggled = space.toggled(ranked)
    depth = min(max(3, settings.budget // 10), 5, len(toggled))
    seeds = [0] if settings.strategy == "random" else range(depth + 1)
    for n in seeds:
        label = "all-INT8" if n == 0 else f"seed: top-{n} float"
        if ("seed", label) not in have:
            study.enqueue_trial(space.seed_params(ranked, n, defaults), user_attrs={"source": "seed", "label": label})
    if settings.strategy == "tpe":
        add_sensitivity_trials(study, space, ranked, toggled, defaults, sensitivity,
                               {lab for src, lab in have if src == "sensitivity"})
    study.set_user_attr("seeded", run_id)


def add_sensitivity_trials(study, space, ranked, toggled: list[str], defaults: dict, sens: SensitivityTrials,
                           have: set = frozenset()) -> None:
    dists = space.distributions(ranked)
    rows = sens.table.set_index("group")
    for g in toggled:
        row = rows.loc[g]
        if row["scored_by"] != "metric" or f"sensitivity: {g} float" in have:
            continue
        plan = sens.base_plan.with_float(sens.groups[g])
        rec = sens.record(len(study.trials), plan, f"sensitivity: {g} float", "sensitivity", [g])
        rec.fidelity, rec.metric, rec.delta_int8, rec.model_hash = sens.n_samples, float(row["metric"]), float(row["delta"]), row["model_hash"]
        params = space.seed_params(ranked, [g], defaults)
        trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                          values=[rec.delta_int8, rec.cost_proxy],
                                          user_attrs={ATTR: rec.to_json(), "source": "sensitivity", "label": rec.label})
        study.add_trial(trial)
