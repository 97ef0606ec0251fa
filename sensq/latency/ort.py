"""ONNX Runtime CPU wall time with a fixed thread count, spin-waiting off by default."""
from __future__ import annotations

import gc
import math
import os
import time
from typing import Any

import numpy as np

from ..errors import SensqError
from ..runtime import DEFAULT_THREADS, make_session, session_options
from .base import LatencyResult, ModelLike, construct, iqr, parse_kv, register_latency_backend

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def random_inputs(model_or_session, seed: int = 0, input_shapes: dict[str, list[int]] | None = None,
                  threads: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random feeds shaped from the model inputs (symbolic dims -> 1 unless given in `input_shapes`).

    Floats in [0, 1) (image-like), uint8 in [0, 256), other integers in [0, 10), bools 50/50."""
    session = make_session(model_or_session, threads=threads)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise SensqError(f"model input {inp.name!r} has type {inp.type}, which the latency backend cannot generate",
                             "use --latency bops, cmd:... or table:... for this model")
        given = (input_shapes or {}).get(inp.name)
        shape = [int(v) for v in given] if given is not None else [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, 256 if dtype is np.uint8 else 10, size=shape).astype(dtype)
    return feeds


def _relative_iqr(values) -> float:
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return float((p75 - p25) / p50) if p50 > 0 else 0.0


class _SessionTimer:
    """One `session.run` per call, in ms, with the garbage collector paused while timing."""

    def __init__(self, session, feeds):
        self.session, self.feeds = session, feeds

    def __call__(self) -> float:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a timed run adds jitter that has nothing to do with the model
        try:
            start = time.perf_counter_ns()
            self.session.run(None, self.feeds)
            return (time.perf_counter_ns() - start) / 1e6
        finally:
            if gc_was_enabled:
                gc.enable()

    def close(self) -> None:
        self.session = None


@register_latency_backend("ort")
class OrtLatency:
    """ONNX Runtime CPU inference time with a fixed thread count.

    measure(): after `warmup` runs, the repeats are split into `blocks` consecutive blocks; the value is the median
    of the block medians, so a burst of load from another process spoils a block or two rather than the result.
    While the block medians disagree by more than `tolerance` (IQR / median), more blocks are added, up to
    `max_blocks` and `max_seconds`. Repeats: at least `min_repeats` and `min_seconds` of measurement. The spread is
    the IQR of all single runs, the interval the order-statistic 95 % interval of their median.
    timer(): one run of a kept session per call, for paired measurement against FP32 (sensq.latency.paired).
    `spinning` is off by default: ORT's spin-waiting worker threads are a little faster on idle cores but collapse
    when another process competes for them (YOLOv5n, 2 threads on 2 cores under load: ~145 ms and +-140 % run to
    run with spinning, ~55 ms and +-6 % without). Use spinning=true on a dedicated machine to time what a
    deployment with ORT defaults sees."""

    name = "ort"
    unit = "ms"
    deterministic = False

    def __init__(self, threads: int | None = None, warmup: int = 5, min_repeats: int = 20, min_seconds: float = 0.5,
                 max_seconds: float = 10.0, blocks: int = 5, max_blocks: int = 10, tolerance: float = 0.05,
                 seed: int = 0, input_shapes: dict[str, list[int]] | None = None, spinning: bool = False):
        if warmup < 0 or min_repeats < 1 or blocks < 1 or min_seconds < 0 or max_seconds <= 0 or tolerance < 0:
            raise SensqError("ort latency options out of range",
                             "use warmup >= 0, min_repeats >= 1, blocks >= 1, min_seconds >= 0, max_seconds > 0, tolerance >= 0")
        if not isinstance(spinning, bool):
            raise SensqError(f"ort option spinning={spinning!r} is not a boolean", "use spinning=true or spinning=false")
        self.threads = int(threads or DEFAULT_THREADS)
        self.warmup, self.min_repeats, self.blocks = int(warmup), int(min_repeats), int(blocks)
        self.max_blocks, self.tolerance = max(int(max_blocks), self.blocks), float(tolerance)
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        self.seed, self.input_shapes, self.spinning = int(seed), input_shapes, spinning

    def session_options(self):
        return session_options(self.threads, self.spinning)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "OrtLatency":
        return construct(cls, **{**parse_kv(arg, cls.name), **opts})

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        return {"backend": self.name, "unit": self.unit, "threads": self.threads, "spinning": self.spinning,
                "onnxruntime": onnxruntime.__version__}

    def timer(self, model: ModelLike) -> _SessionTimer:
        session = make_session(model, options=self.session_options())
        timer = _SessionTimer(session, random_inputs(session, self.seed, self.input_shapes))
        for _ in range(max(1, self.warmup)):
            timer()
        return timer

    def measure(self, model: ModelLike) -> LatencyResult:
        t0 = time.perf_counter()
        session = make_session(model, options=self.session_options())
        create_ms = (time.perf_counter() - t0) * 1e3
        timed = _SessionTimer(session, random_inputs(session, self.seed, self.input_shapes))
        warm = [timed() for _ in range(max(1, self.warmup))]
        per_run_s = max(float(np.median(warm[1:] if len(warm) > 1 else warm)) / 1e3, 1e-6)  # first run allocates
        wanted = max(self.min_repeats, math.ceil(self.min_seconds / per_run_s))
        wanted = min(wanted, max(self.min_repeats, int(self.max_seconds / per_run_s)))
        per_block = max(1, math.ceil(wanted / self.blocks))
        t_measure = time.perf_counter()
        block_samples = [[timed() for _ in range(per_block)] for _ in range(self.blocks)]
        while (len(block_samples) < self.max_blocks and time.perf_counter() - t_measure < self.max_seconds
               and _relative_iqr([np.median(b) for b in block_samples]) > self.tolerance):
            block_samples.append([timed() for _ in range(per_block)])
        samples = [s for block in block_samples for s in block]
        block_medians = [float(np.median(b)) for b in block_samples]
        result = LatencyResult.from_samples(samples, self.unit, self.name, threads=self.threads, spinning=self.spinning,
                                            warmup=len(warm), blocks=len(block_samples), per_block=per_block,
                                            block_agreement=round(_relative_iqr(block_medians), 4),
                                            block_medians_ms=[round(m, 4) for m in block_medians],
                                            min_ms=float(min(samples)), measure_seconds=round(time.perf_counter() - t_measure, 3),
                                            session_create_ms=round(create_ms, 2),
                                            load_avg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        result.value = float(np.median(block_medians))  # robust to a spoiled block; spread and interval from all runs
        result.spread = iqr(samples)
        return result
