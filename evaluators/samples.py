"""Per-sample results of one model, so that any subset or bootstrap resample of the evaluation set can be scored
again without inference: the basis of confidence intervals, held-out confirmation and sound pruning.

Every kind answers `metric(indices, weights)`: the task metric over the dataset samples `indices` (which must have
been evaluated), each counted `weights[b, j]` times, for every row b. Unit weights give the plain metric on that
subset; multinomial weights give bootstrap resamples. The COCO kind re-accumulates pycocotools' per-image matching
(see evaluators/coco/metric.py weighted_map), so a thousand resamples cost seconds, not a thousand COCOeval runs.

On disk (npz, no pickle): `to_arrays()` / `samples_from_arrays(arrays, evaluator)`.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

AGREEMENT = "agreement with FP32 (label-free)"  # the primary of the label-free evaluators (evaluators/agreement.py)
COCO_ALIASES = {AGREEMENT: "mAP50-95", "agreement50": "mAP50"}  # agreement is COCO mAP against FP32's boxes


class SampleResults:
    kind: str = ""
    primary: str = ""

    @property
    def indices(self) -> np.ndarray:
        raise NotImplementedError

    def metric(self, indices, weights=None) -> np.ndarray:
        raise NotImplementedError

    def merge(self, other: "SampleResults") -> "SampleResults":
        raise NotImplementedError

    def to_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def value(self, indices) -> float:
        return float(self.metric(indices)[0])

    def has(self, indices) -> bool:
        return bool(np.isin(np.asarray(indices, np.int64), self.indices).all())


def _weights(indices, weights) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    w = np.ones((1, len(idx))) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    if w.shape[1] != len(idx):
        raise ValueError(f"weights have {w.shape[1]} columns for {len(idx)} samples")
    return idx, w


@dataclass
class MeanSamples(SampleResults):
    """A metric that is the mean of a per-sample score (top-1 correctness, a plugin's per-sample values)."""

    idx: np.ndarray
    scores: dict[str, np.ndarray]  # metric name -> per-sample score aligned with idx
    primary: str = "top1"
    kind: str = "mean"

    @property
    def indices(self) -> np.ndarray:
        return self.idx

    def _cols(self, indices) -> np.ndarray:
        order = np.argsort(self.idx, kind="stable")
        pos = np.searchsorted(self.idx[order], indices)
        if np.any(pos >= len(order)) or np.any(self.idx[order][np.minimum(pos, len(order) - 1)] != indices):
            raise KeyError("some samples were not evaluated")
        return order[pos]

    def metric(self, indices, weights=None, name: str | None = None) -> np.ndarray:
        idx, w = _weights(indices, weights)
        v = self.scores[name or self.primary][self._cols(idx)].astype(np.float64)
        return (w @ v) / w.sum(axis=1)

    def merge(self, other: "MeanSamples") -> "MeanSamples":
        new = ~np.isin(other.idx, self.idx)
        return MeanSamples(np.concatenate([self.idx, other.idx[new]]),
                           {k: np.concatenate([v, other.scores[k][new]]) for k, v in self.scores.items()},
                           self.primary, self.kind)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"kind": np.array(self.kind), "primary": np.array(self.primary), "idx": self.idx,
                **{f"score:{k}": v for k, v in self.scores.items()}}


MATCH_MEMORY = 3  # COCO matchings kept in memory, over all models (~60 MB each at 5,000 images)
_matchings: OrderedDict = OrderedDict()  # (id of a DetectionSamples, digest of its image indices) -> Matches


def _forget_matchings(owner: int) -> None:
    for key in [k for k in _matchings if k[0] == owner]:
        del _matchings[key]


@dataclass
class DetectionSamples(SampleResults):
    """Detections per image (COCO rows [image_id, x, y, w, h, score, category_id]) of one model.

    Scoring a subset needs its matching (pycocotools' evaluate() as arrays): the few most recent ones are kept in
    one memory-bounded cache shared by all models (a search holds many models' results at once), and plain values
    (unit weights) are memoized per object, so evicting a matching rarely means computing it again."""

    gt: object  # evaluators.coco.dataset.GroundTruth
    image_ids: np.ndarray  # dataset index -> COCO image id, for the whole dataset
    rows: dict[int, np.ndarray]  # dataset index -> detection rows of that image
    primary: str = "mAP50-95"
    kind: str = "coco"
    _values: dict = field(default_factory=dict, repr=False)
    _finalizer: object = field(default=None, repr=False)

    @property
    def indices(self) -> np.ndarray:
        return np.fromiter(self.rows, np.int64, len(self.rows))

    def matches(self, indices):
        from .coco.metric import match

        idx = np.unique(np.asarray(indices, np.int64))
        key = (id(self), hashlib.sha1(idx.tobytes()).digest())
        if key in _matchings:
            _matchings.move_to_end(key)
            return _matchings[key], idx
        if self._finalizer is None:  # an id is reused after the object is gone: its matchings go with it
            self._finalizer = weakref.finalize(self, _forget_matchings, id(self))
        dets = np.concatenate([self.rows[int(i)] for i in idx]) if len(idx) else np.zeros((0, 7))
        mt = _matchings[key] = match(self.gt, dets, self.image_ids[idx], all_areas=False)
        while len(_matchings) > MATCH_MEMORY:
            _matchings.popitem(last=False)
        return mt, idx

    def metric(self, indices, weights=None, name: str | None = None) -> np.ndarray:
        if weights is None:  # a plain value: memoized (keyed by the indices as given: repeats count)
            vkey = (hashlib.sha1(np.asarray(indices, np.int64).tobytes()).digest(), name or self.primary)
            if vkey not in self._values:
                self._values[vkey] = self._metric(indices, None, name)
            return self._values[vkey].copy()
        return self._metric(indices, weights, name)

    def _metric(self, indices, weights, name) -> np.ndarray:
        from .coco.metric import weighted_map

        idx, w = _weights(indices, weights)
        mt, uniq = self.matches(idx)
        # weights arrive in the order of `indices`; the matching orders images by COCO id (== dataset index order)
        col = np.zeros((w.shape[0], len(uniq)))
        np.add.at(col.T, np.searchsorted(uniq, idx), w.T)
        by_id = np.argsort(self.image_ids[uniq], kind="stable")
        name = name or self.primary
        return weighted_map(mt, col[:, by_id])[COCO_ALIASES.get(name, name)]

    def merge(self, other: "DetectionSamples") -> "DetectionSamples":
        rows = dict(self.rows)
        rows.update({i: r for i, r in other.rows.items() if i not in rows})
        return DetectionSamples(self.gt, self.image_ids, rows, self.primary, self.kind)

    def to_arrays(self) -> dict[str, np.ndarray]:
        idx = self.indices
        counts = np.array([len(self.rows[int(i)]) for i in idx], np.int64)
        flat = np.concatenate([self.rows[int(i)] for i in idx]) if len(idx) else np.zeros((0, 7))
        return {"kind": np.array(self.kind), "primary": np.array(self.primary), "idx": idx, "counts": counts,
                "rows": flat}


def samples_from_arrays(arrays, evaluator) -> SampleResults:
    kind = str(arrays["kind"])
    if kind == "coco":
        idx, counts = arrays["idx"], arrays["counts"]
        parts = np.split(arrays["rows"], np.cumsum(counts)[:-1]) if len(counts) else []
        gt = evaluator.ground_truth() if hasattr(evaluator, "ground_truth") else evaluator.data.gt
        return DetectionSamples(gt, np.asarray(evaluator.data.image_ids, np.int64),
                                {int(i): p for i, p in zip(idx, parts)}, str(arrays["primary"]))
    if kind == "mean":
        scores = {k[len("score:"):]: arrays[k] for k in arrays if k.startswith("score:")}
        return MeanSamples(arrays["idx"], scores, str(arrays["primary"]))
    raise ValueError(f"unknown per-sample result kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ----------------------------------------------------------------------------------------------------------------

N_BOOT = 1000
LEVEL = 0.95


def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] multiplicities of a resample with replacement of n samples (fixed seed: every model compared on
    the same subset is resampled identically, which is what makes the differences paired)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    return w


def jackknife_weights(n: int, groups: int = 100) -> np.ndarray:
    """[g, n] weights leaving out one group of samples each (delete-a-group jackknife; one sample per group when
    n <= groups), scaled so every row sums to n."""
    g = min(n, groups)
    member = np.arange(n) % g
    w = (member[None, :] != np.arange(g)[:, None]).astype(np.float64)
    return w * (n / w.sum(axis=1, keepdims=True))


def bca_interval(theta: float, draws: np.ndarray, jack: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987). Resampled mAP is biased upwards (duplicated
    images; 206 COCO images: bootstrap mean 0.317 for a value of 0.305), which the plain percentile interval would
    carry into the report; BCa corrects for that bias (z0) and for skew (acceleration from the jackknife)."""
    from statistics import NormalDist

    d = np.asarray(draws, np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0 or not np.isfinite(theta):
        return float("nan"), float("nan")
    nd = NormalDist()
    frac = (np.sum(d < theta) + 0.5 * np.sum(d == theta)) / d.size
    if frac <= 0.0 or frac >= 1.0:  # every resample on one side: no bias estimate possible
        return percentile_interval(d, level)
    z0 = nd.inv_cdf(frac)
    j = np.asarray(jack, np.float64)
    dev = j.mean() - j
    denom = 6.0 * np.sum(dev ** 2) ** 1.5
    a = float(np.sum(dev ** 3) / denom) if denom > 0 else 0.0
    out = []
    for q in (0.5 * (1 - level), 0.5 * (1 + level)):
        z = nd.inv_cdf(q)
        adj = nd.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        out.append(float(np.percentile(d, 100 * adj)))
    return out[0], out[1]


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@dataclass
class Interval:
    value: float
    lo: float
    hi: float

    def to_list(self) -> list[float]:
        return [self.value, self.lo, self.hi]

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


class PairedBootstrap:
    """Bootstrap over one fixed set of samples: metrics with intervals and paired differences between models."""

    def __init__(self, indices, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL):
        self.indices = np.asarray(indices, np.int64)
        self.level = level
        self.w = np.vstack([bootstrap_weights(len(self.indices), n_boot, seed), jackknife_weights(len(self.indices))])
        self.n_boot = n_boot
        self._cache: dict[int, tuple] = {}  # id(samples) -> (value, draws, jackknife), dropped when samples are

    def _draws(self, samples: SampleResults) -> tuple[float, np.ndarray, np.ndarray]:
        key = id(samples)
        if key not in self._cache:
            both = samples.metric(self.indices, self.w)
            self._cache[key] = (samples.value(self.indices), both[:self.n_boot], both[self.n_boot:])
            weakref.finalize(samples, self._cache.pop, key, None)  # a new object may reuse the id later
        return self._cache[key]

    def resampled(self, samples: SampleResults) -> np.ndarray:
        """The metric on each bootstrap resample: the same resamples for every model (paired), e.g. to put an
        interval on a statistic of several models."""
        return self._draws(samples)[1]

    def metric(self, samples: SampleResults) -> Interval:
        value, draws, jack = self._draws(samples)
        return Interval(value, *bca_interval(value, draws, jack, self.level))

    def difference(self, a: SampleResults, b: SampleResults, level: float | None = None) -> Interval:
        """a - b on the same resamples (paired), at `level` (default: this bootstrap's)."""
        va, da, ja = self._draws(a)
        vb, db, jb = self._draws(b)
        return Interval(va - vb, *bca_interval(va - vb, da - db, ja - jb, self.level if level is None else level))
