"""Mixed-precision search: budget, seeded trials, Pareto outputs, resume (also after SIGKILL), determinism, storage.

Most tests run on a tiny conv->relu->conv model with a plugin evaluator (metric = -MSE of the output against the
float model on 16 fixed random inputs) and the deterministic `bops` latency, so a search takes seconds. One test
runs a short search on yolov5n with a COCO evaluator capped at a few images.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest

from sensq.config import QuantizeConfig, config_from_dict
from sensq.errors import SensqError
from sensq.evaluators.plugins import make_plugin_evaluator
from sensq.quantize import prepare
from sensq.search import SearchSettings, run_search
from sensq.sensitivity import quantizable_groups

from tiny_models import conv_relu_conv, write_pngs

REPO = Path(__file__).resolve().parents[1]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SEED_LABELS = ["all-INT8", "seed: top-1 float", "seed: top-2 float", "seed: top-3 float"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A factory-form evaluator plugin (sensq.evaluators.plugins): metric = -mean squared error of the model output
# against the float model's output, on the first `limit` of 16 fixed inputs stored in <data>/inputs.npy.
# SENSQ_TEST_SLEEP makes every evaluate() slower (for the kill test); calls are counted in `calls`.
PLUGIN_SOURCE = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    import numpy as np

    from sensq.evaluators.base import EvalResult
    from sensq.runtime import make_session


    class TinyMSE:
        name = "tiny-mse"
        primary = "neg_mse"

        def __init__(self, data, model, sleep=0.0):
            self.inputs = np.load(Path(data) / "inputs.npy")
            self.sleep = sleep
            self.calls = 0
            sess = make_session(str(model))
            self.input_name = sess.get_inputs()[0].name
            self.reference = [sess.run(None, {self.input_name: x})[0].astype(np.float64) for x in self.inputs]

        def __len__(self):
            return len(self.inputs)

        def signature(self):
            return f"tiny-mse:{len(self.inputs)}"

        def evaluate(self, model, limit=None, progress=True):
            self.calls += 1
            t0 = time.perf_counter()
            n = len(self) if limit is None else min(int(limit), len(self))
            sess = make_session(model)
            err = 0.0
            for x, f in zip(self.inputs[:n], self.reference[:n]):
                q = sess.run(None, {self.input_name: x})[0].astype(np.float64)
                err += float(np.mean((q - f) ** 2))
            if self.sleep:
                time.sleep(self.sleep)
            return EvalResult({"neg_mse": -err / n}, "neg_mse", n, time.perf_counter() - t0)


    def make(data, model=None):
        return TinyMSE(data, model, float(os.environ.get("SENSQ_TEST_SLEEP", "0")))
''')


@dataclass
class Tiny:
    """Files of the tiny setup: model, 4 calibration PNGs, evaluation inputs and the evaluator plugin."""

    root: Path
    model: Path
    calib: Path
    data: Path
    plugin: Path

    @property
    def task(self) -> str:
        return f"{self.plugin}:make"

    def config(self, **calib_extra) -> QuantizeConfig:
        return config_from_dict({
            "model_parameters": {"onnx_model": str(self.model)},
            "calibration_parameters": {"calibration_step": 4, "input_parametres": [
                {"mean_value": [0.0] * 3, "std_value": [255.0] * 3, "color_format": "rgb",
                 "data_list_path": str(self.calib), **calib_extra}]},
            "quantization_parameters": {"analysis_enable": False},
        })

    def workspace(self):
        return prepare(self.config(), progress=False)

    def evaluator(self):
        return make_plugin_evaluator(self.task, str(self.data), model=str(self.model))

    def model_args(self) -> list[str]:
        """CLI arguments for the model, its calibration data and preprocessing (pixels / 255, RGB)."""
        return ["-m", str(self.model), "--calib", str(self.calib), "--mean", "0", "0", "0",
                "--std", "255", "255", "255", "--color", "rgb"]

    def search_args(self, workdir: Path, budget: int, *extra: str) -> list[str]:
        return ["search", *self.model_args(), "--data", str(self.data), "--task", self.task, "--latency", "bops",
                "--budget", str(budget), "--workdir", str(workdir), "--low-fidelity", "8",
                "--sensitivity-limit", "16", "-q", *extra]


def make_tiny(root: Path) -> Tiny:
    root.mkdir(parents=True, exist_ok=True)
    model = conv_relu_conv(root / "m.onnx")
    write_pngs(root / "calib", n=4)
    data = root / "data"
    data.mkdir(exist_ok=True)
    np.save(data / "inputs.npy", np.random.default_rng(7).uniform(0, 1, (16, 1, 3, 8, 8)).astype(np.float32))
    plugin = root / "tiny_eval.py"
    plugin.write_text(PLUGIN_SOURCE)
    return Tiny(root, model, root / "calib", data, plugin)


def tiny_settings(workdir: Path, budget: int, **kw) -> SearchSettings:
    return SearchSettings(budget=budget, workdir=str(workdir), latency="bops", low_fidelity=8, sensitivity_limit=16,
                          seed=0, **kw)


def load_study(workdir: Path) -> optuna.Study:
    info = json.loads((Path(workdir) / "search.json").read_text())
    return optuna.load_study(study_name=info["study_name"], storage=info["storage"])


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(metric, latency): a dominates b (maximize metric, minimize latency)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def check_pareto_json(workdir: Path, study: optuna.Study, require_fp32: bool = True) -> list[int]:
    """pareto.json against a brute-force front of the study's COMPLETE trials plus the FP32 reference.

    The FP32 reference is the row with trial -1 and label "FP32" (and/or an entry of "references"); with
    require_fp32 it must be in the file. Returns the trial numbers (>= 0) on the front."""
    doc = json.loads((workdir / "pareto.json").read_text())
    info = json.loads((workdir / "search.json").read_text())
    fp32 = info["fp32"]
    assert doc["metric_goal"] == "maximize" and doc["latency_goal"] == "minimize"
    complete = {t.number: tuple(t.values) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    points = {**complete, -1: (fp32["metric"], fp32["latency_ms"])}
    front = {int(r["trial"]): (r["metric"], r["latency_ms"]) for r in doc["front"]}
    assert front, "empty front"
    for n, v in front.items():
        assert n in points, f"front trial {n} is not a COMPLETE trial"
        assert v == points[n], f"front values of trial {n} differ from the study's"
        assert not any(dominates(o, v) for o in points.values()), f"front trial {n} is dominated"
    # Every non-dominated point is on the front (exact duplicates: only the lowest trial number).
    expected = set()
    for n, v in sorted(points.items()):
        if not any(dominates(o, v) for o in points.values()) and not any(points[m] == v for m in expected):
            expected.add(n)
    assert set(front) == expected
    references = doc.get("references") or {}
    if "FP32" in references:
        assert references["FP32"] == {"metric": fp32["metric"], "latency": fp32["latency_ms"]}
    if -1 in front:
        assert next(r for r in doc["front"] if r["trial"] == -1)["label"] == "FP32"
    if require_fp32:
        assert -1 in front or "FP32" in references, "pareto.json does not include the FP32 reference"
    return sorted(n for n in front if n >= 0)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def restore_sensq_logger():
    """cli.main() binds the sensq logger to the (captured) stderr of the moment; undo that after each test."""
    import logging

    logger = logging.getLogger("sensq")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.level, logger.propagate = saved[1], saved[2]


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


# ------------------------------------------------------------------------------------------------ mechanics
def test_budget_counts_finished_trials_and_seeds_come_first(tiny_run):
    workdir, result, ws, _ = tiny_run
    study = load_study(workdir)
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == 10
    assert len(study.trials) == 10  # nothing left RUNNING/WAITING/FAIL
    assert len(result.trials) == 10
    assert result.pruned == sum(t.state == optuna.trial.TrialState.PRUNED for t in finished)

    info = json.loads((workdir / "search.json").read_text())
    ranked = info["ranked_groups"]
    assert sorted(ranked) == sorted(quantizable_groups(ws)) == ["conv1", "conv2", "relu"]
    # sensitivity ranks groups by metric, best (most sensitive to quantize) first
    sens = dict(zip(result.sensitivity.table["group"], result.sensitivity.table["metric"]))
    assert [sens[g] for g in ranked] == sorted(sens.values(), reverse=True)

    for n, label in enumerate(SEED_LABELS):
        t = study.trials[n]
        assert t.user_attrs["label"] == label
        assert t.user_attrs["float_groups"] == ranked[:n]
        assert {g: t.params[f"float:{g}"] for g in ranked} == {g: 0.0 if g in ranked[:n] else 1.0 for g in ranked}
        assert t.params["method"] == ws.base_plan.method
    assert all("label" not in t.user_attrs for t in study.trials[len(SEED_LABELS):])
    labels = [t.user_attrs.get("label") for t in study.trials]
    assert all(labels.count(lab) == 1 for lab in SEED_LABELS)
    # the seeded top-1 trial really keeps the top group's nodes float
    plan_nodes = study.trials[1].user_attrs["plan"]["float_nodes"]
    assert plan_nodes == sorted(quantizable_groups(ws)[ranked[0]])


def test_pareto_outputs_and_front_files(tiny_run):
    workdir, result, _, _ = tiny_run
    study = load_study(workdir)
    for ext in ("csv", "json", "md", "png"):
        f = workdir / f"pareto.{ext}"
        assert f.is_file() and f.stat().st_size > 0, f
    assert (workdir / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    front = check_pareto_json(workdir, study)
    assert front, "no trial on the front"
    # front/trial_N.json for exactly the front's trials, with the recorded values and plan
    assert sorted(p.name for p in (workdir / "front").glob("trial_*.json")) == sorted(f"trial_{n}.json" for n in front)
    for n in front:
        d = json.loads((workdir / "front" / f"trial_{n}.json").read_text())
        t = study.trials[n]
        assert d["trial"] == n and d["metric"] == t.values[0] and d["latency_ms"] == t.values[1]
        assert d["plan"] == t.user_attrs["plan"]
    md = (workdir / "pareto.md").read_text()
    for n in front:
        assert re.search(rf"^\| {n} \|", md, re.M), f"trial {n} missing from pareto.md"
    assert "FP32" in md
    assert sorted(int(x) for x in result.front["trial"] if x >= 0) == front


def test_resume_with_larger_budget_keeps_trials_and_does_not_reseed(tiny, tmp_path):
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path / "w"
    run_search(ws, ev, tiny_settings(workdir, 2), progress=False)
    study = load_study(workdir)
    before = {t.number: (t.state, t.values, t.params) for t in study.get_trials(states=FINISHED)}
    assert len(before) == 2
    # all four seeds were enqueued up front; the two not yet run wait in the study
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2
    calls = ev.calls
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    study = load_study(workdir)
    assert len(study.get_trials(states=FINISHED)) == 8
    assert len(study.trials) == 8
    assert {n: (t.state, t.values, t.params) for n, t in enumerate(study.trials) if n < 2} == before
    labels = [t.user_attrs.get("label") for t in study.trials]
    assert labels[:4] == SEED_LABELS
    assert [labels.count(lab) for lab in SEED_LABELS] == [1, 1, 1, 1], labels
    # the resumed run took sensitivity and the FP32 reference from the cache: only the 6 new trials were scored
    # (a low-fidelity and possibly a full evaluation each)
    assert 6 <= ev.calls - calls <= 12
    # the outputs describe the whole study, and front/ holds exactly the current front (no stale trial files)
    front = check_pareto_json(workdir, study)
    assert sorted(p.name for p in (workdir / "front").glob("trial_*.json")) == sorted(f"trial_{n}.json" for n in front)
    # a rerun with the budget already reached adds nothing
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    assert len(load_study(workdir).trials) == 8


def test_resumed_search_does_not_replay_sampled_trials(tiny, tmp_path):
    """A resumed study continues the search; its sampler must not start the seeded random stream again, which would
    re-run the configurations the interrupted run already sampled (the first run samples trials 4-5 here)."""
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path / "w"
    run_search(ws, ev, tiny_settings(workdir, 6), progress=False)
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    trials = load_study(workdir).trials
    assert len(trials) == 8
    assert trials[6].params != trials[4].params, "the resumed run replayed trial 4's configuration"
    assert trials[7].params != trials[5].params, "the resumed run replayed trial 5's configuration"


def _study_with(points: list[tuple[float, float]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for metric, latency in points:
        _add_trial(study, metric, latency)
    return study


def _add_trial(study: optuna.Study, metric: float, latency: float) -> None:
    study.add_trial(optuna.trial.create_trial(
        values=[metric, latency], params={}, distributions={},
        user_attrs={"plan": {"float_nodes": []}, "low_metric": metric, "float_groups": [], "label": ""}))


def _sens():
    import pandas as pd

    from sensq.sensitivity import SensitivityResult

    return SensitivityResult(pd.DataFrame({"group": ["g"], "metric": [0.5], "delta": [0.1], "output_snr": [0.0],
                                           "n_nodes": [1]}), "m", 0.4, 0.6, None, 0.0)


def test_front_dir_holds_only_current_front_trials(tmp_path):
    """write_outputs after more trials (what a resumed search does): a trial that left the front loses its file."""
    from sensq.search import write_outputs

    study = _study_with([(0.5, 2.0), (0.4, 1.0)])
    fp32 = {"metric": 0.6, "latency_ms": 4.0}
    write_outputs(study, tmp_path, fp32, _sens(), "m", 8, 16, {"low": [], "full": []})
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == ["trial_0.json", "trial_1.json"]
    _add_trial(study, 0.55, 1.5)  # trial 2 dominates trial 0
    write_outputs(study, tmp_path, fp32, _sens(), "m", 8, 16, {"low": [], "full": []})
    front = [r["trial"] for r in json.loads((tmp_path / "pareto.json").read_text())["front"] if r["trial"] >= 0]
    assert sorted(front) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == ["trial_1.json", "trial_2.json"]


def test_pareto_json_keeps_dominated_fp32(tmp_path):
    """FP32 is the reference of every search: pareto.json/.md name it even when a trial dominates it (INT8 models
    can score a little higher than FP32 on a subset, as yolov5n does on 4 COCO images)."""
    from sensq.search import write_outputs

    study = _study_with([(0.35, 1.0)])
    fp32 = {"metric": 0.3, "latency_ms": 4.0}
    write_outputs(study, tmp_path, fp32, _sens(), "m", 8, 16, {"low": [], "full": []})
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert [r["trial"] for r in doc["front"]] == [0]
    assert doc["references"].get("FP32") == {"metric": 0.3, "latency": 4.0}
    assert "FP32" in (tmp_path / "pareto.md").read_text()


def test_fp32_reference_follows_the_latency_backend(tiny, tmp_path):
    """The FP32 reference is cached in the workdir; a rerun there with another latency backend must not reuse the
    reference measured with the first one (its latency is in other units and decides pruning)."""
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path / "w"
    run_search(ws, ev, tiny_settings(workdir, 2), progress=False)
    from sensq.latency import bops

    first = json.loads((workdir / "search.json").read_text())["fp32"]
    assert first["latency_ms"] == bops(ws.model) / 1e9  # GBOPs
    settings = tiny_settings(workdir, 2)
    settings.latency = "cmd:echo latency: 5 ms #{model}"  # every model "takes" 5 ms
    run_search(ws, ev, settings, progress=False)
    info = json.loads((workdir / "search.json").read_text())
    assert info["settings"]["latency"] == settings.latency
    assert info["fp32"]["latency_ms"] == 5.0


def test_pareto_counts_are_trials_not_the_fp32_reference(tiny_run):
    """pareto.json/.md count the study's trials; FP32 is a reference row, not a trial."""
    workdir, _, _, _ = tiny_run
    study = load_study(workdir)
    doc = json.loads((workdir / "pareto.json").read_text())
    n_complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert doc["all_trials"] == 10
    assert doc["complete_trials"] == n_complete
    md = (workdir / "pareto.md").read_text()
    assert f"out of {n_complete} complete (10 in total)" in md


def test_same_seed_bops_is_deterministic(tiny, tiny_run, tmp_path):
    workdir, _, _, _ = tiny_run
    ws, ev = tiny.workspace(), tiny.evaluator()
    other = tmp_path / "again"
    run_search(ws, ev, tiny_settings(other, 10), progress=False)
    a, b = load_study(workdir).trials, load_study(other).trials
    assert [(t.state, t.params, t.values, t.user_attrs.get("low_metric")) for t in a] == \
           [(t.state, t.params, t.values, t.user_attrs.get("low_metric")) for t in b]
    # and the sampler really explored: not every trial is a copy of the seeds
    assert len({json.dumps(t.params, sort_keys=True) for t in a}) >= 6


def test_custom_storage_url_via_cli(tiny, tmp_path):
    from sensq.cli import main

    db = tmp_path / "elsewhere" / "custom.db"
    db.parent.mkdir()
    workdir = tmp_path / "w"
    url = f"sqlite:///{db}"
    assert main(tiny.search_args(workdir, 3, "--storage", url)) == 0
    assert db.is_file() and not (workdir / "study.db").exists()
    info = json.loads((workdir / "search.json").read_text())
    assert info["storage"] == url
    study = optuna.load_study(study_name=info["study_name"], storage=url)
    assert len(study.get_trials(states=FINISHED)) == 3
    assert (workdir / "pareto.json").is_file()


@pytest.mark.parametrize("url", ["notadb://nowhere", "sqlite:///{tmp}/no/such/folder/study.db"],
                         ids=["unknown-dialect", "sqlite-missing-folder"])
def test_bad_storage_url_is_a_user_error(tiny, tmp_path, url):
    ws, ev = tiny.workspace(), tiny.evaluator()
    url = url.format(tmp=tmp_path)
    with pytest.raises(SensqError, match="cannot open Optuna storage"):
        run_search(ws, ev, tiny_settings(tmp_path / "w", 2, storage=url), progress=False)


def test_bad_storage_url_cli_exit_code(tiny, tmp_path, capsys):
    from sensq.cli import main

    url = f"sqlite:///{tmp_path}/no/such/folder/study.db"
    rc = main(tiny.search_args(tmp_path / "w", 2, "--storage", url))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("sensq: error: cannot open Optuna storage") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ resume after SIGKILL
def _states(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    try:
        return [r[0] for r in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []
    finally:
        con.close()


def test_resume_after_sigkill(tiny, tmp_path):
    budget = 8
    workdir = tmp_path / "w"
    db = workdir / "study.db"
    cmd = [sys.executable, "-m", "sensq", *tiny.search_args(workdir, budget)]
    env = {**os.environ, "SENSQ_TEST_SLEEP": "0.4",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    states: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"search ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
            states = _states(db) if db.exists() else []
            if sum(s in ("COMPLETE", "PRUNED") for s in states) >= 2 and "RUNNING" in states:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no second finished trial within 90 s: {states}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    after_kill = _states(db)
    # killed mid-trial (a kill landing in the few ms between two trials would leave none RUNNING)
    assert after_kill.count("RUNNING") <= 1, after_kill
    n_done_before = sum(s in ("COMPLETE", "PRUNED") for s in after_kill)
    assert 2 <= n_done_before < budget
    study = load_study(workdir)
    done_before = {t.number: (t.state, t.values) for t in study.get_trials(states=FINISHED)}

    rerun = subprocess.run(cmd, env={**env, "SENSQ_TEST_SLEEP": "0"}, capture_output=True, text=True, timeout=180,
                           cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = load_study(workdir)
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == budget
    lost = [t for t in study.trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)]
    assert len(lost) <= 1
    assert len(study.trials) <= budget + 1
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert {t.number: (t.state, t.values) for t in finished if t.number in done_before} == done_before
    labels = [t.user_attrs.get("label") for t in study.trials]
    assert [labels.count(lab) for lab in SEED_LABELS] == [1, 1, 1, 1], labels
    assert (workdir / "pareto.json").is_file()
    check_pareto_json(workdir, study)


# ------------------------------------------------------------------------------------------------ real data
class FirstN:
    """The COCO evaluator restricted to its first n images (limit capped at n)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n
        self.name, self.primary = inner.name, inner.primary

    def __len__(self) -> int:
        return self.n

    def signature(self) -> str:
        return f"{self.inner.name}:first{self.n}:{self.primary}"

    def evaluate(self, model, limit=None, progress=True):
        return self.inner.evaluate(model, limit=min(limit or self.n, self.n), progress=False)


def test_yolov5n_short_search(yolov5n, coco_dir, tmp_path):
    """End to end on real data, kept short: the backbone up to SPPF (model.0-9) is searched, the rest stays float
    (truncate_var_names), 4 COCO images, budget 4."""
    from sensq.config import InputParams
    from sensq.evaluators import make_evaluator

    cut = "/model.9/cv2/act/Mul_output_0"
    cfg = QuantizeConfig(onnx_model=str(yolov5n), calibration_step=8, truncate_var_names=[cut],
                         inputs=[InputParams(data_list_path=str(coco_dir / "train2017"))])
    ws = prepare(cfg, progress=False)
    ev = FirstN(make_evaluator(str(coco_dir), model=str(yolov5n)), 4)
    workdir = tmp_path / "yolo"
    settings = SearchSettings(budget=4, workdir=str(workdir), latency="bops", low_fidelity=2, sensitivity_limit=4)
    result = run_search(ws, ev, settings, progress=False)
    study = load_study(workdir)
    assert len(study.get_trials(states=FINISHED)) == 4
    info = json.loads((workdir / "search.json").read_text())
    assert set(info["groups"]) == {f"model.{i}" for i in range(10)}
    assert len(result.sensitivity.table) == 10
    assert result.sensitivity.metric_name == "mAP50-95"
    always_float = set(ws.base_plan.float_nodes)
    assert set(ws.head.float_nodes) <= always_float
    assert not always_float & {n for nodes in info["groups"].values() for n in nodes}
    for n, label in enumerate(SEED_LABELS):
        assert study.trials[n].user_attrs["label"] == label
        assert study.trials[n].user_attrs["float_groups"] == info["ranked_groups"][:n]
    for t in study.trials:  # every plan keeps the truncated part and the decode head float
        assert always_float <= set(t.user_attrs["plan"]["float_nodes"])
    assert 0.0 < info["fp32"]["metric"] <= 1.0
    # the FP32 reference is the float model on the same 4 images
    assert info["fp32"]["metric"] == ev.evaluate(ws.model).value
    # (FP32 may be dominated on 4 images: its presence is checked by test_pareto_json_keeps_dominated_fp32)
    front = check_pareto_json(workdir, study, require_fp32=False)
    assert all((workdir / "front" / f"trial_{n}.json").is_file() for n in front)
    for name in ("sensitivity.csv", "sensitivity.md", "sensitivity.png", "pareto.png", "pareto.md", "pareto.csv"):
        assert (workdir / name).is_file(), name
