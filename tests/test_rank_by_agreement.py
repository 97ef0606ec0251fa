"""--rank-by agreement: trials scored label-free on one set, the front confirmed on another (labeled) evaluator.

Independent reference: the labeled evaluator run by hand on FP32 and on each front plan's model, outside the search;
the report's held-out columns must be those numbers (means over all its samples and their differences)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sensq.evaluators.plugins import make_plugin_evaluator
from sensq.plan import PrecisionPlan
from sensq.search import run_search

from search_helpers import make_tiny, tiny_settings


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    labeled_dir = tiny.root / "labeled"
    labeled_dir.mkdir()
    np.save(labeled_dir / "inputs.npy", np.random.default_rng(11).uniform(0, 1, (12, 1, 3, 8, 8)).astype(np.float32))
    labeled = make_plugin_evaluator(tiny.task, str(labeled_dir), model=str(tiny.model))
    ws = tiny.workspace()
    workdir = tmp_path_factory.mktemp("rank") / "run"
    res = run_search(ws, tiny.evaluator(), tiny_settings(workdir, 5, confirm="auto"), progress=False,
                     confirm_evaluator=labeled)
    return tiny, ws, labeled, workdir, res


def test_the_front_is_confirmed_on_every_sample_of_the_labeled_evaluator(ranked):
    tiny, ws, labeled, workdir, res = ranked
    split = json.loads((workdir / "search.json").read_text())["split"]
    assert split["confirm"] == [] and len(split["search"]) == 16  # all ranking samples rank; none held out there
    assert res.summary["confirm_samples"] == 12 and res.summary["confirm_metric_name"] == "neg_mse"
    fp32 = labeled.evaluate(str(tiny.model), progress=False).metrics["neg_mse"]
    points = [r for r in res.front if r["trial"] >= 0]
    assert points
    for r in points:
        mine = labeled.evaluate(ws.build(PrecisionPlan.from_dict(r["plan"])), progress=False).metrics["neg_mse"]
        assert r["confirm_metric"] == pytest.approx(mine, rel=1e-9, abs=1e-12)
        assert r["confirm_d_fp32"] == pytest.approx(mine - fp32, rel=1e-9, abs=1e-12)
        assert r["confirm_d_fp32_lo"] <= r["confirm_d_fp32"] <= r["confirm_d_fp32_hi"]
        assert "optimism" not in r  # two different metrics: their difference means nothing


def test_the_recommendation_follows_the_labeled_metric(ranked):
    *_, workdir, res = ranked
    assert "labeled samples" in res.summary["recommendation_rule"]
    ok = [r for r in res.front if r["trial"] >= 0 and r["confirm_d_fp32"] >= -res.summary["max_drop"]
          and r["ratio_hi"] < 1.0]
    expected = min(ok, key=lambda r: r["ratio"])["trial"] if ok else None
    assert res.summary["recommended_trial"] == expected
    assert "(labeled confirm)" in (workdir / "pareto.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--unlabeled", "somewhere"], "--unlabeled is read only with --rank-by agreement"),
    (["--rank-by", "agreement"], "--rank-by agreement needs images to rank plans on"),
])
def test_rank_by_agreement_misuse_is_one_line_exit_2(ranked, tmp_path, capfd, extra, message):
    from sensq.cli import main

    tiny = ranked[0]
    code = main(tiny.search_args(tmp_path / "w", 2, *extra))  # the CLI in this process: no interpreter start-up
    err = capfd.readouterr().err
    assert code == 2, err[-500:]
    assert message in err and "Traceback" not in err
