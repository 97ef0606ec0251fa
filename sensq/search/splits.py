"""The evaluation set, split once: a search part (trials, pruning, sensitivity) and a held-out confirm part (every
front point is re-scored there at the end, so the reported score is not the one it was selected on).

The search part is kept in a fixed random order: its first `low` samples are the low-fidelity subset, a random
sample rather than the first images by file name. Stratified by class where every class has >= 2 samples.

The sensitivity pass ranks groups on the *last* `low` samples of the search part, disjoint from the low-fidelity
prefix whenever the search part holds both: the seeds (top-n groups float) are chosen by that ranking, and a seed
compared with a new trial on the very samples that made it rank first looks better than it is (on yolov5n, 7 of
8 trials stopped by the top-1 seed on shared samples were level with it on the full split).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SensqError

AUTO_CONFIRM_MIN = 400  # evaluation sets at least this large get a held-out part by default
AUTO_CONFIRM_FRACTION = 0.5
AUTO_CONFIRM_MAX = 1000  # ... of at most this many samples (large sets: confirming 2,500 images costs minutes per point)


@dataclass
class Split:
    search: np.ndarray  # dataset indices, in the fixed random order (the low-fidelity subset is a prefix)
    confirm: np.ndarray  # dataset indices, sorted; empty when there is no held-out part
    low: int  # size of the low-fidelity prefix of `search`
    seed: int

    @property
    def low_indices(self) -> np.ndarray:
        return self.search[: self.low]

    @property
    def sensitivity_indices(self) -> np.ndarray:
        """Samples the sensitivity pass scores on: the last `low` of the search part (the prefix if they overlap)."""
        if len(self.search) >= 2 * self.low:
            return self.search[len(self.search) - self.low:]
        return self.low_indices

    def to_dict(self) -> dict:
        return {"search": self.search.tolist(), "confirm": self.confirm.tolist(), "low": self.low, "seed": self.seed}


def confirm_size(n: int, confirm: float | int | str | None) -> int:
    """`--confirm N|FRACTION|auto|0` -> number of held-out samples out of n."""
    if confirm is None or confirm == "auto":
        return min(int(round(n * AUTO_CONFIRM_FRACTION)), AUTO_CONFIRM_MAX) if n >= AUTO_CONFIRM_MIN else 0
    value = float(confirm)
    size = int(round(n * value)) if 0 < value < 1 else int(value)
    if size < 0 or size > n - 2:
        raise SensqError(f"--confirm {confirm} leaves no search samples out of {n}",
                         "give a fraction in (0, 1) or a count smaller than the evaluation set, or 0 to disable")
    return size


def class_shares(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Largest-remainder apportionment of `total` samples over classes of `counts`: each class gets its exact share
    rounded up or down, the sum is exact, ties broken at random (seeded). When there are enough samples on both
    sides, every class keeps at least one sample in each part (a share of 0.6 rounds up to 1, not down to 0)."""
    counts = np.asarray(counts, np.int64)
    quota = counts * total / counts.sum()
    both = total >= len(counts) and counts.sum() - total >= len(counts)
    lo, hi = (np.ones_like(counts), counts - 1) if both else (np.zeros_like(counts), counts)
    take = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    tie = rng.permutation(len(counts)) * 1e-9 / len(counts)  # below any real remainder difference
    while take.sum() != total:  # each step moves one sample to or from the class furthest from its quota
        if take.sum() < total:
            gap = np.where(take < hi, quota - take + tie, -np.inf)
            take[int(np.argmax(gap))] += 1
        else:
            gap = np.where(take > lo, quota - take + tie, np.inf)
            take[int(np.argmin(gap))] -= 1
    return take


def make_split(n: int, confirm: float | int | str | None = None, low: int | None = None, seed: int = 0,
               labels=None) -> Split:
    rng = np.random.default_rng(seed)
    n_confirm = confirm_size(n, confirm)
    order = rng.permutation(n)
    conf = order[:n_confirm]
    if n_confirm and labels is not None:
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2:  # stratified: the confirm part takes the same share of every class
            take = class_shares(counts, n_confirm, rng)
            conf = np.concatenate([order[labels[order] == c][:k] for c, k in zip(classes, take)])
    search = order[~np.isin(order, conf)]
    n_search = len(search)
    low = max(n_search // 3, min(32, n_search)) if low is None else max(1, min(int(low), n_search))
    return Split(search.astype(np.int64), np.sort(conf).astype(np.int64), low, seed)
