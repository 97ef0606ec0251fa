"""The latency protocol: a result with its spread and provenance, the backend interface, and the registry by name.

A backend puts a cost on a (QDQ) ONNX model in its own unit (`ms` for timed backends, `GBOPs` for bops, whatever a
command prints for cmd:). Timed backends also hand out a `Timer` (one timed run per call) so that sensq.latency.paired
can interleave a model with its FP32 reference and report the ratio with an interval; deterministic backends
(bops, table) give exact ratios.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import onnx

from ..errors import SensqError

ModelLike = onnx.ModelProto | str | Path | bytes


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics x_(k), x_(n-k+1) with binomial coverage >= level.

    With fewer values than needed for that coverage (n < 6 at 95 %), the whole range is returned."""
    from math import comb

    x = np.sort(np.asarray(values, np.float64))
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    if n > 1000:  # normal approximation of the binomial; the exact sum below would overflow floats
        k = int(np.floor(n / 2 - 1.959964 * np.sqrt(n) / 2))
    else:
        k, cdf = 0, 0  # largest k with P(Bin(n, 1/2) <= k - 1) <= alpha, in exact integers
        while k < n // 2 and (cdf + comb(n, k)) <= alpha * 2 ** n:
            cdf, k = cdf + comb(n, k), k + 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def iqr(values) -> float:
    p25, p75 = np.percentile(np.asarray(values, np.float64), [25, 75])
    return float(p75 - p25)


@dataclass
class LatencyResult:
    """A cost as measured: median `value` in `unit`, its run-to-run spread (IQR) and a 95 % interval of the median."""

    value: float
    unit: str
    spread: float | None  # IQR of single runs in `unit`; 0 for deterministic backends; None when unknown
    ci: tuple[float, float] | None  # 95 % interval of the median; (value, value) when deterministic
    repeats: int
    backend: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples, unit: str, backend: str, **details) -> "LatencyResult":
        samples = [float(s) for s in samples]
        return cls(float(np.median(samples)), unit, iqr(samples) if len(samples) > 1 else None,
                   median_ci(samples) if len(samples) > 1 else None, len(samples), backend, details)

    @classmethod
    def exact(cls, value: float, unit: str, backend: str, **details) -> "LatencyResult":
        return cls(float(value), unit, 0.0, (float(value), float(value)), 1, backend, details)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Timer(Protocol):
    """One timed run of a prepared model per call, in the backend's unit."""

    def __call__(self) -> float: ...

    def close(self) -> None: ...


@runtime_checkable
class LatencyBackend(Protocol):
    name: str
    unit: str
    deterministic: bool  # True: the same model always costs the same (bops, table); no timing, no spread

    def measure(self, model: ModelLike) -> LatencyResult: ...

    def timer(self, model: ModelLike) -> Timer: ...

    def describe(self) -> dict[str, Any]: ...


_REGISTRY: dict[str, type] = {}


def register_latency_backend(name: str) -> Callable[[type], type]:
    """Class decorator: makes `name` (and `name:...`) a valid latency spec. The class needs a `from_spec(arg, **opts)`."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def available_latency_backends() -> list[str]:
    return sorted(_REGISTRY)


def make_latency_backend(spec: str = "ort", **opts: Any) -> LatencyBackend:
    """Backend from a spec string: `ort`, `ort:threads=2`, `bops`, `cmd:<command>`, `table:<file.csv>`, `openvino`.

    Keyword options override options written in the spec."""
    name, _, arg = (spec or "ort").strip().partition(":")
    cls = _REGISTRY.get(name.strip().lower())
    if cls is None:
        raise SensqError(f"unknown latency backend {name.strip()!r}",
                         f"use one of {', '.join(available_latency_backends())} (e.g. --latency ort or --latency 'cmd:mytool {{model}}')")
    backend = cls.from_spec(arg.strip(), **opts)
    backend.spec = spec or "ort"
    return backend


def coerce(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_kv(arg: str, backend: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SensqError(f"latency option {part!r} of backend {backend!r} is not key=value",
                             f"write options as {backend}:key=value,key=value (e.g. {backend}:threads=2)")
        opts[key.strip()] = coerce(value.strip())
    return opts


def construct(cls: type, *args: Any, **opts: Any):
    """cls(*args, **opts) with unknown option names reported as a user error instead of a TypeError."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"][len(args):]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise SensqError(f"unknown option(s) {', '.join(unknown)} for latency backend {cls.name!r}",
                         f"accepted options: {', '.join(accepted) or 'none'}")
    return cls(*args, **opts)


def load_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    path = Path(model)
    if not path.is_file():
        raise SensqError(f"model file not found: {path}", "check the path given to --model")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf decode errors have unhelpful types
        raise SensqError(f"cannot read ONNX model {path}: {str(e).strip()[:200] or type(e).__name__}",
                         "export the model again or check that the file is a complete .onnx") from e
