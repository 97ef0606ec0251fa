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
    per_sample: dict[str, Any] | None = None
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
    """Scores a model. `model` is a path, an onnx.ModelProto, serialized bytes or an ort.InferenceSession."""

    name: str
    primary: str

    def __len__(self) -> int: ...

    def evaluate(self, model, limit: int | None = None, progress: bool = True) -> EvalResult: ...


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
