"""Export of search trials: the .q.onnx scores exactly what the study recorded, the xquant config rebuilds the same
bytes through `sensq quantize --config`, the ORT exclude list is the plan's float nodes, and user errors are clear."""
from __future__ import annotations

import json
import re

import onnx
import optuna
import pytest

from sensq.cli import main
from sensq.config import config_from_dict
from sensq.errors import SensqError
from sensq.export import export_trial
from sensq.plan import PrecisionPlan
from sensq.quantize import prepare
from sensq.search import run_search
from sensq.sensitivity import quantizable_groups

from test_search import load_study, make_tiny, restore_sensq_logger, tiny_settings  # noqa: F401 (autouse)

COMPLETE = (optuna.trial.TrialState.COMPLETE,)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A budget-8 search on the tiny setup: (tiny, workdir, study, workspace, evaluator)."""
    root = tmp_path_factory.mktemp("export")
    tiny = make_tiny(root / "tiny")
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = root / "run"
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    study = load_study(workdir)
    complete = study.get_trials(states=COMPLETE)
    # the exactness checks below must cover a trial with float groups (the seeded top-1 trial)
    assert study.trials[1].user_attrs["label"] == "seed: top-1 float"
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE and study.trials[1].user_attrs["float_groups"]
    assert len(complete) >= 3
    return tiny, workdir, study, ws, ev


def _complete_numbers(study) -> list[int]:
    return [t.number for t in study.get_trials(states=COMPLETE)]


def test_onnx_export_scores_exactly_the_recorded_metric(searched, tmp_path):
    _, workdir, study, ws, ev = searched
    numbers = _complete_numbers(study)
    for n in numbers:
        out = tmp_path / f"trial{n}.q.onnx"
        info = export_trial(workdir, n, out, "onnx", progress=False)
        t = study.trials[n]
        assert info["trial"] == n and info["metric"] == t.values[0] and info["latency_ms"] == t.values[1]
        assert out.is_file()
        # scored by the same evaluator from the file: exactly the study's value (not approximately)
        assert ev.evaluate(str(out), progress=False).value == t.values[0], f"trial {n}"
        # and it is the very model the trial built from its plan
        plan = PrecisionPlan.from_dict(t.user_attrs["plan"])
        assert onnx.load(str(out)).SerializeToString() == ws.build(plan).SerializeToString()
    exported_float = [n for n in numbers if study.trials[n].user_attrs["float_groups"]]
    assert 1 in exported_float


def test_xquant_config_rebuilds_byte_identical_model(searched, tmp_path):
    _, workdir, study, _, _ = searched
    numbers = _complete_numbers(study)
    assert 1 in numbers
    for n in numbers:
        q_path = tmp_path / f"trial{n}.q.onnx"
        cfg_path = tmp_path / f"trial{n}.xquant.json"
        export_trial(workdir, n, q_path, "onnx", progress=False)
        export_trial(workdir, n, cfg_path, "xquant", progress=False)
        d = json.loads(cfg_path.read_text())
        plan = PrecisionPlan.from_dict(study.trials[n].user_attrs["plan"])
        qp = d["quantization_parameters"]
        assert d["calibration_parameters"]["calibration_type"] == plan.method
        assert qp["per_channel"] == plan.per_channel and qp["overflow_fix"] == plan.overflow_fix
        listed = sorted(x for cs in qp["custom_setting"] if cs.get("precision_level", 0) >= 2 for x in cs["node_names"])
        assert listed == plan.float_nodes
        rebuilt = tmp_path / f"trial{n}.rebuilt.q.onnx"
        assert main(["quantize", "--config", str(cfg_path), "-o", str(rebuilt), "--no-analysis", "-q"]) == 0
        assert onnx.load(str(rebuilt)).SerializeToString() == onnx.load(str(q_path)).SerializeToString(), f"trial {n}"


def test_ort_exclude_lists_exactly_the_plan_float_nodes(searched, tmp_path):
    _, workdir, study, ws, _ = searched
    info = json.loads((workdir / "search.json").read_text())
    groups = quantizable_groups(ws)
    for n in _complete_numbers(study):
        out = tmp_path / f"t{n}.json"
        export_trial(workdir, n, out, "ort-exclude", progress=False)
        d = json.loads(out.read_text())
        t = study.trials[n]
        assert d["nodes_to_exclude"] == PrecisionPlan.from_dict(t.user_attrs["plan"]).float_nodes
        assert d["nodes_to_exclude"] == sorted(x for g in t.user_attrs["float_groups"] for x in groups[g])
        assert d["per_channel"] == t.user_attrs["per_channel"]
    d = json.loads((tmp_path / "t1.json").read_text())
    assert d["nodes_to_exclude"] == groups[info["ranked_groups"][0]]


def test_unknown_or_pruned_trial_is_a_user_error_naming_valid_trials(searched, tmp_path):
    _, workdir, study, _, _ = searched
    numbers = _complete_numbers(study)
    with pytest.raises(SensqError) as e:
        export_trial(workdir, 999, tmp_path / "x.q.onnx", "onnx", progress=False)
    assert "trial 999" in e.value.problem
    assert f"choose one of {numbers}" in e.value.fix
    pruned = [t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if pruned:
        with pytest.raises(SensqError, match=f"trial {pruned[0]} is not a finished"):
            export_trial(workdir, pruned[0], tmp_path / "x.q.onnx", "onnx", progress=False)
    with pytest.raises(SensqError, match="unknown export format"):
        export_trial(workdir, numbers[0], tmp_path / "x", "tflite", progress=False)
    with pytest.raises(SensqError, match="search.json missing"):
        export_trial(tmp_path / "nowhere", 0, tmp_path / "x.q.onnx", "onnx", progress=False)
    assert not (tmp_path / "x.q.onnx").exists()


def test_cli_export_without_trial_picks_the_best_front_trial(searched, tmp_path, capsys):
    _, workdir, study, ws, _ = searched
    out = tmp_path / "best.q.onnx"
    assert main(["export", "--workdir", str(workdir), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"\(trial (\d+): metric (-?\d+\.\d{4}),", printed)
    assert m, printed
    n = int(m.group(1))
    front = [r for r in json.loads((workdir / "pareto.json").read_text())["front"] if r["trial"] >= 0]
    assert n in [r["trial"] for r in front]
    assert study.trials[n].values[0] == max(r["metric"] for r in front)
    assert m.group(2) == f"{study.trials[n].values[0]:.4f}"
    plan = PrecisionPlan.from_dict(study.trials[n].user_attrs["plan"])
    assert onnx.load(str(out)).SerializeToString() == ws.build(plan).SerializeToString()
    # unknown trial through the CLI: exit code 2 and the valid numbers
    assert main(["export", "--workdir", str(workdir), "--trial", "999", "-o", str(tmp_path / "y.q.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sensq: error: trial 999") and str(_complete_numbers(study)) in err


def test_export_after_data_free_search(tmp_path):
    """A data-free search stores its config in search.json; export must rebuild the trial from it."""
    tiny = make_tiny(tmp_path / "tiny")
    cfg = config_from_dict({"model_parameters": {"onnx_model": str(tiny.model)},
                            "calibration_parameters": {"data_free": True, "seed": 3},
                            "quantization_parameters": {"analysis_enable": False}})
    ws, ev = prepare(cfg, progress=False), tiny.evaluator()
    workdir = tmp_path / "run"
    run_search(ws, ev, tiny_settings(workdir, 2), progress=False)
    study = load_study(workdir)
    out = tmp_path / "t0.q.onnx"
    export_trial(workdir, 0, out, "onnx", progress=False)
    assert ev.evaluate(str(out)).value == study.trials[0].values[0]
    assert onnx.load(str(out)).SerializeToString() == ws.build().SerializeToString()
