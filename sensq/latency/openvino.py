"""OpenVINO CPU inference time with a fixed thread count (optional extra `openvino`).

    make_latency_backend("openvino")                       CPU plugin, f32 inference precision, unit ms
    make_latency_backend("openvino:threads=2,precision=bf16")

The model (FP32 or QDQ ONNX) is compiled for the CPU plugin (sensq.runtime_openvino: one stream, LATENCY hint, no
CPU pinning, inference precision f32 unless precision= says otherwise), warmed up, and timed one synchronous infer
per call with the inputs set once. measure() uses the same block scheme and options as the `ort` backend, so the two
runtimes' numbers are comparable; timer() serves paired rounds against FP32 (sensq.latency.paired).
Importing this module never needs openvino; constructing the backend without it raises a SensqError.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from ..errors import SensqError
from ..runtime import DEFAULT_THREADS
from .base import LatencyResult, ModelLike, construct, iqr, parse_kv, register_latency_backend
from .ort import _SessionTimer, random_inputs


def _relative_iqr(values) -> float:
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return float((p75 - p25) / p50) if p50 > 0 else 0.0


def measure_in_blocks(timed, unit: str, backend: str, warmup: int = 5, min_repeats: int = 20, min_seconds: float = 0.5,
                      max_seconds: float = 10.0, blocks: int = 5, max_blocks: int = 10, tolerance: float = 0.05,
                      **details) -> LatencyResult:
    """Time `timed()` (one run per call, in `unit`) in blocks: the value is the median of the block medians (a burst
    of load spoils a block, not the result); blocks are added while their medians disagree by more than `tolerance`
    (IQR / median), up to `max_blocks` and `max_seconds`. Spread and interval are those of all single runs."""
    warm = [timed() for _ in range(max(1, warmup))]
    per_run = max(float(np.median(warm[1:] if len(warm) > 1 else warm)) / 1e3, 1e-6)  # seconds; the first run allocates
    wanted = max(min_repeats, math.ceil(min_seconds / per_run))
    wanted = min(wanted, max(min_repeats, int(max_seconds / per_run)))
    per_block = max(1, math.ceil(wanted / blocks))
    t0 = time.perf_counter()
    block_samples = [[timed() for _ in range(per_block)] for _ in range(blocks)]
    while (len(block_samples) < max_blocks and time.perf_counter() - t0 < max_seconds
           and _relative_iqr([np.median(b) for b in block_samples]) > tolerance):
        block_samples.append([timed() for _ in range(per_block)])
    samples = [s for block in block_samples for s in block]
    medians = [float(np.median(b)) for b in block_samples]
    result = LatencyResult.from_samples(
        samples, unit, backend, warmup=len(warm), blocks=len(block_samples), per_block=per_block,
        block_agreement=round(_relative_iqr(medians), 4), block_medians_ms=[round(m, 4) for m in medians],
        min_ms=float(min(samples)), measure_seconds=round(time.perf_counter() - t0, 3),
        load_avg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None, **details)
    result.value = float(np.median(medians))
    result.spread = iqr(samples)
    return result


class _InferRequest:
    """An OpenVINO infer request with its inputs set once, run like a session: one synchronous infer per run()."""

    def __init__(self, compiled, feeds: dict[str, np.ndarray]):
        self.request = compiled.create_infer_request()
        self._feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}  # kept alive: the request shares them
        for name, value in self._feeds.items():
            self.request.set_tensor(name, _tensor(value))

    def run(self, _output_names, _feeds) -> None:
        self.request.infer()


def _tensor(value: np.ndarray):
    import openvino

    return openvino.Tensor(value, shared_memory=True)


@register_latency_backend("openvino")
class OpenVinoLatency:
    """OpenVINO CPU plugin inference time: options as the `ort` backend, plus precision (f32, bf16, f16) and streams."""

    name = "openvino"
    unit = "ms"
    deterministic = False

    def __init__(self, threads: int | None = None, warmup: int = 5, min_repeats: int = 20, min_seconds: float = 0.5,
                 max_seconds: float = 10.0, blocks: int = 5, max_blocks: int = 10, tolerance: float = 0.05,
                 seed: int = 0, input_shapes: dict[str, list[int]] | None = None, precision: str = "f32", streams: int = 1):
        from ..runtime_openvino import PRECISIONS, require_openvino

        require_openvino()
        if warmup < 0 or min_repeats < 1 or blocks < 1 or min_seconds < 0 or max_seconds <= 0 or tolerance < 0 or streams < 1:
            raise SensqError("openvino latency options out of range",
                             "use warmup >= 0, min_repeats >= 1, blocks >= 1, streams >= 1, min_seconds >= 0, max_seconds > 0, tolerance >= 0")
        if precision not in PRECISIONS:
            raise SensqError(f"openvino precision {precision!r} not supported", f"use one of: {', '.join(PRECISIONS)}")
        self.threads = int(threads or DEFAULT_THREADS)
        self.block_options = {"warmup": int(warmup), "min_repeats": int(min_repeats), "min_seconds": float(min_seconds),
                              "max_seconds": float(max_seconds), "blocks": int(blocks),
                              "max_blocks": max(int(max_blocks), int(blocks)), "tolerance": float(tolerance)}
        self.seed, self.input_shapes, self.precision, self.streams = int(seed), input_shapes, precision, int(streams)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "OpenVinoLatency":
        return construct(cls, **{**parse_kv(arg, cls.name), **opts})

    def describe(self) -> dict[str, Any]:
        from ..runtime_openvino import device_name, openvino_version

        return {"backend": self.name, "unit": self.unit, "threads": self.threads, "precision": self.precision,
                "streams": self.streams, "openvino": openvino_version(), "device": device_name()}

    def _prepare(self, model: ModelLike) -> tuple[_SessionTimer, float]:
        """One timed infer per call, in ms, garbage collector paused (the ort backend's timer around a request)."""
        from ..runtime_openvino import compile_model

        t0 = time.perf_counter()
        compiled = compile_model(model, self.threads, self.precision, self.streams)
        compile_ms = (time.perf_counter() - t0) * 1e3
        request = _InferRequest(compiled, random_inputs(model, self.seed, self.input_shapes))
        return _SessionTimer(request, None), compile_ms

    def timer(self, model: ModelLike) -> _SessionTimer:
        timed, _ = self._prepare(model)
        for _ in range(max(1, self.block_options["warmup"])):
            timed()
        return timed

    def measure(self, model: ModelLike) -> LatencyResult:
        timed, compile_ms = self._prepare(model)
        try:
            return measure_in_blocks(timed, self.unit, self.name, **self.block_options, threads=self.threads,
                                     precision=self.precision, streams=self.streams, compile_ms=round(compile_ms, 2))
        finally:
            timed.close()
