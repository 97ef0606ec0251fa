"""A trial is data: its plan and its measurements with their provenance, stored as one JSON user attribute of the
Optuna trial (`sensq`), so any worker, report or export reads the same record. Latency measurements are keyed by
the built graph's structure and the machine, and shared by every trial with that key (LatencyBook).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import optuna

ATTR = "sensq"
SOURCES = ("seed", "sensitivity", "search", "mutation", "greedy")


@dataclass
class TrialRecord:
    number: int
    plan: dict
    plan_key: str
    label: str = ""
    source: str = "search"  # seed | sensitivity (leave-one-out run entered as a warm start) | search | mutation | greedy
    float_groups: list[str] = field(default_factory=list)
    model_hash: str = ""
    structure_key: str = ""
    fidelity: int = 0  # search-split samples the metric below is computed on
    metric: float = float("nan")
    delta_int8: float = float("nan")  # metric - all-INT8's metric on the same samples
    pruned: dict | None = None  # {"by": trial, "diff": d, "lo": l, "hi": h, "n": samples} when stopped early
    latency: dict | None = None  # sensq.latency.PairedLatency.to_dict() + machine_id, date (None: not measured)
    # why the plan has no latency (the runtime cannot compile/run its model) or no metric either (the collapse guard,
    # sensq/guard.py, stopped it before scoring)
    rejected: str | None = None
    cost_proxy: float = float("nan")  # what the sampler minimizes (see SearchRun.sampler_cost)
    gbops: float = float("nan")
    seconds: dict = field(default_factory=dict)
    # the earlier trial whose built model (its bytes: graph and quantization parameters) this plan gives: not scored
    # again, its measurements are that trial's, and it is neither counted in the budget nor shown as a point
    repeat_of: int | None = None

    @property
    def full(self) -> bool:
        return (self.pruned is None and self.source != "sensitivity" and self.latency is not None and not self.rejected
                and self.repeat_of is None)

    def copy_measurements(self, earlier: "TrialRecord") -> None:
        """This plan builds `earlier`'s model: take its measurements, recorded as a repeat of it."""
        for name in ("structure_key", "fidelity", "metric", "delta_int8", "pruned", "latency", "rejected", "gbops"):
            setattr(self, name, getattr(earlier, name))
        self.repeat_of = earlier.number

    @property
    def ratio(self) -> float:
        return float(self.latency["ratio"]) if self.latency else float("nan")

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=float)

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial) -> "TrialRecord | None":
        raw = t.user_attrs.get(ATTR)
        if raw is None:
            return None
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def records(study: optuna.Study) -> list[TrialRecord]:
    """Records of the COMPLETE trials and of those the collapse guard rejected (told as PRUNED), by trial number."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        rec = TrialRecord.from_trial(t)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: r.number)


class LatencyBook:
    """Paired latency measurements by (graph structure, machine, backend), kept in the study's user attributes so
    that resumed runs and other workers on the same machine reuse them (ratios to FP32 are drift-robust; absolute
    ms carry the date they were measured)."""

    PREFIX = "latency:"

    def __init__(self, study: optuna.Study | None = None):
        self.study = study
        self._mem: dict[str, dict] = {}

    @staticmethod
    def key(structure_key: str, machine_id: str, backend: str) -> str:
        return f"{structure_key}|{machine_id}|{backend}"

    def get(self, key: str) -> dict | None:
        if key in self._mem:
            return self._mem[key]
        if self.study is not None:
            raw = self.study.user_attrs.get(self.PREFIX + key)
            if raw is not None:
                self._mem[key] = json.loads(raw)
                return self._mem[key]
        return None

    def put(self, key: str, value: dict) -> None:
        self._mem[key] = value
        if self.study is not None:
            self.study.set_user_attr(self.PREFIX + key, json.dumps(value, default=float))
