"""User evaluator plugins.

A plugin is named as `path/to/file.py:function`, `package.module:function`, or the name of an entry point in the
group `sensq.evaluators` (in pyproject.toml: `[project.entry-points."sensq.evaluators"] mymetric = "pkg.mod:fn"`).
The function takes one of two forms, told apart by the name of its first parameter:

1. Factory -- first parameter `data`:
       def make(data: str, **options) -> Evaluator
   returns an object with `name`, `primary`, `__len__` and `evaluate(model, limit=None, progress=True) -> EvalResult`
   (see sensq.evaluators.base). Use this form to cache preprocessed inputs across the models of a search.

2. Metric function -- first parameter `session` or `model`:
       def score(session, data=None, limit=None) -> dict[str, float]
   receives an onnxruntime.InferenceSession (first parameter named `session`; a thin wrapper that times run() and
   delegates everything else, so do not isinstance-check it) or the model as given to evaluate()
   (named `model`: a path, ModelProto, bytes or session); the keyword arguments `data`, `limit`, `progress` and any
   option are passed only if the function declares them (or **kwargs). It returns metric values; the primary metric
   is `options["primary"]` or else the first key. An optional "n_samples" entry is reported as the sample count.
   Time spent in session.run is measured and reported as inference_seconds.

   Per-sample values: return one number per sample instead -- a 1-D array (or list), whose mean is the metric
   (named `options["primary"]`, default "metric"), or a dict with a "per_sample" entry: an array, or a dict of
   metric name -> array (all of one length, sample i of the data at position i), next to optional plain values.
   The metric is then the mean of the per-sample values, and the plugin gets what the built-in evaluators have:
   bootstrap intervals, paired differences to FP32, pruning on a low-fidelity subset and the held-out confirm
   split. The function still scores every sample on each call (sensq keeps the values and picks subsets); it
   receives limit=None. The search learns the form from one run on the FP32 model (`probe`), reused for its score.
       def score(session, data=None):
           return {"per_sample": np.array([my_score(session, x) for x in load(data)])}
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import sys
import time

import numpy as np
from pathlib import Path
from typing import Any, Callable

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Evaluator, Stopwatch
from sensq.runtime import make_session

ENTRY_POINT_GROUP = "sensq.evaluators"


def installed_plugins() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_from_file(path: Path, func: str) -> Callable:
    if not path.is_file():
        raise SensqError(f"plugin file not found: {path}", "check the file path in path/to/file.py:function")
    mod_name = f"sensq_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise SensqError(f"plugin {path} failed to import: {type(e).__name__}: {str(e)[:200]}",
                         "fix the error in the plugin file") from e
    return _attr(module, func, str(path))


def _attr(module, func: str, where: str) -> Callable:
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        available = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise SensqError(f"plugin function '{func}' not found in {where}",
                         f"use one of: {', '.join(available) or '(no functions defined)'}")
    return fn


def load_plugin(spec: str) -> Callable:
    """The plugin callable named by `file.py:function`, `module:function` or an entry-point name."""
    if ":" in spec:
        target, func = spec.rsplit(":", 1)
        if target.endswith(".py") or "/" in target or "\\" in target:
            return _load_from_file(Path(target), func)
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SensqError(f"plugin module '{target}' cannot be imported: {e}",
                             "pass path/to/file.py:function or install the module") from e
        return _attr(module, func, target)
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if not eps:
        names = installed_plugins()
        raise SensqError(f"unknown evaluator '{spec}'",
                         "use coco, yolo, imagenet, auto, path/to/file.py:function or an installed plugin"
                         + (f" ({', '.join(names)})" if names else ""))
    try:
        return eps[0].load()
    except Exception as e:
        raise SensqError(f"plugin entry point '{spec}' failed to load: {type(e).__name__}: {str(e)[:200]}",
                         f"fix or reinstall the package providing {eps[0].value}") from e


def plugin_form(fn: Callable) -> str:
    """'factory' or 'metric', from the name of the first parameter (see the module docstring)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    if params and params[0] in ("session", "model"):
        return "metric"
    if params and params[0] == "data":
        return "factory"
    raise SensqError(f"plugin {getattr(fn, '__name__', fn)!r}: first parameter must be 'data' (factory) or 'session'/'model' (metric function)",
                     "rename the first parameter, see sensq.evaluators.plugins")


def _accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


class _TimedSession:
    """Delegates to an InferenceSession, adding the time spent in run() to a Stopwatch."""

    def __init__(self, session, watch: Stopwatch):
        self._session, self._watch = session, watch

    def run(self, *args, **kwargs):
        with self._watch:
            return self._session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


class MetricFunctionEvaluator:
    """Wraps a metric function `fn(session_or_model, ...) -> dict[str, float]` as an Evaluator."""

    def __init__(self, fn: Callable, data=None, name: str | None = None, primary: str | None = None, **options):
        self.fn, self.data, self.options = fn, data, options
        self.name = name or getattr(fn, "__name__", "plugin")
        self.primary = primary
        self._n = 0
        self._wants_session = list(inspect.signature(fn).parameters)[0] == "session"
        self.per_sample = False  # True once a call returned per-sample values (see probe)
        self._last: tuple | None = None  # (model key, raw output) of the last call: probe's run is not repeated

    def __len__(self) -> int:
        return self._n

    def probe(self, model) -> bool:
        """Score `model` (the FP32 reference) once and learn whether the plugin returns per-sample values."""
        self.evaluate(model, progress=False)
        return self.per_sample

    def _call(self, model, limit, progress, watch):
        from .scoring import model_hash

        try:
            key = model_hash(model)
        except (TypeError, OSError):
            key = None
        if key is not None and self._last is not None and self._last[0] == key and limit is None:
            return self._last[1]
        arg = _TimedSession(make_session(model), watch) if self._wants_session else model
        kwargs = _accepted_kwargs(self.fn, {"data": self.data, "limit": limit, "progress": progress, **self.options})
        out = self.fn(arg, **kwargs)
        if limit is None:
            self._last = (key, out)
        return out

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        watch = Stopwatch()
        out = self._call(model, None if indices is not None or self.per_sample else limit, progress, watch)
        per = _per_sample(out, self.name)
        if per is not None:
            return self._per_sample_result(per, out, limit, indices, time.perf_counter() - t0, watch.total)
        if indices is not None:
            raise SensqError(f"plugin {self.name} returned one value per model, not per-sample values",
                             "return an array or {'per_sample': array} to score subsets (see sensq.evaluators.plugins)")
        if not isinstance(out, dict) or not out:
            raise SensqError(f"plugin {self.name} returned {type(out).__name__}, not a dict of metrics",
                             "return e.g. {'accuracy': 0.91}, or per-sample values (an array or {'per_sample': array})")
        out = dict(out)
        n = out.pop("n_samples", None)
        try:
            metrics = {str(k): float(v) for k, v in out.items()}
        except (TypeError, ValueError):
            raise SensqError(f"plugin {self.name} returned non-numeric metrics: {out!r}"[:300],
                             "return a dict of metric name -> number") from None
        primary = self.primary or next(iter(metrics))
        if primary not in metrics:
            raise SensqError(f"plugin {self.name} did not return the primary metric '{primary}'",
                             f"return it or choose primary among {', '.join(metrics)}")
        if not math.isfinite(metrics[primary]):
            raise SensqError(f"plugin {self.name} returned {primary}={metrics[primary]}", "return a finite number")
        self.primary = primary
        self._n = int(n) if n is not None else (limit or self._n)
        return EvalResult(metrics=metrics, primary=primary, n_samples=self._n, seconds=time.perf_counter() - t0,
                          inference_seconds=watch.total)


    def _per_sample_result(self, per: dict, out, limit, indices, seconds: float, inference: float) -> EvalResult:
        from .base import resolve_indices
        from .samples import MeanSamples

        n = len(next(iter(per.values())))
        self.per_sample, self._n = True, n
        if "" in per:  # one unnamed array: the primary metric
            per = {self.primary or "metric": per[""]}
        primary = self.primary or next(iter(per))
        if primary not in per:
            raise SensqError(f"plugin {self.name} returned no per-sample '{primary}'",
                             f"return it or choose primary among {', '.join(per)}")
        self.primary = primary
        idx = np.asarray(resolve_indices(n, limit, indices), np.int64)
        scores = {k: v[idx] for k, v in per.items()}
        metrics = {k: float(v.mean()) for k, v in scores.items()}
        plain = {k: v for k, v in out.items() if k != "per_sample"} if isinstance(out, dict) else {}
        return EvalResult(metrics=metrics, primary=primary, n_samples=len(idx), seconds=seconds,
                          inference_seconds=inference, samples=MeanSamples(idx, scores, primary),
                          extra={"plugin_values": plain} if plain else {})


def _per_sample(out, name: str) -> dict[str, np.ndarray] | None:
    """name -> per-sample values from an array or {'per_sample': array | dict}; None for plain metrics."""
    if isinstance(out, dict):
        if "per_sample" not in out:
            return None
        out = out["per_sample"]
    elif not isinstance(out, (list, tuple, np.ndarray)):
        return None
    raw = out if isinstance(out, dict) else {"": out}
    try:
        per = {k: np.asarray(v, np.float64).reshape(-1) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise SensqError(f"plugin {name} returned non-numeric per-sample values", "return an array of numbers") from None
    lengths = {len(v) for v in per.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise SensqError(f"plugin {name} returned per-sample arrays of lengths {sorted(lengths)}",
                         "return one value per sample, every array of the same length")
    if not all(np.isfinite(v).all() for v in per.values()):
        raise SensqError(f"plugin {name} returned non-finite per-sample values", "return finite numbers")
    return per


def make_plugin_evaluator(spec: str, data=None, **options) -> Evaluator:
    """An Evaluator from a plugin (factory form returns it; metric form is wrapped)."""
    fn = load_plugin(spec)
    if plugin_form(fn) == "metric":
        return MetricFunctionEvaluator(fn, data, **options)
    ev = fn(data, **_accepted_kwargs(fn, options))
    missing = [a for a in ("evaluate", "primary") if not hasattr(ev, a)]
    if missing:
        raise SensqError(f"plugin factory {spec} returned {type(ev).__name__} without {', '.join(missing)}",
                         "return an object with name, primary, __len__ and evaluate(model, limit, progress)")
    return ev
