"""Export of search trials: the .q.onnx scores exactly what the search recorded, the xquant config rebuilds the same
bytes through `sensq quantize --config`, the ORT settings list the plan's float nodes, the default trial is the
reports' recommendation (never Optuna's best_trials), a changed calibration set is refused, and user errors are
clear. (The exporters against their consumers: tests/test_exporters.py.)"""
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

from search_helpers import load_study, make_tiny, study_records, tiny_settings
from tiny_models import write_pngs


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A budget-8 search on the tiny setup: (tiny, workdir, full trial records by number, workspace, evaluator)."""
    root = tmp_path_factory.mktemp("export")
    tiny = make_tiny(root / "tiny")
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = root / "run"
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    full = {r.number: r for r in study_records(workdir) if r.full}  # scored on the whole search split
    # the exactness checks below must cover a trial with float groups
    assert any(r.float_groups for r in full.values()) and len(full) >= 3
    return tiny, workdir, full, ws, ev


def _all_int8(workdir):
    return next(r for r in study_records(workdir) if r.label == "all-INT8" and r.full)


def _search_split(workdir) -> list[int]:
    return json.loads((workdir / "search.json").read_text())["split"]["search"]


def test_onnx_export_scores_exactly_the_recorded_metric(searched, tmp_path):
    _, workdir, full, ws, ev = searched
    front = {r["trial"]: r for r in json.loads((workdir / "pareto.json").read_text())["front"]}
    for n, rec in full.items():
        out = tmp_path / f"trial{n}.q.onnx"
        info = export_trial(workdir, n, out, "onnx", progress=False)
        assert info["trial"] == n and out.is_file()
        # the score the export claims is what the evaluator gives the written file on the search split, exactly
        assert info["metric"] == ev.evaluate(str(out), progress=False, indices=_search_split(workdir)).value, f"trial {n}"
        if n in front:  # and what the search's own report lists for it
            assert front[n]["metric"] == info["metric"] and front[n]["plan"] == rec.plan
        assert f"trial {n}: reproduces" in info["summary"] and f"{info['metric']:.4f}" in info["summary"]
        # and it is the very model the trial built from its plan
        assert onnx.load(str(out)).SerializeToString() == ws.build(PrecisionPlan.from_dict(rec.plan)).SerializeToString()


def test_xquant_config_rebuilds_byte_identical_model(searched, tmp_path):
    _, workdir, full, _, _ = searched
    for n in full:
        q_path = tmp_path / f"trial{n}.q.onnx"
        cfg_path = tmp_path / f"trial{n}.xquant.json"
        export_trial(workdir, n, q_path, "onnx", progress=False)
        export_trial(workdir, n, cfg_path, "xquant", progress=False)
        d = json.loads(cfg_path.read_text())
        plan = PrecisionPlan.from_dict(full[n].plan)
        qp = d["quantization_parameters"]
        assert d["calibration_parameters"]["calibration_type"] == plan.method
        assert qp["per_channel"] == plan.per_channel and qp["overflow_fix"] == plan.overflow_fix
        listed = sorted(x for cs in qp["custom_setting"] if cs.get("precision_level", 0) >= 2 for x in cs["node_names"])
        assert listed == plan.float_nodes
        rebuilt = tmp_path / f"trial{n}.rebuilt.q.onnx"
        assert main(["quantize", "--config", str(cfg_path), "-o", str(rebuilt), "--no-analysis", "-q"]) == 0
        assert onnx.load(str(rebuilt)).SerializeToString() == onnx.load(str(q_path)).SerializeToString(), f"trial {n}"


def test_ort_exclude_lists_exactly_the_plan_float_nodes(searched, tmp_path):
    """(quantize_static rebuilding the model from these settings: tests/test_exporters.py)"""
    _, workdir, full, ws, _ = searched
    groups = json.loads((workdir / "search.json").read_text())["groups"]
    for n, rec in full.items():
        out = tmp_path / f"t{n}.ort_exclude.json"
        written = export_trial(workdir, n, out, "ort-exclude", progress=False)
        s = json.loads(out.read_text())["quantize_static"]
        assert s["nodes_to_exclude"] == sorted(set(ws.base_plan.float_nodes) | {x for g in rec.float_groups for x in groups[g]})
        assert s["per_channel"] == rec.plan["per_channel"]
        assert s["activation_type"] == "QUInt8" and s["weight_type"] == "QInt8"  # ort-cpu, in ORT's QuantType names
        assert (tmp_path / s["model_input"]).is_file() and (tmp_path / s["model_input"]) in written["files"]
        assert "onnxruntime" in written["consumer"]


def test_unknown_or_pruned_trial_is_a_user_error_naming_valid_trials(searched, tmp_path):
    _, workdir, full, _, _ = searched
    numbers = sorted(full)
    with pytest.raises(SensqError) as e:
        export_trial(workdir, 999, tmp_path / "x.q.onnx", "onnx", progress=False)
    assert "trial 999" in e.value.problem
    assert f"choose one of {numbers}" in e.value.fix
    study = load_study(workdir)
    pruned = [r.number for r in study_records(workdir) if not r.full]
    if not pruned:  # the tiny search need not stop a trial early: record one as the search does
        rec = full[numbers[0]]
        study.add_trial(optuna.trial.create_trial(values=[0.0, 0.0], user_attrs={"sensq": json.dumps(
            {**rec.__dict__, "number": len(study.trials), "pruned": {"by": rec.number, "diff": -1.0}})}))
        pruned = [len(study.trials) - 1]
    with pytest.raises(SensqError, match=f"trial {pruned[0]} is not a finished trial"):
        export_trial(workdir, pruned[0], tmp_path / "x.q.onnx", "onnx", progress=False)
    with pytest.raises(SensqError, match="unknown export format"):
        export_trial(workdir, numbers[0], tmp_path / "x", "tflite", progress=False)
    with pytest.raises(SensqError, match="search.json missing"):
        export_trial(tmp_path / "nowhere", 0, tmp_path / "x.q.onnx", "onnx", progress=False)
    assert not (tmp_path / "x.q.onnx").exists()


def _expected_default(doc: dict) -> int:
    """The rule, brute force: the search's recommendation, else the front row with the best metric (then faster)."""
    if doc.get("recommended_trial") is not None:
        return int(doc["recommended_trial"])
    rows = [r for r in doc["front"] if r["trial"] >= 0]
    best = max(r["metric"] for r in rows)
    return min((r for r in rows if r["metric"] == best), key=lambda r: (r["ratio"], r["trial"]))["trial"]


def test_cli_export_without_trial_picks_the_reports_trial(searched, tmp_path, capsys):
    _, workdir, full, ws, _ = searched
    out = tmp_path / "best.q.onnx"
    assert main(["export", "--workdir", str(workdir), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"\(trial (\d+)", printed)
    assert m, printed
    n = int(m.group(1))
    assert n == _expected_default(json.loads((workdir / "pareto.json").read_text()))
    assert onnx.load(str(out)).SerializeToString() == ws.build(PrecisionPlan.from_dict(full[n].plan)).SerializeToString()
    # unknown trial through the CLI: exit code 2 and the valid numbers
    assert main(["export", "--workdir", str(workdir), "--trial", "999", "-o", str(tmp_path / "y.q.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sensq: error: trial 999") and str(sorted(full)) in err


def test_default_trial_follows_pareto_json_never_optuna_best_trials(searched, tmp_path, monkeypatch):
    _, workdir, full, _, _ = searched

    def no_best_trials(self):
        raise AssertionError("export must not use Optuna's best_trials (constrained: another front than the reports')")

    monkeypatch.setattr(optuna.study.Study, "best_trials", property(no_best_trials))
    pareto = workdir / "pareto.json"
    original = pareto.read_text()
    doc = json.loads(original)
    doc.pop("recommended_trial", None)
    try:
        pareto.write_text(json.dumps(doc))
        got = export_trial(workdir, None, tmp_path / "a.float_nodes.json", "json", progress=False)
        assert got["trial"] == _expected_default(doc) and got["picked"] == "best metric on the front"
        # the search's recommendation wins, whatever its metric; its held-out score is named in the summary
        other = max(n for n in full if n != got["trial"])
        doc["recommended_trial"] = other
        doc["front"] = [r for r in doc["front"] if r["trial"] != other] + [
            {"trial": other, "metric": full[other].metric, "ratio": full[other].ratio, "confirm_metric": 0.123456}]
        pareto.write_text(json.dumps(doc))
        got = export_trial(workdir, None, tmp_path / "b.float_nodes.json", "json", progress=False)
        assert got["trial"] == other and got["picked"] == "recommended by the search"
        assert got["confirm_metric"] == 0.123456 and "0.1235 on the held-out split" in got["summary"]
        written = json.loads((tmp_path / "b.float_nodes.json").read_text())
        assert written["float_nodes"] == full[other].plan["float_nodes"]
        # a front with only the FP32 reference, and no pareto.json at all: clear errors
        pareto.write_text(json.dumps({"front": [{"trial": -1, "metric": 1.0, "ratio": 1.0}]}))
        with pytest.raises(SensqError, match="front holds no trial"):
            export_trial(workdir, None, tmp_path / "c.q.onnx", "onnx", progress=False)
        pareto.unlink()
        with pytest.raises(SensqError, match="no pareto.json"):
            export_trial(workdir, None, tmp_path / "c.q.onnx", "onnx", progress=False)
        assert not (tmp_path / "c.q.onnx").exists()
    finally:
        pareto.write_text(original)


def test_export_refuses_when_the_calibration_statistics_changed(tmp_path, capsys):
    """A calibration image replaced after the search: the rebuilt statistics differ, so export refuses (exit 2)."""
    tiny = make_tiny(tmp_path / "tiny")
    ws = tiny.workspace()
    workdir = tmp_path / "run"
    run_search(ws, tiny.evaluator(), tiny_settings(workdir, 2), progress=False)
    search_json = workdir / "search.json"
    info = json.loads(search_json.read_text())
    info.setdefault("stats_key", ws.stats.key)  # as the search records it
    search_json.write_text(json.dumps(info))
    assert info["stats_key"] == ws.stats.key
    n = _all_int8(workdir).number
    export_trial(workdir, n, tmp_path / "ok.q.onnx", "onnx", progress=False)
    assert (tmp_path / "ok.q.onnx").is_file()
    replacement = write_pngs(tmp_path / "other", n=1, seed=99)[0]
    first = sorted(tiny.calib.iterdir())[0]
    first.write_bytes(replacement.read_bytes())
    for fmt in ("onnx", "ort-exclude", "nncf", "trtexec", "xquant"):
        out = tmp_path / f"changed.{fmt}"
        with pytest.raises(SensqError, match="calibration statistics differ"):
            export_trial(workdir, n, out, fmt, progress=False)
        assert not out.exists()
    assert main(["export", "--workdir", str(workdir), "--trial", str(n), "-o", str(tmp_path / "x.q.onnx"), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sensq: error: the calibration statistics differ")


def test_export_after_data_free_search(tmp_path):
    """A data-free search stores its config in search.json; export must rebuild the trial from it."""
    tiny = make_tiny(tmp_path / "tiny")
    cfg = config_from_dict({"model_parameters": {"onnx_model": str(tiny.model)},
                            "calibration_parameters": {"data_free": True, "seed": 3},
                            "quantization_parameters": {"analysis_enable": False}})
    ws, ev = prepare(cfg, progress=False), tiny.evaluator()
    workdir = tmp_path / "run"
    run_search(ws, ev, tiny_settings(workdir, 2), progress=False)
    rec = _all_int8(workdir)
    out = tmp_path / "int8.q.onnx"
    export_trial(workdir, rec.number, out, "onnx", progress=False)
    assert ev.evaluate(str(out), indices=_search_split(workdir)).value == rec.metric
    assert onnx.load(str(out)).SerializeToString() == ws.build().SerializeToString()


def test_export_refuses_a_rebuild_that_differs_from_the_scored_model(searched, tmp_path, monkeypatch, capsys):
    """Issue 18.5: the rebuilt model's hash is compared with the trial's model_hash (a plan whose overflow_fix
    resolves through this machine's VNNI check can rebuild differently elsewhere); --force writes it anyway."""
    from sensq.quantize import Workspace

    _, workdir, full, _, _ = searched
    n = _all_int8(workdir).number
    build = Workspace.build

    def other_machine(self, plan=None):
        m = build(self, plan)
        m.doc_string = "rebuilt elsewhere"  # any byte of difference
        return m

    monkeypatch.setattr(Workspace, "build", other_machine)
    for fmt in ("onnx", "ort-exclude"):
        out = tmp_path / f"t.{fmt}"
        with pytest.raises(SensqError, match="differs from the model trial .* scored.*--force"):
            export_trial(workdir, n, out, fmt, progress=False)
        assert not out.exists()
    assert main(["export", "--workdir", str(workdir), "--trial", str(n), "-o", str(tmp_path / "x.q.onnx"), "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["export", "--workdir", str(workdir), "--trial", str(n), "-o", str(tmp_path / "x.q.onnx"), "-q",
                 "--force"]) == 0
    assert (tmp_path / "x.q.onnx").is_file()
