"""A model's latency relative to its FP32 reference, measured in interleaved rounds on the same machine.

Shared machines drift in speed by tens of percent over seconds to minutes. Timing the model and the reference in
alternating rounds and taking the median of the per-round ratios cancels that drift; the interval of that median
(order statistics, >= 95 % coverage) says how well the ratio is known. The model's own median in ms (this run,
this machine) is reported next to it, never rescaled. Deterministic backends (bops, table) give exact ratios.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .base import LatencyBackend, ModelLike, Timer, iqr, median_ci
from .machine import measurement_lock

ROUNDS = 12  # 12 rounds: the median's interval is (3rd, 10th) ratio, coverage 96 %
RUNS_PER_ROUND = 2
# During the search a round is one run of each side: the search-time ratio only ranks plans and picks which ones the
# confirmation stage re-times (12 rounds x 2 runs there); timing took 70 % of a yolov5n trial at 2 runs per round.
SEARCH_RUNS_PER_ROUND = 1


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


CONFIRM_MIN_ROUNDS = 12
CONFIRM_MAX_ROUNDS = 80
CONFIRM_HALF_WIDTH = 0.02  # stop early once every ratio's 95 % interval is within +-2 % of it


def measure_together(backend: LatencyBackend, models: dict, reference: str, seconds: float,
                     runs: int = RUNS_PER_ROUND, seed: int = 0, lock_dir=None, progress: bool = False,
                     min_rounds: int = CONFIRM_MIN_ROUNDS, max_rounds: int = CONFIRM_MAX_ROUNDS,
                     half_width: float = CONFIRM_HALF_WIDTH) -> dict:
    """Ratio of every model in `models` (name -> model) to `models[reference]`, all timed in the same rounds.

    Each round runs every model once untimed and then `runs` times, in a seeded random order; a model's ratio in a round is its median over
    the reference's median in that round, so the whole set shares one moment of the machine (timing plans at their own
    moments, each against its own FP32 rounds, lets drift between those moments pass for a difference). Rounds go on
    until every interval is within `half_width` of its ratio or the time is up, at least `min_rounds`. Returns
    name -> PairedLatency (the reference's own ratio is exactly 1)."""
    from tqdm import tqdm

    names = list(models)
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the models")
    rng = np.random.default_rng(seed)
    timers = {}
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    try:
        for n in names:
            timers[n] = backend.timer(models[n])
        with measurement_lock(lock_dir):
            t0 = time.perf_counter()
            bar = tqdm(total=max_rounds, desc="latency confirm", unit="round", disable=not progress, leave=False)
            for r in range(max_rounds):
                own = {n: [] for n in names}
                for n in rng.permutation(names):
                    timers[n]()  # untimed: the first run after another model pays for its caches, not for itself
                    own[n] += [timers[n]() for _ in range(runs)]
                ref = float(np.median(own[reference]))
                for n in names:
                    times[n] += own[n]
                    ratios[n].append(float(np.median(own[n])) / ref)
                bar.update(1)
                done = r + 1
                if done >= min_rounds:
                    per_round = (time.perf_counter() - t0) / done
                    if _within(ratios, half_width) or time.perf_counter() - t0 + per_round > seconds:
                        break
            bar.close()
    finally:
        for t in timers.values():
            t.close()
    ref_times = times[reference]
    return {n: PairedLatency(float(np.median(ratios[n])), median_ci(ratios[n]), float(np.median(times[n])),
                             iqr(times[n]), median_ci(times[n]), float(np.median(ref_times)), iqr(ref_times),
                             backend.unit, backend.name, done, runs,
                             {"round_ratios": [round(x, 5) for x in ratios[n]], "seconds": round(time.perf_counter() - t0, 2)})
            for n in names}


def _within(ratios: dict, half_width: float) -> bool:
    for values in ratios.values():
        lo, hi = median_ci(values)
        mid = float(np.median(values))
        if mid > 0 and (hi - lo) / 2 / mid > half_width:
            return False
    return True
