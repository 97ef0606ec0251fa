"""Sound multi-fidelity: stop a trial after the low-fidelity subset only when the paired per-sample evidence says it
cannot reach the front.

A trial is stopped when some finished trial (a) cannot be slower than it — its float nodes are a subset of the
trial's and it has the same weight/activation layout, so its QDQ graph runs a subset of the trial's float work —
and (b) scores better on the same low-fidelity samples with the upper bound of the paired bootstrap interval of
(trial - other) below zero, at a one-sided level of 1 % for the whole decision: the candidates tested are chosen
after looking at every no-slower trial's low-fidelity difference, so the Bonferroni correction is over all K of
them (each test at alpha / K; recorded as `tests`), though at most MAX_TESTS are bootstrapped; 2,000 resamples. Then the other trial dominates it with evidence, and the front cannot gain it.
The level is strict because a stop saves little (a few seconds per trial) and a wrong stop can lose a front point.
"No slower" is first judged by structure (same weight/activation layout, placement and 16-bit groups; a subset of
the float nodes) and then, where both trials have a measured latency, by measurement: a float subset is not always
faster (a Q/DQ island between float neighbours costs conversions), so a dominator measured slower than the trial
with disjoint 95 % intervals never stops it (overlapping intervals leave the structural rule in charge, so timing
noise does not make the decision irreproducible). The trial's own latency is measured only when a stop is about to
be decided (booked by structure like every timing, so it is not wasted when the trial goes on).
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
    latency: str = "structure"  # how "no slower" was established, with the measured ratios when both exist

    def to_dict(self) -> dict:
        return asdict(self)


def ratio_and_ci(latency: dict | None):
    """(ratio, (lo, hi)) of a booked latency, or None when there is none."""
    if not latency or latency.get("ratio") is None:
        return None
    ci = latency.get("ratio_ci") or (latency["ratio"], latency["ratio"])
    return float(latency["ratio"]), (float(ci[0]), float(ci[1]))


STRUCTURE_KNOBS = ("per_channel", "activation_type", "target", "placement", "depthwise_per_channel")


def no_slower(a: dict, b: dict) -> bool:
    """Plan `a` runs a subset of plan `b`'s float work: a subset of b's float nodes, the same weight/activation
    layout, placement and 16-bit groups (the structural part of the rule; prune_decision adds measurement)."""
    same = all(a.get(k) == b.get(k) for k in STRUCTURE_KNOBS) and all(
        set(a.get(k) or []) == set(b.get(k) or []) for k in ("a16_nodes", "fp16_nodes"))
    return same and set(a["float_nodes"]) <= set(b["float_nodes"])


def prune_decision(plan: dict, samples, candidates, boot, values: dict | None = None,
                   latency=None) -> PruneDecision | None:
    """candidates: (trial number, plan dict, load[, (measured ratio, its 95 % interval) or None]) of finished trials,
    load() -> their per-sample results (or None); latency() -> this trial's (ratio, interval) or None, called at
    most once;
    boot: a PairedBootstrap over the low-fidelity samples. Results are loaded one at a time and only for no-slower
    trials: at full-size evaluation sets a study's results do not fit in memory together. values: the caller's memo
    {trial number: value on boot.indices}, kept across decisions (a finished trial's value there never changes)."""
    idx = boot.indices
    values = {} if values is None else values
    mine = samples.value(idx)
    diffs, considered, ratios = [], 0, {}
    for number, other_plan, load, *ratio in candidates:
        if not no_slower(other_plan, plan):
            continue
        ratios[number] = ratio[0] if ratio else None
        if number not in values:
            other = load()
            if other is None:
                continue
            values[number] = other.value(idx)
        considered += 1
        d = mine - values[number]
        if d < 0:
            diffs.append((d, number, load))
    mine_ratio: list = []  # measured once, when first needed
    for d, number, load in sorted(diffs, key=lambda x: (x[0], x[1]))[:MAX_TESTS]:
        other = load()
        if other is None:
            continue
        iv = boot.difference(samples, other, test_level(considered))
        if iv.hi >= 0:
            continue
        how = "structure"
        if ratios.get(number) is not None and latency is not None:
            if not mine_ratio:
                mine_ratio.append(latency())
            if mine_ratio[0] is not None:
                (r_other, ci_other), (r_mine, ci_mine) = ratios[number], mine_ratio[0]
                if ci_other[0] > ci_mine[1]:
                    continue  # structurally no slower, measured slower with disjoint intervals: no evidence
                how = f"structure; measured {r_other:.3f} vs {r_mine:.3f}"
        return PruneDecision(number, iv.value, iv.lo, iv.hi, len(idx), considered, how)
    return None
