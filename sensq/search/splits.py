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


def make_split(n: int, confirm: float | int | str | None = None, low: int | None = None, seed: int = 0,
               labels=None) -> Split:
    rng = np.random.default_rng(seed)
    n_confirm = confirm_size(n, confirm)
    order = rng.permutation(n)
    if n_confirm and labels is not None:
        labels = np.asarray(labels)
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2:  # stratified: the confirm part takes the same share of every class
            conf = []
            for c in np.unique(labels):
                members = order[labels[order] == c]
                conf += members[: int(round(len(members) * n_confirm / n))].tolist()
            conf = np.asarray(conf[:n_confirm], np.int64)
        else:
            conf = order[:n_confirm]
    else:
        conf = order[:n_confirm]
    search = order[~np.isin(order, conf)]
    n_search = len(search)
    low = max(n_search // 3, min(32, n_search)) if low is None else max(1, min(int(low), n_search))
    return Split(search.astype(np.int64), np.sort(conf).astype(np.int64), low, seed)
