"""Several workers on one study, on a real PostgreSQL server (tests/conftest.py starts a throw-away one): seeds and
warm start entered once, the budget reached exactly with distinct plans, no trial left RUNNING by a killed worker or
by a worker on another host whose heartbeat went stale, FP32/all-INT8 and the sensitivity pass computed once per
study, reports that read the same from every worker's work directory; the study lock itself; concurrent calibration
into one cache directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from sensq.cli import main
from sensq.search import run_search
from sensq.search import workers
from sensq.search.coordination import Coordinator, open_storage

from search_helpers import SEED_LABELS, entered, make_tiny, searched, tiny_settings

REPO = Path(__file__).resolve().parents[1]
BUDGET = 12


@pytest.fixture
def tiny(tmp_path):
    """A fresh tiny setup with its own cache per test: no model scored by an earlier test is already in the store
    (a trial served from the store takes milliseconds, and a kill would miss it)."""
    return make_tiny(tmp_path / "tiny")


def _env(sleep: float) -> dict:
    return {**os.environ, "SENSQ_TEST_SLEEP": str(sleep),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def _start(tiny, tmp_path, url: str, worker: int, sleep: float, budget: int = BUDGET) -> tuple[subprocess.Popen, Path]:
    workdir = tmp_path / f"w{worker}"
    cmd = [sys.executable, "-m", "sensq", *tiny.search_args(workdir, budget, "--storage", url, "--worker", str(worker))]
    log = (tmp_path / f"w{worker}.log").open("a")
    return subprocess.Popen(cmd, env=_env(sleep), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path), workdir


def _log(tmp_path: Path, worker: int) -> str:
    return (tmp_path / f"w{worker}.log").read_text()[-3000:]


def _study(url: str, workdir: Path) -> optuna.Study:
    info = json.loads((workdir / "search.json").read_text())
    assert info["storage"] == url
    return optuna.load_study(study_name=info["study_name"], storage=open_storage(url))


def _check_study(study: optuna.Study) -> list:
    """The invariants every finished multi-worker study must satisfy; returns its COMPLETE searched records."""
    from sensq.search import records

    trials = study.get_trials(deepcopy=False)
    trace = [(t.number, t.state.name, t.user_attrs.get("label"), t.user_attrs.get("retry_of"),
              t.user_attrs.get("duplicate_of"), t.user_attrs.get("released")) for t in trials]
    recs = searched(records(study))
    assert len(recs) == BUDGET == len({r.plan_key for r in recs}), trace  # exactly the budget, no repeat scored
    assert not [t for t in trials if t.state == TrialState.RUNNING], trace
    # each seed enqueued once (retries of a killed seed name the trial they retry) and scored once
    enqueued = [t.user_attrs.get("label") for t in trials
                if t.user_attrs.get("source") == "seed" and "retry_of" not in t.user_attrs]
    assert sorted(enqueued) == sorted(SEED_LABELS), trace
    assert [[r.label for r in entered(records(study))].count(lab) for lab in SEED_LABELS] == [1, 1, 1, 1], trace
    warm = [t.user_attrs.get("label") for t in trials if t.user_attrs.get("source") == "sensitivity"]
    assert len(warm) == len(set(warm)) > 0, trace  # the leave-one-out entries, once each
    return recs


def _front(workdir: Path) -> list[tuple]:
    doc = json.loads((workdir / "pareto.json").read_text())
    return [(r["trial"], r["plan_key"], r["metric"], r["ratio"], r.get("metric_lo"), r.get("metric_hi"))
            for r in doc["front"]], doc["summary"]["distinct_plans"]


def _sensitivity_passes(*workdirs: Path) -> int:
    """Work directories where a sensitivity pass ran (it writes its local cache file there)."""
    return sum(bool(list((w / "cache").glob("sensitivity-*.json"))) for w in workdirs)


def test_two_workers_started_together_on_postgres(tiny, tmp_path, postgres_url):
    procs = [_start(tiny, tmp_path, postgres_url, w, sleep=0.1) for w in (0, 1)]  # within the same second
    for w, (proc, _) in enumerate(procs):
        assert proc.wait(timeout=600) == 0, _log(tmp_path, w)
    w0, w1 = procs[0][1], procs[1][1]
    study = _study(postgres_url, w0)
    recs = _check_study(study)
    assert {r.number for r in recs} <= {t.number for t in study.trials}
    by = {t.user_attrs["worker_identity"]["worker"] for t in study.trials if t.state == TrialState.COMPLETE
          and "worker_identity" in t.user_attrs}
    assert by == {0, 1}  # both took part
    assert _sensitivity_passes(w0, w1) == 1  # the second worker read the study's pass instead of running its own
    # the reports of the one study read the same from either work directory
    assert _front(w0) == _front(w1)
    assert _front(w0)[1] == BUDGET


def _wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            assert proc.poll() is None, f"a worker ended before {what}"
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _has_study(url: str) -> bool:
    """A worker has created the study (it does so right before it takes the lock to score FP32 and all-INT8)."""
    import psycopg2

    con = psycopg2.connect(url)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM studies")
            return cur.fetchone()[0] > 0
    except psycopg2.Error:  # tables not created yet
        return False
    finally:
        con.close()


def test_sigkill_one_worker_the_other_finishes_and_a_rerun_reaches_the_budget(tiny, tmp_path, postgres_url):
    # worker 1 is slow (2 s per evaluate), so the kill, sent as soon as it runs a claimed trial, lands mid-trial;
    # worker 0 is slowed a little (0.2 s per evaluate) so that it cannot finish the budget before worker 1 claims one.
    # Worker 1 starts once worker 0 has created the study: worker 0 then scores the shared FP32/all-INT8 and runs the
    # sensitivity pass (at 2 s per evaluate, worker 1 would take ~10 s over them when it got there first).
    p0, w0 = _start(tiny, tmp_path, postgres_url, 0, sleep=0.2)
    procs = [p0]
    try:
        _wait_for(lambda: _has_study(postgres_url), 300, "worker 0 creating the study", procs)
        p1, w1 = _start(tiny, tmp_path, postgres_url, 1, sleep=2.0)
        procs.append(p1)

        first_seen: dict[int, float] = {}

        def worker1_mid_trial() -> bool:
            # still running 0.3 s after first seen: a trial that evaluates (2 s), not one that ends at once as a
            # repeat of an already-built model (the tiny model's all-float seed is the FP32 model)
            try:
                study = _study(postgres_url, w1)
            except (OSError, ValueError):  # search.json not written yet (or being written)
                return False
            now = time.monotonic()
            return any(now - first_seen.setdefault(t.number, now) >= 0.3
                       for t in study.get_trials(deepcopy=False)
                       if t.state == TrialState.RUNNING and workers.PLAN_KEY in t.user_attrs
                       and t.user_attrs["worker_identity"]["pid"] == p1.pid)

        _wait_for(worker1_mid_trial, 300, "worker 1 running a claimed trial", procs)
        os.kill(p1.pid, signal.SIGKILL)
        assert p1.wait(timeout=30) == -signal.SIGKILL
        assert p0.wait(timeout=600) == 0, _log(tmp_path, 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    study = _study(postgres_url, w0)
    _check_study(study)
    killed = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.user_attrs.get("worker_identity", {}).get("pid") == p1.pid
              and "duplicate_of" not in t.user_attrs and "released" not in t.user_attrs]
    trace = [(t.number, t.state.name, t.user_attrs.get("label"), t.user_attrs.get("worker_identity"),
              t.user_attrs.get("retry_of"), t.user_attrs.get("duplicate_of")) for t in study.trials]
    (tmp_path / "trials.json").write_text(json.dumps(trace, default=str, indent=0))  # the whole story, on failure
    assert len(killed) == 1, trace  # the trial worker 1 was killed in: failed by worker 0, then retried
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, trace
    assert retries[0].params == killed[0].params
    # the killed worker's command, run again (here, in this process), finds the budget reached: nothing new, no
    # second sensitivity pass
    passes = _sensitivity_passes(w0, w1)
    assert main(tiny.search_args(w1, BUDGET, "--storage", postgres_url, "--worker", "1")) == 0
    _check_study(_study(postgres_url, w0))
    assert _sensitivity_passes(w0, w1) == passes == 1
    assert _front(w0) == _front(w1)


def _age_heartbeat(url: str, trial_id: int, seconds: int) -> None:
    import psycopg2

    con = psycopg2.connect(url)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute("UPDATE trial_heartbeats SET heartbeat = now() - make_interval(secs => %s) WHERE trial_id = %s",
                    (seconds, trial_id))
        assert cur.rowcount == 1
    con.close()


def _other_host_trial(study: optuna.Study, plan_key: str) -> optuna.Trial:
    """A trial as a worker on another machine runs it: claimed plan, heartbeat recorded."""
    trial = study.ask({"float:conv1": optuna.distributions.CategoricalDistribution([False, True])})
    trial.set_user_attr("worker_identity", {"host": "another-host", "pid": 1, "worker": 7})
    trial.set_user_attr(workers.PLAN_KEY, plan_key)
    study._storage.record_heartbeat(trial._trial_id)
    return trial


def test_other_host_trial_fails_only_when_its_heartbeat_is_stale(tiny, tmp_path, postgres_url):
    run_search(tiny.workspace(), tiny.evaluator(), tiny_settings(tmp_path / "w", 2, storage=postgres_url), progress=False)
    storage = open_storage(postgres_url, workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
    name = json.loads((tmp_path / "w" / "search.json").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=storage)
    fresh, stale = _other_host_trial(study, "plan-a"), _other_host_trial(study, "plan-b")
    _age_heartbeat(postgres_url, stale._trial_id, workers.GRACE_PERIOD + 30)
    assert workers.reclaim(study, Coordinator(storage, name)) == 0  # the pid check is for this host only
    states = {t.number: t for t in study.get_trials()}
    assert states[fresh.number].state == TrialState.RUNNING  # alive elsewhere: left alone
    assert states[stale.number].state == TrialState.FAIL
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == stale.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == states[stale.number].params  # enqueued with the same parameters


def test_worker_waits_for_other_hosts_trial_in_flight_then_retries_it_when_stale(tiny, tmp_path, postgres_url,
                                                                                 monkeypatch):
    """Budget 5 with 4 scored (the seeds) and one in flight on another host: no fifth plan starts here; when that
    host's heartbeat goes stale its trial is failed, retried here, and the budget is reached exactly."""
    monkeypatch.setattr(workers, "POLL_SECONDS", 0.2)  # the waiting worker looks again 5x as often (in this process)
    ws, ev = tiny.workspace(), tiny.evaluator()
    run_search(ws, ev, tiny_settings(tmp_path / "w", 4, storage=postgres_url), progress=False)
    storage = open_storage(postgres_url, workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
    name = json.loads((tmp_path / "w" / "search.json").read_text())["study_name"]
    study = optuna.load_study(study_name=name, storage=storage)
    assert not study.get_trials(states=(TrialState.WAITING,))  # the seeds are scored: ask() gives a fresh trial
    other = _other_host_trial(study, "plan-elsewhere")
    seen_waiting = threading.Event()

    def go_stale():  # the other host dies a little while after this worker started waiting for its trial
        time.sleep(3.0)
        seen_waiting.set()
        _age_heartbeat(postgres_url, other._trial_id, workers.GRACE_PERIOD + 30)

    t = threading.Thread(target=go_stale)
    t.start()
    try:
        t0 = time.monotonic()
        run_search(ws, ev, tiny_settings(tmp_path / "w", 5, storage=postgres_url), progress=False)
        waited = time.monotonic() - t0
    finally:
        t.join()
    assert seen_waiting.is_set() and waited >= 3.0
    from sensq.search import records

    recs = searched(records(study))
    assert len(recs) == 5 == len({r.plan_key for r in recs})
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == other.number]
    assert len(retry) == 1 and (retry[0].state == TrialState.COMPLETE or "duplicate_of" in retry[0].user_attrs)
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_model_in_flight_is_waited_for_only_while_its_worker_lives(tmp_path, monkeypatch):
    """Two workers built the same model; the other one is scoring it. While it lives this one waits (one model, one
    trial); once it is killed its trial is failed and this one claims the model instead of waiting forever (a kill
    mid-trial after this worker's last reclaim left it waiting in the 2-worker SIGKILL test)."""
    import socket

    monkeypatch.setattr(workers, "POLL_SECONDS", 0.05)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
    study = optuna.create_study(study_name="s", storage=storage)
    coord = Coordinator(storage, "s")
    other_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = study.ask()
    other.set_user_attr("worker_identity", {"host": socket.gethostname(), "pid": other_worker.pid, "worker": 1})
    other.set_user_attr(workers.MODEL_HASH, "h")
    mine = study.ask()
    out = {}
    waiter = threading.Thread(target=lambda: out.update(r=workers.claim_model(study, coord, mine, "h", lambda: None)),
                              daemon=True)
    try:
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and workers.MODEL_HASH not in study.trials[mine.number].user_attrs  # waits
    finally:
        other_worker.kill()
        other_worker.wait()
    waiter.join(30)
    assert not waiter.is_alive(), "still waiting for a dead worker's trial"
    trials = study.get_trials()
    assert out["r"] is None and trials[mine.number].user_attrs[workers.MODEL_HASH] == "h"
    assert trials[other.number].state == TrialState.FAIL


# ------------------------------------------------------------------------------------------------ the lock itself
def _increment(url: str, name: str, n: int, barrier) -> None:
    storage = open_storage(url, workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
    coord = Coordinator(storage, name)
    barrier.wait()
    for _ in range(n):
        with coord.lock():
            value = coord.get("counter") or 0
            time.sleep(0.02)  # a read-modify-write race window
            coord.put("counter", value + 1)


def _lock_counts(ctx, url: str, tmp_path: Path) -> int:
    """3 processes (`ctx`: the session's forkserver, clean processes that share nothing with this one) x 5 increments."""
    storage = open_storage(url, workers.HEARTBEAT_INTERVAL, workers.GRACE_PERIOD)
    optuna.create_study(study_name="lock-test", storage=storage)
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_increment, args=(url, "lock-test", 5, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return Coordinator(storage, "lock-test").get("counter")


def test_study_lock_serializes_processes_on_postgres(postgres_url, tmp_path, forkserver):
    assert _lock_counts(forkserver, postgres_url, tmp_path) == 15  # no lost update among 3 processes x 5 increments


def test_study_lock_serializes_processes_on_sqlite(tmp_path, forkserver):
    assert _lock_counts(forkserver, f"sqlite:///{tmp_path / 'study.db'}", tmp_path) == 15


# ------------------------------------------------------------------------------------------------ calibration cache
CALIBRATE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from search_helpers import Tiny
from sensq.config import config_from_dict
from sensq.model import load_model
from sensq.quantize import calibration_statistics

cfg = config_from_dict({{"model_parameters": {{"onnx_model": {model!r}}},
                        "calibration_parameters": {{"calibration_step": 200, "input_parametres": [
                            {{"mean_value": [0.0] * 3, "std_value": [255.0] * 3, "color_format": "rgb",
                              "data_list_path": {calib!r}}}]}},
                        "quantization_parameters": {{"analysis_enable": False}}}})
model = load_model(cfg.model_path)
Path(sys.argv[1]).touch()  # imported and about to poll
start = Path({start!r})
while not start.exists():  # both processes start calibrating at the same moment
    time.sleep(0.001)
stats, cached, seconds, _ = calibration_statistics(cfg, model, yolo=False, progress=False)
print(int(cached), stats.key)
"""


def test_two_processes_calibrating_into_one_cache_share_one_pass(tiny, tmp_path):
    from tiny_models import write_pngs

    from sensq.statistics import CalibrationStats

    write_pngs(tmp_path / "calib", n=200)
    calib = tmp_path / "calib"
    cache = tmp_path / "shared-cache"
    start = tmp_path / "go"
    script = CALIBRATE.format(tests=str(REPO / "tests"), model=str(tiny.model), calib=str(calib), start=str(start))
    env = {**_env(0.0), "SENSQ_CACHE": str(cache)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    # an independent calibration of the same model and data in another cache, started alongside (it waits for the
    # same start signal, so it takes none of the two processes' start-up time)
    alone = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ready-alone")],
                             env={**env, "SENSQ_CACHE": str(tmp_path / "alone")}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: all(r.exists() for r in ready), 300, "both processes imported and polling", procs)
    finally:
        start.touch()  # (also when the wait failed: no process is left polling)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    cached = sorted(int(o[0].split()[0]) for o in outs)
    keys = {o[0].split()[1] for o in outs}
    assert cached == [0, 1]  # one calibration pass; the other process waited and read its statistics
    files = sorted(p.name for p in (cache / "stats").iterdir() if p.suffix == ".npz")
    assert files == [f"{keys.pop()}.npz"]  # one entry, no temporary left behind
    # the entry equals the independent calibration in the other cache
    alone_out, alone_err = alone.communicate(timeout=300)
    assert alone.returncode == 0 and alone_out.split()[0] == "0", alone_err[-2000:]
    a = CalibrationStats.load(cache / "stats" / files[0])
    b = CalibrationStats.load(tmp_path / "alone" / "stats" / files[0])
    assert a.n_samples == b.n_samples == 200 and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert np.array_equal(a.tensors[name].hist, b.tensors[name].hist)
        assert (a.tensors[name].min, a.tensors[name].max) == (b.tensors[name].min, b.tensors[name].max)


def test_a_worker_checks_its_reference_against_the_studys(caplog):
    """Another worker's FP32/all-INT8 models: refused; the same models scored to other per-sample values (another
    machine's store): a warning naming that machine; the same values: silent."""
    from types import SimpleNamespace

    from sensq.errors import SensqError
    from sensq.search.reference import check_reference, reference_doc, reference_values

    split = SimpleNamespace(search=np.arange(6), low_indices=np.arange(3))
    result = lambda v: SimpleNamespace(value=lambda idx: np.asarray(v, float)[idx])  # noqa: E731
    fp32, int8 = result([1, 2, 3, 4, 5, 6]), result([1, 2, 2, 4, 4, 6])
    doc = reference_doc(fp32, int8, "f", "i", split, worker=0)
    assert doc["int8"]["low"].tolist() == [1, 2, 2] and doc["by"]["worker"] == 0
    with pytest.raises(SensqError, match="differ from those of study s"):
        check_reference(doc, "f", "other", reference_values(fp32, int8, split), "s")
    with caplog.at_level("WARNING", logger="sensq"):
        check_reference(doc, "f", "i", reference_values(fp32, int8, split), "s")
        assert not caplog.records
        check_reference(doc, "f", "i", reference_values(fp32, result([1, 2, 3, 4, 4, 6]), split), "s")
    assert len(caplog.records) == 1 and doc["by"]["host"] in caplog.records[0].getMessage()
