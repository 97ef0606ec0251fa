"""The evaluator protocol: a task metric that scores an ONNX model, on all samples or on the first n.

Evaluators preprocess their samples once (uint8 pixels kept in memory) and reuse them for every model they score,
so scoring a model during a search costs little more than its inference.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm


@dataclass
class EvalResult:
    metrics: dict[str, float]
    primary: str  # name of the metric a search optimises, e.g. "mAP50-95" or "top1"
    n_samples: int
    seconds: float = 0.0  # wall time of evaluate()
    inference_seconds: float = 0.0  # time spent inside session.run
    samples: Any = None  # evaluators.samples.SampleResults of the evaluated samples (None: evaluator keeps none)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the 12 COCO stats by name

    @property
    def value(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict:
        d = {"primary": self.primary, "value": self.value, "metrics": self.metrics, "n_samples": self.n_samples,
             "seconds": round(self.seconds, 3), "inference_seconds": round(self.inference_seconds, 3)}
        d.update(self.extra)
        return d


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model. `model` is a path, an onnx.ModelProto, serialized bytes or an ort.InferenceSession.

    `indices` selects dataset samples (any subset, scored in that order); `limit` the first n. Evaluators that can,
    return per-sample results in EvalResult.samples (see evaluators/samples.py): subsets, bootstrap intervals and
    paired comparisons are then computed without inference."""

    name: str
    primary: str

    def __len__(self) -> int: ...

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult: ...


class Stopwatch:
    """Accumulates time spent in a block (used to separate inference time from evaluation time)."""

    def __init__(self):
        self.total = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per sample: is the label among the k highest logits."""
    top = np.argpartition(-logits, kth=min(k, logits.shape[1] - 1), axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def preprocess_all(pre, files: list[Path], progress: bool, desc: str) -> list:
    """pre.pixels() of every file, in order; threads overlap decoding and resizing (OpenCV and PIL release the GIL)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(pre.pixels, files), total=len(files), desc=desc, disable=not progress, leave=False))


def resolve_indices(n_total: int, limit: int | None = None, indices=None) -> list[int]:
    """Dataset indices to evaluate: `indices` as given (validated), else the first `limit`, else all."""
    from sensq.errors import SensqError

    if indices is not None:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n_total]
        if bad:
            raise SensqError(f"sample index {bad[0]} outside the evaluation set of {n_total}", "pass indices in range")
        if len(set(idx)) != len(idx):
            raise SensqError("duplicate sample indices", "pass each sample once (use weights for resampling)")
    else:
        idx = list(range(n_total if limit is None else max(0, min(int(limit), n_total))))
    if not idx:
        raise SensqError("nothing to evaluate (limit=0, no indices or empty dataset)", "use limit >= 1")
    return idx
