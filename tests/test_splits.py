"""The search / confirm split (sensq/search/splits.py): exact sizes, and a stratified confirm part that keeps
every class (issue 18.7)."""
from __future__ import annotations

import numpy as np
import pytest

from sensq.search.splits import make_split


@pytest.mark.parametrize("per_class, classes, confirm", [(3, 30, 0.5), (2, 40, 0.5), (5, 17, 0.3), (4, 25, 0.6)])
def test_stratified_confirm_keeps_every_class_in_both_parts(per_class, classes, confirm):
    """Rounding each class's share and truncating in class order left the last classes without confirm samples
    (30 classes x 3: round(1.5) = 2 each, 60 > 45, classes 23-29 got none)."""
    labels = np.repeat(np.arange(classes), per_class)
    n = len(labels)
    s = make_split(n, confirm, seed=3, labels=labels)
    assert len(s.confirm) == int(round(n * confirm)) and len(s.search) + len(s.confirm) == n
    assert sorted(s.search.tolist() + s.confirm.tolist()) == list(range(n))
    assert set(labels[s.confirm]) == set(range(classes))
    assert set(labels[s.search]) == set(range(classes))


def test_stratified_confirm_is_proportional_within_one_sample():
    """Unequal classes: each class's confirm count is within one of its exact share (largest remainder)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(2, 30, 23)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    s = make_split(n, 0.4, seed=1, labels=labels)
    got = np.bincount(labels[s.confirm], minlength=len(counts))
    assert got.sum() == int(round(n * 0.4))
    assert np.all(np.abs(got - counts * got.sum() / n) < 1.0 + 1e-9)
    assert make_split(n, 0.4, seed=1, labels=labels).to_dict() == s.to_dict()  # deterministic with the seed
