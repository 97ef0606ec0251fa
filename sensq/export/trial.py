"""Which trial an export writes, and the workspace that rebuilds it exactly as it was scored.

Without a trial number the export takes the trial the search's reports call recommended (pareto.json
"recommended_trial"; before the search wrote that key: the front row with the best metric), never Optuna's
constrained `best_trials`, so the reports and the export follow one rule. The rebuilt workspace must have the
calibration statistics the search used (search.json "stats_key"); otherwise the export refuses instead of writing
a model other than the one scored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from ..config import config_from_dict
from ..errors import SensqError
from ..plan import PrecisionPlan


def load_search(workdir: str | Path) -> dict:
    f = Path(workdir) / "search.json"
    if not f.is_file():
        raise SensqError(f"no search found in {workdir} (search.json missing)", "pass the --workdir of a `sensq search` run")
    return json.loads(f.read_text())


def load_pareto(workdir: str | Path) -> dict | None:
    f = Path(workdir) / "pareto.json"
    return json.loads(f.read_text()) if f.is_file() else None


RECORD_ATTR = "sensq"  # the search's trial record: one JSON user attribute per Optuna trial


@dataclass
class TrialChoice:
    """A finished trial, why it was picked, and the scores it reproduces."""

    number: int
    plan: PrecisionPlan
    metric: float  # on the search split, as the search recorded it
    latency: float  # the trial's own latency in `latency_unit`, as measured in the study
    picked: str  # "given", "recommended by the search" or "best metric on the front"
    confirm_metric: float | None = None  # on the held-out split, when the search confirmed the front
    attrs: dict = field(default_factory=dict)  # float_groups, label, source, ...
    latency_unit: str = "ms"
    ratio: float | None = None  # latency relative to FP32 measured in the same rounds

    def summary(self, metric_name: str = "metric") -> str:
        held_out = f", {self.confirm_metric:.4f} on the held-out split" if self.confirm_metric is not None else ""
        how = "" if self.picked == "given" else f", {self.picked}"
        latency = f"{self.latency:.4g} {self.latency_unit}"
        if self.ratio is not None:
            latency = f"{self.ratio:.3f}x FP32 ({latency})"
        return f"trial {self.number}{how}: reproduces {metric_name} {self.metric:.4f} on the search split{held_out}, latency {latency}"


def trial_data(t: optuna.trial.FrozenTrial) -> dict | None:
    """{plan, metric, latency, unit, ratio, attrs} of a trial that was scored in full, else None.

    Reads the search's record (user attribute "sensq": plan, metric, latency {value, unit, ratio}, pruned) or, for
    studies written by sensq 0.1, the plan attribute and the objective values (metric, latency ms)."""
    raw = t.user_attrs.get(RECORD_ATTR)
    if raw is not None:
        rec = json.loads(raw)
        if rec.get("pruned") is not None or rec.get("source") == "sensitivity" or not rec.get("latency"):
            return None  # scored on part of the search split only (stopped early, or a sensitivity-pass entry)
        if rec.get("repeat_of") is not None:
            return None  # builds an earlier trial's model: that trial is the one to export (as records' `full`)
        lat = rec.get("latency") or {}
        return {"plan": rec["plan"], "metric": float(rec["metric"]), "latency": float(lat.get("value", float("nan"))),
                "unit": lat.get("unit") or "ms", "ratio": lat.get("ratio"), "attrs": rec}
    if "plan" not in t.user_attrs or not t.values:
        return None
    return {"plan": t.user_attrs["plan"], "metric": t.values[0], "latency": t.values[1], "unit": "ms", "ratio": None,
            "attrs": dict(t.user_attrs)}


def _default_trial(workdir: Path) -> tuple[int, str]:
    doc = load_pareto(workdir)
    if doc is None:
        raise SensqError(f"no pareto.json in {workdir}", "let `sensq search` finish its reports (rerun it: it resumes), or pass --trial N")
    if doc.get("recommended_trial") is not None:
        return int(doc["recommended_trial"]), "recommended by the search"
    rows = [r for r in doc.get("front", []) if int(r.get("trial", -1)) >= 0]
    if not rows:
        raise SensqError("the front holds no trial yet (only the FP32 reference)",
                         "run `sensq search` with a larger --budget (it resumes), or pass --trial N")

    def cost(r):
        return r.get("ratio") if r.get("ratio") is not None else r.get("latency_ms", 0.0)

    best = max(rows, key=lambda r: (r["metric"], -cost(r), -int(r["trial"])))
    return int(best["trial"]), "best metric on the front"


def choose_trial(workdir: str | Path, info: dict, trial: int | None) -> TrialChoice:
    picked = "given"
    if trial is None:
        trial, picked = _default_trial(Path(workdir))
    from ..search.coordination import open_storage

    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    finished = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        data = trial_data(t)
        if data is not None:
            finished[t.number] = data
    if trial not in finished:
        numbers = sorted(finished)
        raise SensqError(f"trial {trial} is not a finished trial of this study (scored in full)",
                         f"choose one of {numbers[:20]}{' ...' if len(numbers) > 20 else ''} (see pareto.md)")
    d = finished[trial]
    row = next((r for r in (load_pareto(workdir) or {}).get("front", []) if r.get("trial") == trial), {})
    confirm = row.get("confirm_metric", d["attrs"].get("confirm_metric"))
    return TrialChoice(trial, PrecisionPlan.from_dict(d["plan"]), d["metric"], d["latency"], picked,
                       None if confirm is None else float(confirm), d["attrs"], d["unit"],
                       None if d["ratio"] is None else float(d["ratio"]))


def workspace_for(info: dict, progress: bool = True):
    """The search's workspace, rebuilt from search.json; refuses when the calibration statistics differ."""
    from ..quantize import prepare

    cfg = config_from_dict(info["quantize_config"], base_dir=info.get("config_base_dir", "."))
    cfg.cache_dir = info.get("cache_dir")
    ws = prepare(cfg, progress=progress)
    expected = info.get("stats_key")
    if expected and ws.stats.key != expected:
        raise SensqError(f"the calibration statistics differ from the search's (key {ws.stats.key}, search.json has "
                         f"{expected}): the model or calibration data changed since the search, so the export would not "
                         "be the model that was scored",
                         "restore the model and calibration files the search used, or run the search again")
    return ws
