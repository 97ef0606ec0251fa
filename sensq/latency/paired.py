"""A model's latency relative to its FP32 reference, measured in interleaved rounds on the same machine.

Shared machines drift in speed by tens of percent over seconds to minutes. Timing the model and the reference in
alternating rounds and taking the median of the per-round ratios cancels that drift; the interval of that median
(order statistics, >= 95 % coverage) says how well the ratio is known. The model's own median in ms (this run,
this machine) is reported next to it, never rescaled. Deterministic backends (bops, table) give exact ratios.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .base import LatencyBackend, ModelLike, Timer, iqr, median_ci
from .machine import measurement_lock

ROUNDS = 12  # 12 rounds: the median's interval is (3rd, 10th) ratio, coverage 96 %
RUNS_PER_ROUND = 2


@dataclass
class PairedLatency:
    ratio: float  # model / reference, median over rounds (exact for deterministic backends)
    ratio_ci: tuple[float, float]
    value: float  # the model's own median in `unit`, measured in these rounds
    value_iqr: float
    value_ci: tuple[float, float]
    ref_value: float  # the reference's median in the same rounds
    ref_iqr: float
    unit: str
    backend: str
    rounds: int
    runs_per_round: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Reference:
    """The FP32 side of paired measurements, prepared once (session kept) and reused for every trial."""

    def __init__(self, backend: LatencyBackend, model: ModelLike):
        self.backend, self.model = backend, model
        self._timer: Timer | None = None
        self._exact = backend.measure(model) if backend.deterministic else None

    @property
    def timer(self) -> Timer:
        if self._timer is None:
            self._timer = self.backend.timer(self.model)
        return self._timer

    @property
    def exact_value(self) -> float | None:
        return None if self._exact is None else self._exact.value

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def measure_paired(backend: LatencyBackend, model: ModelLike, reference: Reference, rounds: int = ROUNDS,
                   runs: int = RUNS_PER_ROUND, lock_dir=None) -> PairedLatency:
    """Ratio of `model` to the reference. Timed backends: `rounds` rounds of `runs` runs of each, alternating."""
    if backend.deterministic:
        res = backend.measure(model)
        ref = reference.exact_value
        ratio = res.value / ref if ref else float("nan")
        return PairedLatency(ratio, (ratio, ratio), res.value, 0.0, (res.value, res.value), ref, 0.0, res.unit,
                             backend.name, 1, 1, {"details": res.details})
    timer = backend.timer(model)
    ref_timer = reference.timer
    own, theirs, ratios = [], [], []
    try:
        with measurement_lock(lock_dir):
            for r in range(rounds):
                # alternate which side runs first, so a slow phase starting mid-round does not always hit the same one
                first, second = (timer, ref_timer) if r % 2 == 0 else (ref_timer, timer)
                a = [first() for _ in range(runs)]
                b = [second() for _ in range(runs)]
                mine, ref = (a, b) if r % 2 == 0 else (b, a)
                own += mine
                theirs += ref
                ratios.append(float(np.median(mine) / np.median(ref)))
    finally:
        timer.close()
    return PairedLatency(float(np.median(ratios)), median_ci(ratios), float(np.median(own)), iqr(own), median_ci(own),
                         float(np.median(theirs)), iqr(theirs), backend.unit, backend.name, rounds, runs,
                         {"round_ratios": [round(x, 5) for x in ratios]})
