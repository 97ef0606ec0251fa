"""Several processes (or machines) on one study: no trial is left RUNNING by a worker that died.

Each running trial records which process runs it (and, once claimed, which plan: PLAN_KEY, so other workers count it
as in flight) and sends Optuna heartbeats from the moment it is asked. A worker starting or asking for a new trial
first fails the RUNNING trials whose process is gone (same host: the pid no longer exists) or whose heartbeat is
stale (other hosts: Optuna's grace period), and re-enqueues their parameters with their labels (once, under the
study lock), so a seed or mutation interrupted by a kill is retried instead of lost. Trials told FAIL on purpose —
repeats (duplicate_of) and trials released because the budget was already in flight (RELEASED) — are not retried.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

import optuna
from optuna.trial import TrialState

HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 60  # a trial on another host is dead after this long without a heartbeat
RETRY_OF = "retry_of"  # user attribute of a re-enqueued trial: the number of the trial that died
PLAN_KEY = "plan_key"  # user attribute of a running trial: the plan it scores (claimed under the study lock)
MODEL_HASH = "model_hash"  # user attribute of a running trial: the built model it scores (one model, one trial)
RELEASED = "released"  # user attribute of a trial given back unrun (why), never retried
POLL_SECONDS = 1.0  # how often a worker with nothing to start looks at the trials in flight


def identity(worker: int = 0) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_local(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials of a process on this host that no longer exists, and RUNNING trials that never said who runs
    them (killed between ask() and claim()) once they are older than the grace period."""
    import datetime as _dt

    host = socket.gethostname()
    now = _dt.datetime.now()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("worker_identity")
        if who is None:
            if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > GRACE_PERIOD:
                out.append(t)
        elif who.get("host") == host and who.get("pid") != os.getpid() and not _alive(int(who["pid"])):
            out.append(t)
    return out


def reclaim(study: optuna.Study, coord=None) -> int:
    """Fail the trials of dead workers and re-enqueue their parameters (under `coord`'s study lock when given, so two
    workers never retry the same trial twice); returns how many were reclaimed."""
    optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat older than the grace period
    storage = study._storage
    n = 0
    for t in _dead_local(study):
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
        n += 1
    with coord.lock() if coord is not None else contextlib.nullcontext():
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials}
        for t in trials:
            # a trial killed before its knobs were sampled still holds an enqueued seed's fixed parameters
            params = t.params or t.system_attrs.get("fixed_params")
            if t.state != TrialState.FAIL or t.number in retried or not params or \
                    "duplicate_of" in t.user_attrs or RELEASED in t.user_attrs:
                continue
            attrs = {k: v for k, v in t.user_attrs.items() if k in ("source", "label")}
            study.enqueue_trial(params, user_attrs={**attrs, RETRY_OF: t.number}, skip_if_exists=False)
    return n


def claim(study: optuna.Study, trial: optuna.Trial, worker: int = 0) -> None:
    """First thing after ask(): say which process runs the trial (a kill after this is detected at once on this
    host) and start its heartbeat record (so other hosts see it go stale if this worker dies before running it)."""
    trial.set_user_attr("worker_identity", identity(worker))
    from optuna.storages._heartbeat import is_heartbeat_enabled  # optuna>=4,<6, as get_heartbeat_thread below

    if is_heartbeat_enabled(study._storage):
        study._storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Keep the trial's heartbeat going while the body runs (other hosts detect a dead worker by its absence)."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # optuna>=4,<6: tested in tests/test_search_resume.py

    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def claim_model(study: optuna.Study, coord, trial: optuna.Trial, model_hash: str, scored):
    """`scored()` (the record of a trial that already scored this model) if there is one; else None once `trial` has
    claimed the hash (under the study lock). While another worker's trial scores the same model this waits for it,
    reclaiming dead workers' trials on every look: a worker killed mid-trial would otherwise be waited for forever."""
    while True:
        with coord.lock():
            earlier = scored()
            if earlier is not None:
                return earlier
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not any(t.user_attrs.get(MODEL_HASH) == model_hash and t.number != trial.number for t in running):
                trial.set_user_attr(MODEL_HASH, model_hash)
                return None
        time.sleep(POLL_SECONDS)
        reclaim(study, coord)
