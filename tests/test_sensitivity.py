"""Layer groups and leave-one-out sensitivity: module groups on yolov5n (decode never among them), one row per group
with delta = metric - all-INT8, the on-disk cache (no evaluation on a hit), the top-k summary and `sensq sensitivity`."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from sensq.cli import main
from sensq.defaults import build_config
from sensq.quantize import prepare
from sensq.runtime import make_session
from sensq.sensitivity import quantizable_groups, run_sensitivity, summary, write_report
from sensq.targets import get_target

from search_helpers import PNG_SIGNATURE, make_tiny

TOP_LINE = re.compile(r"^Top(\d+): float (\S+) → neg_mse (-?\d+\.\d{4}) \(([+-]\d+\.\d{4}) vs all-INT8\)$")


@pytest.fixture(scope="module")
def yolo_ws(yolov5n_ws):
    return yolov5n_ws


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sens"))


@pytest.fixture(scope="module")
def tiny_ws(tiny):
    return tiny.workspace()


# ------------------------------------------------------------------------------------------------ groups
def test_yolov5n_module_groups_depth1(yolo_ws):
    groups = quantizable_groups(yolo_ws, depth=1)
    # the Upsample (Resize) and Concat modules hold no weights: folded into the module feeding them
    folded = {11: 10, 12: 10, 15: 14, 16: 14, 19: 18, 22: 21}
    # model.24's three output convs are float head layers by default (--head-layers float): not a group
    assert set(groups) == {f"model.{i}" for i in range(24) if i not in folded}
    for i, into in folded.items():
        assert any(n.startswith(f"/model.{i}/") for n in groups[f"model.{into}"]), i
    assert list(groups)[0] == "model.0"
    decode = set(yolo_ws.head.float_nodes)
    assert decode and all(n.startswith("/model.24/") for n in decode)
    members = [n for nodes in groups.values() for n in nodes]
    assert len(members) == len(set(members))
    assert not decode & set(members)
    for g, nodes in groups.items():
        assert all(n.startswith(f"/{g}/") or any(n.startswith(f"/model.{i}/") for i, t in folded.items()
                                                   if f"model.{t}" == g) for n in nodes), g
    # exactly the nodes the base plan quantizes: op types of the target, not float
    ops = set(get_target(yolo_ws.base_plan.target, yolo_ws.base_plan.activation_type).resolved_op_types())
    expected = {n.name for n in yolo_ws.builder.model.graph.node
                if n.op_type in ops and n.name not in set(yolo_ws.base_plan.float_nodes)}
    assert set(members) == expected
    assert yolo_ws.head_layers == {f"/model.24/m.{i}/Conv" for i in range(3)}


@pytest.mark.slow
def test_yolov5n_every_group_float_is_a_distinct_built_model(yolo_ws):
    """One model, one trial: keeping any group float changes the built model (before the fold, model.12/16/19/22
    float built all-INT8's bytes), and no two groups float give the same model."""
    from sensq.evaluators.scoring import model_hash

    groups = quantizable_groups(yolo_ws, depth=1)
    hashes = [model_hash(yolo_ws.build())] + [model_hash(yolo_ws.build(yolo_ws.base_plan.with_float(nodes)))
                                              for nodes in groups.values()]
    assert len(set(hashes)) == len(hashes) == len(groups) + 1


def test_yolov5n_depth2_splits_groups(yolo_ws):
    g1 = quantizable_groups(yolo_ws, depth=1)
    g2 = quantizable_groups(yolo_ws, depth=2)
    assert len(g2) > len(g1)
    assert {"model.2/cv1", "model.2/m", "model.23/m"} <= set(g2)
    assert sorted(n for v in g2.values() for n in v) == sorted(n for v in g1.values() for n in v)
    for key, nodes in g2.items():
        parent = key.split("/")[0]
        assert set(nodes) <= set(g1[parent]), key
    split = [g for g in g1 if sum(k.split("/")[0] == g for k in g2) > 1]
    assert len(split) >= 9  # most modules have sub-modules (model.24 is float: head layers)
    by_node = quantizable_groups(yolo_ws, by="node")
    assert all(k == v[0] and len(v) == 1 for k, v in by_node.items())
    assert len(by_node) == sum(len(v) for v in g1.values())


# ------------------------------------------------------------------------------------------------ leave-one-out
def test_run_sensitivity_rows_deltas_and_proxy(tiny, tiny_ws, tmp_path):
    ws, ev = tiny_ws, tiny.evaluator()
    res = run_sensitivity(ws, ev, limit=8, by="node", progress=False, cache=tmp_path / "cache", budget_seconds=None)
    groups = quantizable_groups(ws, by="node")
    assert list(res.table["group"]) == list(groups) == ["conv1", "relu", "conv2"]
    assert res.metric_name == "neg_mse" and res.n_samples == 8 and set(res.table["scored_by"]) == {"metric"}
    int8 = ev.evaluate(ws.build(), limit=8).value
    assert res.int8_metric == pytest.approx(int8) and res.fp32_metric == pytest.approx(ev.evaluate(ws.model, limit=8).value)
    for _, row in res.table.iterrows():
        qmodel = ws.build(ws.base_plan.with_float(groups[row["group"]]))
        assert row["metric"] == pytest.approx(ev.evaluate(qmodel, limit=8).value)
        assert row["delta"] == pytest.approx(row["metric"] - int8) and row["n_nodes"] == len(groups[row["group"]])
    # the proxy, by hand for conv2: only conv2 quantized, SNR at the model output over 8 calibration samples
    feeds = ws.samples(8)
    f = np.concatenate([make_session(ws.model).run(None, x)[0].ravel() for x in feeds]).astype(np.float64)
    others = [n for g, nodes in groups.items() if g != "conv2" for n in nodes]
    qsess = make_session(ws.build(ws.base_plan.with_float(others)))
    q = np.concatenate([qsess.run(None, x)[0].ravel() for x in feeds]).astype(np.float64)
    snr = float(np.sum((q - f) ** 2) / np.sum(f ** 2))
    got = float(res.table.loc[res.table["group"] == "conv2", "proxy_snr"].iloc[0])
    assert got == pytest.approx(snr, rel=1e-5)
    # ranked by metric gain, best first; keeping the best group float recovers accuracy
    assert res.ranked_groups == list(res.table.sort_values("delta", ascending=False, kind="mergesort")["group"])
    assert res.table.set_index("group").loc[res.ranked_groups[0], "delta"] > 0


def test_budget_bounds_metric_runs_and_proxy_ranks_the_rest(tiny, tiny_ws, tmp_path):
    ws, ev = tiny_ws, tiny.evaluator()
    res = run_sensitivity(ws, ev, limit=8, by="node", progress=False, budget_seconds=0.0)
    scored = res.table[res.table["scored_by"] == "metric"]
    assert len(scored) == 1  # the group the proxy ranks worst gets the metric; the budget is then spent
    assert scored["group"].iloc[0] == res.table.sort_values("proxy_snr", ascending=False)["group"].iloc[0]
    ranked = res.ranked
    assert ranked["group"].iloc[0] == scored["group"].iloc[0]
    rest = ranked[ranked["scored_by"] == "proxy"]
    assert list(rest["proxy_snr"]) == sorted(rest["proxy_snr"], reverse=True) and rest["metric"].isna().all()
    assert res.notes[0].startswith("1 of 3 groups scored by the task metric")
    assert "not scored by neg_mse" in summary(res, 3)


def test_spearman_by_hand():
    from sensq.sensitivity import spearman

    # ranks (1, 2, 3, 4) vs (2, 1, 4, 3): rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 60 = 0.6
    assert spearman([0.1, 0.2, 0.3, 0.4], [5.0, 1.0, 9.0, 7.0]) == pytest.approx(0.6)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_sensitivity_cache_hit_does_no_evaluation(tiny, tiny_ws, tmp_path):
    ws, ev = tiny_ws, tiny.evaluator()
    cache = tmp_path / "cache"
    first = run_sensitivity(ws, ev, limit=8, by="node", progress=False, cache=cache)
    assert len(list(cache.glob("sensitivity-*.json"))) == 1
    calls = ev.calls
    again = run_sensitivity(ws, ev, limit=8, by="node", progress=False, cache=cache)
    assert ev.calls == calls, "the cached result was re-evaluated"
    pd.testing.assert_frame_equal(again.table, first.table)
    assert (again.int8_metric, again.fp32_metric, again.metric_name, again.n_samples) == \
           (first.int8_metric, first.fp32_metric, first.metric_name, first.n_samples)
    run_sensitivity(ws, ev, limit=4, by="node", progress=False, cache=cache)  # other samples: another result
    assert len(list(cache.glob("sensitivity-*.json"))) == 2


def test_summary_lines(tiny, tiny_ws, tmp_path):
    res = run_sensitivity(tiny_ws, tiny.evaluator(), limit=16, by="node", progress=False, cache=tmp_path / "c")
    head, *lines = summary(res, 10).splitlines()
    assert head.startswith(f"Sensitive summary (neg_mse; FP32 {res.fp32_metric:.4f}, all-INT8 {res.int8_metric:.4f} on 16 samples")
    assert lines[3:] == res.notes[1:] and "leave-one-out gains are distinguishable" in lines[3]  # resolution notes
    lines = lines[:3]
    by_group = res.table.set_index("group")
    for i, line in enumerate(lines):
        m = TOP_LINE.match(line)
        assert m, line
        g = res.ranked_groups[i]
        assert int(m.group(1)) == i and m.group(2) == g
        assert m.group(3) == f"{by_group.loc[g, 'metric']:.4f}" and m.group(4) == f"{by_group.loc[g, 'delta']:+.4f}"
    assert len(summary(res, 1).splitlines()) == 2 + len(res.notes) - 1
    paths = write_report(res, tmp_path / "rep")
    assert sorted(p.name for p in paths.values()) == ["sensitivity.csv", "sensitivity.md", "sensitivity.png"]
    md = (tmp_path / "rep" / "sensitivity.md").read_text()
    assert "Spearman" in md and "scored by" in md


def test_cli_sensitivity_writes_reports(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sensitivity", *tiny.model_args(), "--data", str(tiny.data), "--task", tiny.task, "--limit", "8",
            "--unit", "node", "-o", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("sensitivity.csv", "sensitivity.md", "sensitivity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert f"{out / name}" in printed
    assert (out / "sensitivity.png").read_bytes()[:8] == PNG_SIGNATURE
    csv = pd.read_csv(out / "sensitivity.csv")
    assert sorted(csv["group"]) == ["conv1", "conv2", "relu"] and list(csv["rank"]) == [0, 1, 2]
    assert list(csv["delta"]) == sorted(csv["delta"], reverse=True)
    top = [line for line in printed.splitlines() if TOP_LINE.match(line)]
    assert len(top) == 3 and TOP_LINE.match(top[0]).group(2) == csv["group"][0]
    # the CSV's delta column is metric - all-INT8 (all-INT8 from the evaluator on the same 8 samples)
    cfg = build_config(model=str(tiny.model), calib=[str(tiny.calib)], mean=[0.0] * 3, std=[255.0] * 3, color="rgb")
    int8 = tiny.evaluator().evaluate(prepare(cfg, progress=False).build(), limit=8).value
    assert np.allclose(csv["delta"], csv["metric"] - int8, rtol=0, atol=1e-12)
    assert main(args) == 0  # rerun: from the cache in <out>/cache, same table
    pd.testing.assert_frame_equal(pd.read_csv(out / "sensitivity.csv"), csv)


def test_report_states_the_proxy_agreement_of_its_own_table(tiny, tmp_path):
    """Issue 8 item 14: the ρ printed in sensitivity.md is Spearman's ρ of the CSV's proxy_snr vs delta columns,
    recomputed here with pandas (average ranks), not through sensq.sensitivity.spearman."""
    out = tmp_path / "out"
    assert main(["sensitivity", *tiny.model_args(), "--data", str(tiny.data), "--task", tiny.task, "--limit", "8",
                 "--unit", "node", "-o", str(out), "-q"]) == 0
    csv = pd.read_csv(out / "sensitivity.csv")
    scored = csv[csv["scored_by"] == "metric"]
    assert len(scored) == 3
    expected = scored["proxy_snr"].rank().corr(scored["delta"].rank())
    printed = re.search(r"Spearman's ρ .* = \*\*(-?\d+\.\d\d)\*\*", (out / "sensitivity.md").read_text())
    assert printed, "no proxy agreement line in sensitivity.md"
    assert float(printed.group(1)) == pytest.approx(round(expected, 2), abs=0.005)


def test_leave_one_out_gains_carry_paired_intervals_and_the_report_says_which_are_resolvable(tiny, tiny_ws, tmp_path):
    """Each metric-scored group's gain over all-INT8 has the paired BCa interval a brute-force recomputation gives;
    `distinguishable` is exactly 'the interval excludes 0'; the summary states how many are."""
    from sensq.evaluators.samples import PairedBootstrap
    from sensq.evaluators.scoring import model_hash
    from sensq.sensitivity import SENSITIVITY_BOOT

    ws, ev = tiny_ws, tiny.evaluator()
    res = run_sensitivity(ws, ev, limit=12, by="node", progress=False, cache=None, budget_seconds=None)
    idx = np.arange(12)
    boot = PairedBootstrap(idx, SENSITIVITY_BOOT, 0)
    int8 = ev.evaluate(ws.build(), indices=list(idx)).samples
    groups = quantizable_groups(ws, by="node")
    for _, row in res.table.iterrows():
        mine = ev.evaluate(ws.build(ws.base_plan.with_float(groups[row["group"]])), indices=list(idx)).samples
        d = boot.difference(mine, int8)
        assert (row["delta_lo"], row["delta_hi"]) == pytest.approx((d.lo, d.hi))
        assert row["distinguishable"] == (d.lo > 0 or d.hi < 0)
    text = summary(res)
    n_clear = int(res.table["distinguishable"].sum())
    assert f"{n_clear} of {len(res.table)} leave-one-out gains are distinguishable from 0" in text
