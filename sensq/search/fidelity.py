"""Sound multi-fidelity: stop a trial after the low-fidelity subset only when the paired per-sample evidence says it
cannot reach the front.

A trial is stopped when some finished trial (a) cannot be slower than it — its float nodes are a subset of the
trial's and it has the same weight/activation layout, so its QDQ graph runs a subset of the trial's float work —
and (b) scores better on the same low-fidelity samples with the upper bound of the paired bootstrap interval of
(trial - other) below zero, at a one-sided level of 1 % for the whole decision: the candidates tested are chosen
after looking at every no-slower trial's low-fidelity difference, so the Bonferroni correction is over all K of
them (each test at alpha / K; recorded as `tests`), though at most MAX_TESTS are bootstrapped; 2,000 resamples. Then the other trial dominates it with evidence, and the front cannot gain it.
The level is strict because a stop saves little (a few seconds per trial) and a wrong stop can lose a front point.
Latency is judged by structure, not by measurement, so the decision is reproducible (no timing noise in it).
The benchmark (bench/bench_search.py) evaluates every stopped trial in full afterwards and counts false prunes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MAX_TESTS = 3  # bootstrap tests per decision: the most negative point differences first
PRUNE_ALPHA = 0.01  # one-sided family-wise error rate of one stop decision


def test_level(considered: int) -> float:
    """Two-sided level of each test's interval (its upper bound is used): one-sided alpha / K over the K
    candidates whose differences were looked at."""
    return 1.0 - 2.0 * PRUNE_ALPHA / max(1, considered)

PRUNE_BOOT = 2000  # resamples: the bound sits ~7 resamples into the tail


@dataclass
class PruneDecision:
    by: int  # trial number of the dominating trial
    diff: float  # trial - dominating trial on the low-fidelity samples
    lo: float
    hi: float
    n: int
    tests: int = 1  # no-slower candidates looked at: the Bonferroni family (each test at PRUNE_ALPHA / tests)

    def to_dict(self) -> dict:
        return asdict(self)


def no_slower(a: dict, b: dict) -> bool:
    """Plan `a` cannot be slower than plan `b`: a subset of b's float nodes, same per-channel/activation/target."""
    same = all(a.get(k) == b.get(k) for k in ("per_channel", "activation_type", "target"))
    return same and set(a["float_nodes"]) <= set(b["float_nodes"])


def prune_decision(plan: dict, samples, candidates, boot, values: dict | None = None) -> PruneDecision | None:
    """candidates: (trial number, plan dict, load) of finished trials, load() -> their per-sample results (or None);
    boot: a PairedBootstrap over the low-fidelity samples. Results are loaded one at a time and only for no-slower
    trials: at full-size evaluation sets a study's results do not fit in memory together. values: the caller's memo
    {trial number: value on boot.indices}, kept across decisions (a finished trial's value there never changes)."""
    idx = boot.indices
    values = {} if values is None else values
    mine = samples.value(idx)
    diffs, considered = [], 0
    for number, other_plan, load in candidates:
        if not no_slower(other_plan, plan):
            continue
        if number not in values:
            other = load()
            if other is None:
                continue
            values[number] = other.value(idx)
        considered += 1
        d = mine - values[number]
        if d < 0:
            diffs.append((d, number, load))
    for d, number, load in sorted(diffs, key=lambda x: (x[0], x[1]))[:MAX_TESTS]:
        other = load()
        if other is None:
            continue
        iv = boot.difference(samples, other, test_level(considered))
        if iv.hi < 0:
            return PruneDecision(number, iv.value, iv.lo, iv.hi, len(idx), considered)
    return None
