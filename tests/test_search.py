"""Mixed-precision search mechanics: seeds and warm start, the budget counts distinct plans, repeats are skipped and
reported, pruning decisions follow from the stored per-sample values, determinism (also with a timed backend),
greedy and random strategies, --limit, and a fresh FP32 reference in every run."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from sensq.evaluators.samples import MeanSamples, PairedBootstrap, bca_interval, bootstrap_weights, jackknife_weights
from sensq.evaluators.scoring import SampleStore
from sensq.quantize import cache_dir
from sensq.search import run_search
from sensq.search.fidelity import no_slower, prune_decision
from sensq.sensitivity import quantizable_groups

from references import median_interval
from search_helpers import (PNG_SIGNATURE, SEED_LABELS, Tiny, entered, load_study, make_tiny, searched,  # noqa: F401
                            study_records, tiny_settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """One budget-10 search on the tiny setup: (workdir, result, workspace, evaluator)."""
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path_factory.mktemp("search") / "run"
    result = run_search(ws, ev, tiny_settings(workdir, 10), progress=False)
    return workdir, result, ws, ev


def test_seeds_warm_start_and_budget_counts_distinct_plans(tiny_run):
    workdir, result, ws, _ = tiny_run
    recs = study_records(workdir)
    counted = searched(recs)
    assert len({r.plan_key for r in counted}) == len(counted) == 10  # 10 distinct plans, none scored twice
    info = json.loads((workdir / "search.json").read_text())
    ranked = info["ranked_groups"]
    assert sorted(ranked) == sorted(quantizable_groups(ws, by="node"))
    assert len({r.model_hash for r in counted}) == 10  # ... and no two of them the same built model
    every = entered(recs)
    by_label = {r.label: r for r in every}
    for n, label in enumerate(SEED_LABELS):  # seeds: the default plan with the top n groups float, once each
        assert [r.label for r in every].count(label) == 1
        assert by_label[label].float_groups == ranked[:n] and by_label[label].source == "seed"
        assert by_label[label].plan["method"] == ws.base_plan.method
    # one model, one trial: with conv1 and conv2 float, keeping the relu between them float too builds the very same
    # model (no Q/DQ is left around it), so the top-3 seed reuses the top-2 seed's results instead of being scored
    top2, top3 = by_label["seed: top-2 float"], by_label["seed: top-3 float"]
    assert "relu" in top3.float_groups and "relu" not in top2.float_groups
    assert ws.build(ws.base_plan.with_float(top3.plan["float_nodes"])).SerializeToString() == \
        ws.build(ws.base_plan.with_float(top2.plan["float_nodes"])).SerializeToString()
    assert top3.repeat_of == top2.number and top3.model_hash == top2.model_hash and top3.metric == top2.metric
    # a sampled plan may build an earlier model too (latency is timed, so which ones depends on the machine): each
    # such repeat must point at the trial that scored that model, which the loop below checks
    repeats = result.summary["model_repeats"]
    assert top3 not in counted and repeats[top3.number] == top2.number
    assert set(repeats) == {r.number for r in every if r.repeat_of is not None}
    for r in every:  # every repeat names a trial that built the same model and was scored
        if r.repeat_of is not None:
            assert {x.number: x.model_hash for x in counted}[r.repeat_of] == r.model_hash
    assert by_label["seed: top-1 float"].plan["float_nodes"] == sorted(quantizable_groups(ws, by="node")[ranked[0]])
    # the sensitivity pass's leave-one-out runs were entered as plans at the fidelity they were scored on
    warm = [r for r in recs if r.source == "sensitivity"]
    scored = result.sensitivity.table[result.sensitivity.table["scored_by"] == "metric"]
    assert sorted(r.float_groups[0] for r in warm) == sorted(scored["group"])
    for r in warm:
        row = scored.set_index("group").loc[r.float_groups[0]]
        assert r.fidelity == 8 and r.metric == row["metric"] and r.delta_int8 == pytest.approx(row["delta"])
    # repeats: FAIL trials pointing at the trial that scored the plan; the summary counts them
    study = load_study(workdir)
    dupes = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    keys = {r.number: r.plan_key for r in recs}
    assert all(t.user_attrs["duplicate_of"] in keys for t in dupes)
    assert result.repeats == len(dupes) + len(result.summary["model_repeats"]) == result.summary["repeats"]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))


def test_a_repeated_plan_is_neither_run_nor_counted(tiny, tmp_path):
    """A space of toggles only has 2^3 plans: TPE proposes repeats; the budget still counts distinct plans only, and
    the search stops (with the plans it has) when no unscored plan is left."""
    space = tmp_path / "toggles.yaml"
    space.write_text("params:\n  float_groups:\n    type: group_toggles\n    top_k: 3\n")
    ws, ev = tiny.workspace(), tiny.evaluator()
    res = run_search(ws, ev, tiny_settings(tmp_path / "w", 8, space=str(space)), progress=False)
    recs = study_records(tmp_path / "w")
    counted = searched(recs)
    assert len({r.plan_key for r in entered(recs)}) == len(entered(recs)) == 8  # all 2^3 plans, each once ...
    # ... but relu float between two float convs changes nothing: 2 of the 8 plans build a model already scored
    assert len(counted) == len({r.model_hash for r in counted}) == 6 == res.summary["distinct_plans"]
    assert len(res.summary["model_repeats"]) == 2 and res.repeats > 2
    calls = ev.calls
    res = run_search(ws, ev, tiny_settings(tmp_path / "w", 9, space=str(space)), progress=False)  # nothing left
    assert len(searched(study_records(tmp_path / "w"))) == 6 and ev.calls == calls  # no model scored again


def test_pruning_decision_is_reproduced_by_hand_from_per_sample_values():
    rng = np.random.default_rng(3)
    idx = np.arange(30)
    good = rng.normal(0.0, 1.0, 30)
    bad = good - 1.0 + rng.normal(0, 0.2, 30)  # clearly worse on the same samples
    close = good - 0.01 + rng.normal(0, 0.5, 30)  # worse on average, inside the noise
    plan = {"float_nodes": ["a", "b"], "per_channel": True, "activation_type": None, "target": "ort-cpu"}
    cheaper = {**plan, "float_nodes": ["a"]}
    boot = PairedBootstrap(idx, 400, 0)
    s_good = MeanSamples(idx, {"m": good}, "m")
    d = prune_decision(plan, MeanSamples(idx, {"m": bad}, "m"), [(7, cheaper, lambda: s_good)], boot)
    # by hand: paired differences on the same resamples, BCa interval, upper bound below zero
    w, jw = bootstrap_weights(30, 400, 0), jackknife_weights(30)
    from sensq.search.fidelity import PRUNE_ALPHA

    lo, hi = bca_interval(float((bad - good).mean()), w @ (bad - good) / 30, jw @ (bad - good) / 30,
                          1 - 2 * PRUNE_ALPHA)  # one candidate looked at: the whole one-sided alpha for it
    assert d is not None and d.by == 7 and d.n == 30 and d.tests == 1
    assert (d.diff, d.lo, d.hi) == pytest.approx((float((bad - good).mean()), lo, hi)) and hi < 0
    assert prune_decision(plan, MeanSamples(idx, {"m": close}, "m"), [(7, cheaper, lambda: s_good)], boot) is None
    # a better-scoring but possibly slower trial (more float nodes, or another weight layout) never prunes
    slower = {**plan, "float_nodes": ["a", "b", "c"]}
    assert not no_slower(slower, plan) and not no_slower({**cheaper, "per_channel": False}, plan)
    assert prune_decision(plan, MeanSamples(idx, {"m": bad}, "m"), [(8, slower, lambda: s_good)], boot) is None


def test_a_float_subset_measured_slower_does_not_prune():
    """Fewer float nodes is not always faster (a Q/DQ island between float neighbours costs conversions): a
    dominator whose measured latency is above the trial's never stops it; measured faster (or unmeasured) it does.
    The structural rule also requires the same placement and 16-bit groups."""
    rng = np.random.default_rng(8)
    idx = np.arange(30)
    good = rng.normal(0.0, 1.0, 30)
    plan = {"float_nodes": ["a", "b"], "per_channel": True, "activation_type": None, "target": "ort-cpu"}
    cheaper = {**plan, "float_nodes": ["a"]}
    boot = PairedBootstrap(idx, 400, 0)
    s_good, bad = MeanSamples(idx, {"m": good}, "m"), MeanSamples(idx, {"m": good - 1.0}, "m")
    calls = []

    def mine():
        calls.append(1)
        return 0.80, (0.78, 0.82)

    # measured slower, intervals disjoint: no stop (the old structural rule stopped it)
    assert prune_decision(plan, bad, [(7, cheaper, lambda: s_good, (0.86, (0.84, 0.88)))], boot, latency=mine) is None
    # measured slower but the intervals overlap, or measured faster: the structural rule stands
    for other in ((0.83, (0.81, 0.85)), (0.75, (0.74, 0.76))):
        d = prune_decision(plan, bad, [(7, cheaper, lambda: s_good, other)], boot, latency=mine)
        assert d is not None and d.by == 7 and "measured" in d.latency
    assert len(calls) == 3
    assert prune_decision(plan, bad, [(7, cheaper, lambda: s_good, None)], boot, latency=mine).latency == "structure"
    assert not no_slower({**cheaper, "placement": "inputs"}, plan)
    assert not no_slower({**cheaper, "a16_nodes": ["x"]}, plan)


def test_pruning_corrects_over_every_candidate_it_looked_at():
    """Issue 18.2: choosing the most negative differences among K no-slower trials and correcting over 3 gives a
    family-wise error of about K*alpha/3. A difference significant at one-sided alpha/3 but not at alpha/30 prunes
    when it is the only candidate, and no longer when 29 other no-slower candidates were looked at too."""
    from sensq.search.fidelity import PRUNE_ALPHA

    rng = np.random.default_rng(4)
    n, idx = 30, np.arange(30)
    good, noise = rng.normal(0.0, 1.0, n), rng.normal(0.0, 1.0, n)
    w, jw = bootstrap_weights(n, 2000, 0), jackknife_weights(n)

    def upper(delta, tests):  # by hand: BCa upper bound of (trial - other) at one-sided alpha / tests
        d = -delta + noise
        return bca_interval(float(d.mean()), w @ d / n, jw @ d / n, 1 - 2 * PRUNE_ALPHA / tests)[1]

    delta = next(x for x in np.arange(0.2, 2.0, 0.01) if upper(x, 3) < 0 <= upper(x, 30))
    plan = {"float_nodes": ["a", "b"], "per_channel": True, "activation_type": None, "target": "ort-cpu"}
    cheaper = {**plan, "float_nodes": ["a"]}
    mine = MeanSamples(idx, {"m": good - delta + noise}, "m")
    boot = PairedBootstrap(idx, 2000, 0)
    best = (7, cheaper, lambda: MeanSamples(idx, {"m": good}, "m"))
    assert prune_decision(plan, mine, [best], boot) is not None
    worse = [(100 + i, cheaper, lambda i=i: MeanSamples(idx, {"m": good - 5.0 - i}, "m")) for i in range(29)]
    assert prune_decision(plan, mine, [best, *worse], boot) is None
    d = prune_decision(plan, MeanSamples(idx, {"m": good - 3.0 + noise}, "m"), [best, *worse], boot)
    assert d is not None and d.tests == 30  # the decision records how many comparisons its level covers


def test_the_sampler_learns_one_cost_definition_from_every_trial(tiny_run):
    """Issue 18.4: with a deterministic backend (bops) full trials gave the sampler their backend ratio while the
    sensitivity warm start (and stopped plans) gave the float-MAC share, so warm-start plans looked cheaper than
    all-INT8. Every trial's second objective is now the float-MAC share, computed here from the graph by hand
    (on the module's budget-10 bops search: warm start, seeds, full and stopped trials)."""
    from sensq.latency import macs_per_node

    workdir, _, ws, _ = tiny_run
    macs = macs_per_node(ws.model)
    by_number = {r.number: r for r in study_records(workdir)}
    told = [t for t in load_study(workdir).trials if t.values is not None]
    assert {by_number[t.number].source for t in told} >= {"sensitivity", "seed"}
    for t in told:
        share = sum(m for n, m in macs.items() if n in by_number[t.number].plan["float_nodes"]) / sum(macs.values())
        assert t.values[1] == pytest.approx(share), (t.number, by_number[t.number].label)


def test_prune_decision_loads_only_no_slower_trials_and_memoizes_their_values():
    """At full-size sets a study's per-sample results do not fit in memory together: a decision loads a finished
    trial's results only when it is no slower, and a value computed once is not loaded again for the next trial."""
    idx = np.arange(30)
    good = np.random.default_rng(4).normal(0.0, 1.0, 30)
    plan = {"float_nodes": ["a", "b"], "per_channel": True, "activation_type": None, "target": "ort-cpu"}
    loads = []

    def loader(number, values):
        def load():
            loads.append(number)
            return MeanSamples(idx, {"m": values}, "m")
        return load

    def never():
        raise AssertionError("a slower trial's results were loaded")

    candidates = [(1, {**plan, "float_nodes": ["a"]}, loader(1, good)),  # no slower, better: tested
                  (2, {**plan, "float_nodes": ["a", "b", "c"]}, never),  # slower: never read
                  (3, {**plan, "float_nodes": []}, loader(3, good - 5.0))]  # no slower, but worse: value only
    boot, memo = PairedBootstrap(idx, 200, 0), {}
    d = prune_decision(plan, MeanSamples(idx, {"m": good - 1.0}, "m"), candidates, boot, memo)
    assert d is not None and d.by == 1
    assert loads == [1, 3, 1] and set(memo) == {1, 3}  # value of 1 and 3, then 1 again for its bootstrap test
    loads.clear()
    assert prune_decision(plan, MeanSamples(idx, {"m": good + 1.0}, "m"), candidates, boot, memo) is None
    assert loads == []  # better than every candidate: decided from the memo alone


def test_every_prune_in_a_run_is_backed_by_its_stored_samples(tiny_run):
    """The low fidelity is half the samples; a per-tensor method that collapses the tiny model gets pruned by the
    all-INT8 seed, and the stored per-sample values reproduce the recorded interval (the module's budget-10 run)."""
    workdir, _, ws, ev = tiny_run
    recs = {r.number: r for r in study_records(workdir)}
    store = SampleStore(cache_dir(ws.cfg) / "samples", ev)
    split = json.loads((workdir / "search.json").read_text())["split"]
    low = np.asarray(split["search"][: split["low"]])
    pruned = [r for r in recs.values() if r.pruned]
    assert pruned, "no trial was stopped: the check below would be vacuous"
    for r in pruned:
        other = recs[r.pruned["by"]]
        assert other.full and no_slower(other.plan, r.plan)
        mine, theirs = store.get(r.model_hash), store.get(other.model_hash)
        # the documented rule: 2,000 resamples, one-sided 1 % per decision split over the K no-slower trials it
        # looked at (finished before it: at most the earlier full ones)
        k = r.pruned["tests"]
        assert 1 <= k <= len([o for o in recs.values() if o.full and o.number < r.number and no_slower(o.plan, r.plan)])
        iv = PairedBootstrap(low, 2000, 0, level=1 - 2 * 0.01 / k).difference(mine, theirs)
        assert (iv.value, iv.lo, iv.hi) == pytest.approx((r.pruned["diff"], r.pruned["lo"], r.pruned["hi"]))
        assert iv.hi < 0 and r.fidelity == len(low)


def test_sensitivity_ranks_on_samples_disjoint_from_the_low_fidelity_subset(tiny, tmp_path, monkeypatch):
    """Seeds are the top groups of the sensitivity ranking; ranked on the low-fidelity samples themselves, a seed
    would look better there than it is and stop trials that are level with it."""
    from sensq.search import study as study_module

    seen = []
    original = study_module.run_sensitivity

    def recording(ws, ev, indices=None, **kw):
        seen.append(sorted(int(i) for i in indices))
        return original(ws, ev, indices=indices, **kw)

    monkeypatch.setattr(study_module, "run_sensitivity", recording)
    workdir = _run(tiny, tmp_path / "w", 3)
    split = json.loads((workdir / "search.json").read_text())["split"]
    low = set(split["search"][: split["low"]])
    assert len(seen) == 1 and len(seen[0]) == split["low"]
    assert set(seen[0]) <= set(split["search"]) and not set(seen[0]) & low


def test_same_seed_same_plans_even_with_a_noisy_timed_backend(tiny, tmp_path):
    """The sampler never sees measured latency, so two runs with the ort backend try the same plans in the same
    order and agree on every score; only the measured ratios differ, within their intervals."""
    fast = "ort:threads=1,warmup=1"
    a = study_records(_run(tiny, tmp_path / "a", 8, latency=fast))
    b = study_records(_run(tiny, tmp_path / "b", 8, latency=fast))
    assert [(r.plan_key, r.metric, r.pruned is None) for r in a] == [(r.plan_key, r.metric, r.pruned is None) for r in b]
    for ra, rb in zip(a, b):
        if ra.latency and rb.latency:
            ratios = ra.latency["round_ratios"]
            assert ra.latency["unit"] == "ms" and ra.ratio == pytest.approx(float(np.median(ratios)), abs=1e-5)
            assert ra.latency["ratio_ci"] == pytest.approx(median_interval(ratios), abs=1e-5)


def _run(tiny: Tiny, workdir, budget, **kw):
    run_search(tiny.workspace(), tiny.evaluator(), tiny_settings(workdir, budget, **kw), progress=False)
    return workdir


def test_greedy_adds_groups_in_sensitivity_order(tiny, tmp_path):
    workdir = _run(tiny, tmp_path / "g", 10, strategy="greedy")
    recs = entered(study_records(workdir))
    ranked = json.loads((workdir / "search.json").read_text())["ranked_groups"]
    assert [r.float_groups for r in recs] == [ranked[:n] for n in range(len(ranked) + 1)]  # stops when all are float
    # every step scored in full, none pruned; the last (relu float too) builds the previous step's model again
    assert all(r.full and r.source == "greedy" for r in recs[:-1]) and recs[-1].repeat_of == recs[-2].number


def test_random_strategy_uses_optunas_random_sampler(tiny, tmp_path):
    workdir = _run(tiny, tmp_path / "r", 6, strategy="random")
    recs = searched(study_records(workdir))
    assert [r.label for r in recs].count("all-INT8") == 1 and not [r for r in recs if r.label.startswith("seed: top")]
    assert not [r for r in study_records(workdir) if r.source == "sensitivity"]  # no warm start for the baseline
    assert len({r.plan_key for r in recs}) == 6


def test_limit_restricts_the_evaluation_set(tiny, tmp_path):
    ev = tiny.evaluator()
    workdir = tmp_path / "l"
    run_search(tiny.workspace(), ev, tiny_settings(workdir, 3, limit=10), progress=False)
    split = json.loads((workdir / "search.json").read_text())["split"]
    assert sorted(split["search"] + split["confirm"]) == list(range(10))


def test_fp32_reference_is_measured_in_every_run(tiny, tmp_path, monkeypatch):
    """Rerunning (resuming) a study measures FP32 again on this machine; nothing is read from an earlier run."""
    from sensq.latency.ort import OrtLatency

    measured = []
    original = OrtLatency.measure

    def counting(self, model):
        measured.append(1)
        return original(self, model)

    monkeypatch.setattr(OrtLatency, "measure", counting)
    workdir = tmp_path / "w"
    _run(tiny, workdir, 2, latency="ort:threads=1,warmup=1")
    first = json.loads((workdir / "pareto.json").read_text())["summary"]
    _run(tiny, workdir, 3, latency="ort:threads=1,warmup=1")
    second = json.loads((workdir / "pareto.json").read_text())["summary"]
    assert len(measured) == 2  # one FP32 measurement per run
    assert first["fp32_ms_this_run"] != second["fp32_ms_this_run"]  # a new measurement, not a cached number
    assert first["machine"]["machine_id"] == second["machine"]["machine_id"]


def test_a_plan_the_collapse_guard_rejects_is_pruned_once_not_retried(tiny, tmp_path, monkeypatch):
    """A rejected plan is told PRUNED with its reason and counts toward the budget: told FAIL, Optuna's retry
    callback re-queued it and the search rejected the same plan forever (seen on YOLOX-Nano: 1,584 trials)."""
    from sensq.guard import PlanGuard

    ws, ev = tiny.workspace(), tiny.evaluator()
    base = set(ws.base_plan.float_nodes)
    calls = []

    def reject_float_sets(self, qmodel, plan=None):
        calls.append(plan)
        assert len(calls) < 50, "the search keeps building rejected plans"  # fail fast, not hang, on a regression
        return "collapse guard: test" if plan is not None and set(plan.float_nodes) - base else None

    monkeypatch.setattr(PlanGuard, "__call__", reject_float_sets)
    run_search(ws, ev, tiny_settings(tmp_path / "w", 4), progress=False)
    study = load_study(tmp_path / "w")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL not in states
    rejected = [r for r in study_records(tmp_path / "w") if r.rejected]
    assert rejected and all(r.rejected == "collapse guard: test" and np.isnan(r.metric) for r in rejected)
    assert len(study.trials) <= 4 + 4  # budget plus the sensitivity and FP32 bookkeeping, not an endless retry
