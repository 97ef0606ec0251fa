"""Resuming a study: a larger budget continues it (seeds once, earlier trials kept, no model rescored), a SIGKILL
mid-trial loses at most that trial, custom and bad storage URLs."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sensq.cli import main
from sensq.errors import SensqError
from sensq.search import run_search

from search_helpers import SEED_LABELS, entered, load_study, make_tiny, searched, study_records, tiny_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_resume_with_larger_budget_keeps_trials_and_does_not_reseed(tiny, tmp_path):
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path / "w"
    run_search(ws, ev, tiny_settings(workdir, 2), progress=False)
    before = {r.number: (r.plan_key, r.metric) for r in study_records(workdir)}
    scored = ev.scored
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)
    recs = study_records(workdir)
    assert len(searched(recs)) == 8 and len({r.plan_key for r in searched(recs)}) == 8
    assert {r.number: (r.plan_key, r.metric) for r in recs if r.number in before} == before
    labels = [r.label for r in entered(recs)]
    assert [labels.count(lab) for lab in SEED_LABELS] == [1, 1, 1, 1], labels
    # FP32, all-INT8 and the sensitivity models came from the per-sample store: only the 6 new plans ran, each on
    # at most the 16 search samples
    assert 0 < ev.scored - scored <= 6 * 16
    scored = ev.scored
    run_search(ws, ev, tiny_settings(workdir, 8), progress=False)  # budget reached: nothing new
    assert len(searched(study_records(workdir))) == 8 and ev.scored == scored


def test_rerun_with_other_report_options_resumes_the_same_study(tiny, tmp_path):
    """Issue 18.8: --max-drop and --n-boot only change the report; a rerun with other values continues the study
    (README: "rerun to resume") instead of starting a new one beside it."""
    ws, ev = tiny.workspace(), tiny.evaluator()
    workdir = tmp_path / "w"
    run_search(ws, ev, tiny_settings(workdir, 3), progress=False)
    first = json.loads((workdir / "search.json").read_text())["study_name"]
    before = {r.number: r.plan_key for r in searched(study_records(workdir))}
    run_search(ws, ev, tiny_settings(workdir, 4, max_drop=0.05, n_boot=300), progress=False)
    assert json.loads((workdir / "search.json").read_text())["study_name"] == first
    after = {r.number: r.plan_key for r in searched(study_records(workdir))}
    assert len(after) == 4 and {k: after[k] for k in before} == before  # one new trial, the three kept


def test_resumed_search_does_not_replay_proposals(tiny, tmp_path):
    ws, ev = tiny.workspace(), tiny.evaluator()
    run_search(ws, ev, tiny_settings(tmp_path / "w", 6), progress=False)
    run_search(ws, ev, tiny_settings(tmp_path / "w", 9), progress=False)
    keys = [r.plan_key for r in searched(study_records(tmp_path / "w"))]
    assert len(keys) == len(set(keys)) == 9


def _states(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    try:
        return [r[0] for r in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []
    finally:
        con.close()


def _claimed(db: Path) -> bool:
    """The running trial has said which process runs it (so the kill lands mid-trial, not inside ask())."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    try:
        q = ("SELECT COUNT(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
             "WHERE t.state = 'RUNNING' AND a.key = 'worker_identity'")
        return con.execute(q).fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def test_resume_after_sigkill(tiny, tmp_path):
    budget = 8
    workdir = tmp_path / "w"
    db = workdir / "study.db"
    cmd = [sys.executable, "-m", "sensq", *tiny.search_args(workdir, budget)]
    env = {**os.environ, "SENSQ_TEST_SLEEP": "0.25",  # every evaluate this much slower: the kill lands mid-trial
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    states: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"search ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
            states = _states(db) if db.exists() else []
            if states.count("COMPLETE") >= 5 and "RUNNING" in states and _claimed(db):  # mid-trial, after the warm start
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no trial running after the warm start within 120 s: {states}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before = {r.number: (r.plan_key, r.metric) for r in study_records(workdir)}
    assert main(tiny.search_args(workdir, budget)) == 0  # the same command, rerun (in this process, no sleep)
    recs = study_records(workdir)
    assert len(searched(recs)) == budget == len({r.plan_key for r in searched(recs)})
    assert {r.number: (r.plan_key, r.metric) for r in recs if r.number in before} == before
    complete_labels = [r.label for r in entered(recs)]  # COMPLETE trials only: a killed one does not count
    trace = [(t.number, t.state.name, t.user_attrs.get("label"), t.user_attrs.get("retry_of"),
              t.user_attrs.get("duplicate_of")) for t in load_study(workdir).trials]
    assert [complete_labels.count(lab) for lab in SEED_LABELS] == [1, 1, 1, 1], trace
    study = load_study(workdir)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    killed = [t for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,)) if "duplicate_of" not in t.user_attrs]
    assert len(killed) == 1 and killed[0].user_attrs["worker_identity"]["pid"] == proc.pid  # failed, then retried
    assert (workdir / "pareto.json").is_file()


def test_custom_storage_url_via_cli(tiny, tmp_path):
    db = tmp_path / "elsewhere" / "custom.db"
    db.parent.mkdir()
    workdir = tmp_path / "w"
    url = f"sqlite:///{db}"
    assert main(tiny.search_args(workdir, 3, "--storage", url)) == 0
    assert db.is_file() and not (workdir / "study.db").exists()
    info = json.loads((workdir / "search.json").read_text())
    assert info["storage"] == url
    assert len(searched(study_records(workdir))) == 3


@pytest.mark.parametrize("url", ["notadb://nowhere", "sqlite:///{tmp}/no/such/folder/study.db"],
                         ids=["unknown-dialect", "sqlite-missing-folder"])
def test_bad_storage_url_is_a_user_error(tiny, tmp_path, url):
    ws, ev = tiny.workspace(), tiny.evaluator()
    with pytest.raises(SensqError, match="cannot open Optuna storage"):
        run_search(ws, ev, tiny_settings(tmp_path / "w", 2, storage=url.format(tmp=tmp_path)), progress=False)


def test_bad_storage_url_cli_exit_code(tiny, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/no/such/folder/study.db"
    assert main(tiny.search_args(tmp_path / "w", 2, "--storage", url)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sensq: error: cannot open Optuna storage") and "Traceback" not in err


def test_each_worker_samples_with_its_own_seed_and_seeds_are_entered_once(tiny, tmp_path, monkeypatch):
    """Issue 8 item 12: two workers of one study (here one after the other on one SQLite storage) get sampler seeds
    --seed + worker, and the seeded plans are entered into the study once, not once per worker."""
    from sensq.search import study as study_module

    seeds = []
    original = study_module.make_sampler

    def recording(strategy, seed, n_warm):
        seeds.append(seed)
        return original(strategy, seed, n_warm)

    monkeypatch.setattr(study_module, "make_sampler", recording)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ws, ev = tiny.workspace(), tiny.evaluator()
    run_search(ws, ev, tiny_settings(tmp_path / "w0", 3, storage=url, worker=0), progress=False)
    run_search(ws, ev, tiny_settings(tmp_path / "w1", 5, storage=url, worker=1), progress=False)
    assert seeds == [0, 1]
    study = load_study(tmp_path / "w1")
    labels = [t.user_attrs.get("label") for t in study.trials if t.user_attrs.get("source") == "seed"]
    assert sorted(labels) == sorted(set(labels)) and "all-INT8" in labels  # each seed once
    assert len(searched(study_records(tmp_path / "w1"))) == 5  # the study's total, not 3 + 5


def test_cli_search_limit_restricts_the_evaluation_set(tiny, tmp_path):
    """Issue 8 item 16: `sensq search --limit N` scores only the first N samples (search and confirm parts)."""
    workdir = tmp_path / "w"
    assert main(tiny.search_args(workdir, 2, "--limit", "6")) == 0
    split = json.loads((workdir / "search.json").read_text())["split"]
    assert sorted(split["search"] + split["confirm"]) == list(range(6))
