"""Scoring a model on any subset of the evaluation set, reusing what was already computed for the same model.

Per-sample results are keyed by the model's bytes (sha256) and the evaluator's signature and kept on disk (npz), so
a model scored on the first third of a split and later on all of it only runs the missing samples, two plans that
build the same model share their results, and nothing grows in memory with the number of models scored.
Evaluators that return no per-sample results (some plugins) are scored on the whole set only (ScalarSamples):
subsets, intervals and pruning are then unavailable, and callers say so.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samples import SampleResults, samples_from_arrays


@dataclass
class ScalarSamples(SampleResults):
    """Only the metric over the whole evaluation set is known."""

    universe: np.ndarray
    scalar: float
    primary: str = ""
    kind: str = "scalar"

    @property
    def indices(self) -> np.ndarray:
        return self.universe

    def metric(self, indices, weights=None) -> np.ndarray:
        idx = np.asarray(indices, np.int64)
        whole = len(idx) == len(self.universe) and np.array_equal(np.sort(idx), np.sort(self.universe))
        rows = 1 if weights is None else np.atleast_2d(weights).shape[0]
        plain = weights is None or np.all(np.asarray(weights) == 1.0)
        return np.full(rows, self.scalar if whole and plain else np.nan)

    def merge(self, other: "ScalarSamples") -> "ScalarSamples":
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"kind": np.array(self.kind), "primary": np.array(self.primary), "idx": self.universe,
                "scalar": np.array(self.scalar)}


def model_hash(model) -> str:
    """sha256 of the serialized model (a ModelProto, bytes or a path)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    else:
        data = Path(model).read_bytes()
    return hashlib.sha256(data).hexdigest()[:24]


def supports_indices(evaluator) -> bool:
    """Scores subsets (per-sample results): an `indices` parameter, unless the evaluator says otherwise (plugins
    set `per_sample` once they know)."""
    if hasattr(evaluator, "per_sample"):
        return bool(evaluator.per_sample)
    try:
        return "indices" in inspect.signature(evaluator.evaluate).parameters
    except (TypeError, ValueError):
        return False


class SampleStore:
    """Per-sample results on disk under root/<evaluator signature hash>/<model hash>.npz, with a small memory cache.

    The memory cache notices when another process sharing the folder replaced a file (e.g. scored the rest of a
    model this process only scored at low fidelity): a changed file is read again."""

    def __init__(self, root: str | Path, evaluator, memory: int = 16, runtime: str = ""):
        """runtime: the scoring runtime when not ONNX Runtime (results of one model differ between runtimes)."""
        sig = getattr(evaluator, "signature", None)
        sig = sig() if callable(sig) else f"{getattr(evaluator, 'name', type(evaluator).__name__)}:{len(evaluator)}"
        self.root = Path(root) / hashlib.sha256((sig + (f"|runtime={runtime}" if runtime else "")).encode()).hexdigest()[:16]
        self.evaluator = evaluator
        self._memory: OrderedDict[str, SampleResults] = OrderedDict()
        self._stamps: dict[str, tuple | None] = {}
        self._limit = memory

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def _stamp(self, key: str) -> tuple | None:
        try:
            st = self._path(key).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def get(self, key: str) -> SampleResults | None:
        stamp = self._stamp(key)
        if key in self._memory and self._stamps.get(key) != stamp:
            del self._memory[key]  # replaced on disk since it was read
        self._stamps[key] = stamp
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if str(arrays["kind"]) == "scalar":
                samples = ScalarSamples(arrays["idx"], float(arrays["scalar"]), str(arrays["primary"]))
            else:
                samples = samples_from_arrays(arrays, self.evaluator)
        except (OSError, ValueError, KeyError):
            return None  # unreadable entry: recomputed and overwritten
        self._remember(key, samples)
        return samples

    def put(self, key: str, samples: SampleResults) -> None:
        self._remember(key, samples)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **samples.to_arrays())
        tmp.replace(self._path(key))  # atomic: a concurrent reader sees the old or the new file, never half of one
        self._stamps[key] = self._stamp(key)

    def _remember(self, key: str, samples: SampleResults) -> None:
        self._memory[key] = samples
        self._memory.move_to_end(key)
        while len(self._memory) > self._limit:
            self._memory.popitem(last=False)


class Scorer:
    """evaluate() on the samples a model has not been scored on yet; returns all its per-sample results."""

    def __init__(self, evaluator, store: SampleStore, universe, busy=None, session_factory=None):
        """busy: a context-manager factory held around each evaluation (the search passes the machine's shared
        evaluation lock, so that no other worker on this machine times a model while this one evaluates).
        session_factory: model -> session of the runtime that scores (default: ONNX Runtime's, by the evaluator)."""
        self.evaluator, self.store = evaluator, store
        self.session_factory = session_factory
        self.busy = busy or contextlib.nullcontext
        self.universe = np.asarray(universe, np.int64)
        self.per_sample = supports_indices(evaluator)
        self.seconds = 0.0

    def score(self, model, key: str, indices=None) -> SampleResults:
        """Per-sample results of `model` (a path, ModelProto, bytes or session; `key` its model hash) covering
        `indices` (default: the universe)."""
        idx = self.universe if indices is None else np.asarray(indices, np.int64)
        have = self.store.get(key)
        if have is not None and (have.has(idx) or not self.per_sample):
            return have
        t0 = time.perf_counter()
        if self.session_factory is not None:
            model = self.session_factory(model)
        if not self.per_sample:
            with self.busy():
                res = self.evaluator.evaluate(model, limit=len(self.universe), progress=False)
            samples = ScalarSamples(self.universe, float(res.value), res.primary)
        else:
            todo = idx if have is None else idx[~np.isin(idx, have.indices)]
            with self.busy():
                res = self.evaluator.evaluate(model, indices=[int(i) for i in todo], progress=False)
            if res.samples is None:
                raise TypeError(f"evaluator {type(self.evaluator).__name__} accepts indices but returned no samples")
            samples = res.samples if have is None else have.merge(res.samples)
        self.seconds += time.perf_counter() - t0
        self.store.put(key, samples)
        return samples
