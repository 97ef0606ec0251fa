"""Accuracy confirmation: FP32, all-INT8 and the front re-scored on samples nothing was selected on.

Two sources of such samples: the search's own confirm split (held out of every trial), or, with --rank-by agreement,
every sample of the labeled evaluator (the trials were ranked label-free on other images).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import SensqError
from ..evaluators.scoring import SampleStore, Scorer

STORE_MEMORY = 4  # per-sample results kept in memory (the rest is read back from the store's files when needed)


def make_scorer(evaluator, samples_dir: Path, runtime: str, n: int, busy, session_factory) -> Scorer:
    """A scorer of the first n samples, its per-sample results stored under samples_dir (kept apart per runtime)."""
    store = SampleStore(samples_dir, evaluator, memory=STORE_MEMORY, runtime=runtime)
    return Scorer(evaluator, store, np.arange(n), busy=busy, session_factory=session_factory)


def labeled_confirm_scorer(evaluator, samples_dir: Path, runtime: str, limit: int | None, busy,
                           session_factory) -> tuple[Scorer, np.ndarray]:
    """--rank-by agreement: the labeled evaluator scores the front on all its samples."""
    n = min(limit or len(evaluator), len(evaluator))
    scorer = make_scorer(evaluator, samples_dir, runtime, n, busy, session_factory)
    if not scorer.per_sample:
        raise SensqError("the labeled evaluator gives no per-sample results, so it cannot confirm the front",
                         "use a built-in evaluator (COCO, YOLO, ImageNet) with --rank-by agreement")
    return scorer, np.arange(n)


def confirm_front(scorer: Scorer, indices: np.ndarray, targets: list, build, fp32_model, progress: bool) -> None:
    """Score every (model hash, plan) target on the indices it lacks; plan None is the FP32 model."""
    if len(indices) == 0:
        return
    for h, plan in tqdm(targets, desc="confirm", unit="model", disable=not progress, leave=False):
        have = scorer.store.get(h)
        if have is None or not have.has(indices):
            scorer.score(fp32_model if plan is None else build(plan), h, indices)
