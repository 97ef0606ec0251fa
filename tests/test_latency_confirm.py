"""The latency confirmation stage: the front's candidates re-timed with FP32 and all-INT8 in the same rounds.

Independent references: a fake machine whose speed drifts by +-40 % (the true cost ratios are known), and the
confirmation's own per-round record (every front ratio must be the median of its rounds, every row's FP32 ms the
same number)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sensq.latency import measure_paired, measure_together
from sensq.latency.paired import Reference
from sensq.search import run_search
from sensq.search.latency_confirm import candidates

from search_helpers import make_tiny, tiny_settings


class DriftingMachine:
    """A backend whose every run costs base_ms x the machine's current slowness; slowness swings +-40 % with the
    number of runs done so far (a shared machine whose load changes within minutes)."""

    name, unit, deterministic = "fake", "ms", False

    def __init__(self, period: int = 400):
        self.calls, self.period = 0, period

    def slowness(self) -> float:
        return 1.0 + 0.4 * math.sin(2 * math.pi * self.calls / self.period)

    def timer(self, base_ms: float):
        machine = self

        class _Timer:
            def __call__(self):
                machine.calls += 1
                return base_ms * machine.slowness()

            def close(self):
                pass

        return _Timer()


def test_measure_together_recovers_true_ratios_where_separate_moments_do_not():
    costs = {"fp32": 30.0, "int8": 21.0, "a": 23.1, "b": 24.0}
    machine = DriftingMachine()
    together = measure_together(machine, costs, "fp32", seconds=60.0, min_rounds=12, max_rounds=40)
    for name, cost in costs.items():
        assert together[name].ratio == pytest.approx(cost / costs["fp32"], rel=0.01)
    assert together["fp32"].ratio == 1.0 and together["fp32"].ratio_ci == (1.0, 1.0)
    assert len({m.ref_value for m in together.values()}) == 1  # one FP32 ms, from the same rounds, for every model

    # the search's way: each model paired with FP32 in its own 12 rounds, at its own moment of the machine
    machine = DriftingMachine(period=400)
    ref = Reference(machine, costs["fp32"])
    separate = {}
    for name in ("int8", "a", "b"):
        separate[name] = measure_paired(machine, costs[name], ref, rounds=12, runs=2)
        machine.calls += 150  # the next trial is timed minutes later
    # paired rounds cancel most drift, yet the ms each trial reports come from different moments
    ms = {n: separate[n].value / costs[n] for n in separate}
    assert max(ms.values()) / min(ms.values()) > 1.2
    ms_together = {n: together[n].value / costs[n] for n in ("int8", "a", "b")}
    assert max(ms_together.values()) / min(ms_together.values()) == pytest.approx(1.0, abs=0.02)


def _row(trial, metric, ratio, lo, hi, h=None):
    return {"trial": trial, "metric": metric, "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi,
            "model_hash": h or f"h{trial}", "plan": {}, "latency_value": ratio * 30}


def test_candidates_keep_every_plan_whose_interval_overlaps_the_front():
    rows = [_row(-1, 0.300, 1.0, 1.0, 1.0),
            _row(0, 0.290, 0.70, 0.65, 0.75),  # all-INT8: on the front
            _row(1, 0.291, 0.68, 0.66, 0.74),  # more float, shown faster: on the front at search time
            _row(2, 0.285, 0.72, 0.69, 0.80),  # off the front, but its interval overlaps trial 0's: re-timed
            _row(3, 0.280, 0.90, 0.88, 0.92),  # slower than trials 0/1 with disjoint intervals and less accurate
            _row(4, 0.299, 1.20, 1.10, 1.30)]  # slower than FP32 for sure, less accurate
    chosen, skipped = candidates(rows)
    assert [r["trial"] for r in chosen] == [1, 0, 2]  # front first (cheapest first), then by metric
    assert set(skipped) == {3, 4} and "trial 1" in skipped[3] and "FP32" in skipped[4]


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    workdir = tmp_path_factory.mktemp("confirm") / "run"
    res = run_search(tiny.workspace(), tiny.evaluator(),
                     tiny_settings(workdir, 6, latency="ort:threads=1,warmup=1", latency_confirm=20), progress=False)
    return workdir, res


def test_the_front_and_its_ms_come_from_the_confirmation_rounds(timed_run):
    workdir, res = timed_run
    conf = json.loads((workdir / "latency_confirm.json").read_text())
    assert conf["rounds"] >= 12 and conf["seconds"] <= conf["budget"] + 5
    fp32 = res.rows[0]
    assert fp32["latency_value"] == pytest.approx(conf["by_hash"][conf["fp32_hash"]]["value"])
    for r in res.front:
        assert r["latency_confirmed"]
        c = conf["by_hash"][r["model_hash"]]
        assert r["ratio"] == pytest.approx(float(np.median(c["round_ratios"])), abs=1e-5)  # rounds kept to 5 decimals
        assert len(c["round_ratios"]) == conf["rounds"]
        assert r["fp32_value_same_rounds"] == pytest.approx(fp32["latency_value"])  # one FP32 ms for every point
        if r["trial"] >= 0:
            assert r["search_ratio"] is not None  # the search-time ratio is kept next to the confirmed one
    summary = json.loads((workdir / "pareto.json").read_text())["summary"]
    assert summary["latency_confirmation"]["rounds"] == conf["rounds"]
    assert summary["fp32_ms_this_run"] == pytest.approx(fp32["latency_value"])
    md = (workdir / "pareto.md").read_text()
    assert "x FP32 during search" in md and "latency confirmed" in md.lower()
    csv = (workdir / "pareto.csv").read_text().splitlines()[0].split(",")
    assert {"search_ratio", "latency_confirmed"} <= set(csv)


def test_rows_not_retimed_never_reach_the_front(timed_run):
    _, res = timed_run
    assert all(r["latency_confirmed"] for r in res.front)
    assert all(not r["on_front"] for r in res.rows if not r["latency_confirmed"])


def test_a_few_plans_are_retimed_well_rather_than_many_loosely():
    from sensq.search.latency_confirm import MAX_PLANS, confirm_latency

    # twelve plans, all overlapping the front; plan k costs 20 + k ms (FP32 30, all-INT8 20 = trial 0)
    rows = [_row(-1, 0.300, 1.0, 1.0, 1.0, "fp32")]
    rows += [_row(k, 0.280 + 0.001 * k, (20 + k) / 30, (18 + k) / 30, (22 + k) / 30) for k in range(12)]
    for r in rows[1:]:
        r["plan"] = {"cost": 20.0 + r["trial"]}
    conf = confirm_latency(rows, lambda plan: plan["cost"], DriftingMachine(period=4000), 30.0, "fp32", 20.0, "h0", budget=60.0)
    assert len(conf.trials) == MAX_PLANS + 1  # all-INT8's trial 0 plus MAX_PLANS others
    assert all("closer to the front" in why for t, why in conf.skipped.items())
    for h, m in conf.by_hash.items():  # exact costs on a drifting machine: every ratio recovered
        cost = 30.0 if h == "fp32" else 20.0 + int(h[1:])
        assert m["ratio"] == pytest.approx(cost / 30.0, rel=0.01)
