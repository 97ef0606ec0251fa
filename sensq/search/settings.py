"""What `sensq search` is asked to do (the CLI's options, as one dataclass the Python API takes too)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

STRATEGIES = ("tpe", "random", "greedy")
REPORT_ONLY = ("max_drop", "n_boot", "latency_confirm")  # options read only after the trials (confirmation, report)


@dataclass
class SearchSettings:
    budget: int = 50  # distinct plans the search evaluates (seeds included; repeats and warm-start entries are not)
    workdir: str = "runs/search"
    storage: str | None = None  # Optuna URL; default sqlite:///<workdir>/study.db
    study_name: str | None = None
    seed: int = 0
    space: str = "default"
    latency: str | None = None  # backend spec; None: the target's default (ort-cpu: "ort")
    strategy: str = "tpe"  # tpe (Optuna's TPE, warm-started) | random (Optuna's RandomSampler) | greedy (sensitivity order)
    low_fidelity: int | None = None  # search-split samples of the first stage; None: a third (>= 32)
    confirm: float | int | str | None = "auto"  # held-out part: fraction, count, 0, or auto (half of sets >= 400)
    limit: int | None = None  # evaluate only the first N samples of the evaluation set
    sensitivity_budget: float | None = 120.0  # seconds for leave-one-out task-metric runs (None: every group)
    max_drop: float = 0.005  # recommendation: the fastest front point within this of FP32 on the search split
    depth: int = 1
    group_by: str = "auto"  # auto | module | structure | node
    top_k: int | None = None  # overrides the space's group toggle count
    n_boot: int = 1000
    latency_confirm: float = 60.0  # seconds for re-timing the front's candidates together after the trials (0: off)
    worker: int = 0  # worker id: each worker of one study samples with seed + worker

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.workdir).resolve() / 'study.db'}"

    def to_dict(self) -> dict:
        return asdict(self)

    def study_key(self, *parts) -> str:
        """Hash of what changes the trials: not the budget, workdir or worker, nor the report-only options (max_drop
        picks the recommendation, n_boot the report's intervals), so a rerun with other report options resumes."""
        d = self.to_dict()
        for k in ("budget", "workdir", "storage", "study_name", "worker", *REPORT_ONLY):
            d.pop(k)
        return hashlib.sha256(json.dumps([d, *parts], default=str, sort_keys=True).encode()).hexdigest()[:10]
