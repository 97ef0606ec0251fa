"""The study's shared reference: FP32 and all-INT8 scored once by the study's first worker, and every other worker
checked against it (same models; same per-sample values, else a warning naming the machine that differs)."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import SensqError
from . import workers
from .splits import Split

log = logging.getLogger("sensq")


def reference_values(fp32, int8, split: Split) -> dict:
    """Per-sample FP32 and all-INT8 results on the search split and its low-fidelity part."""
    return {name: {"search": r.value(split.search), "low": r.value(split.low_indices)}
            for name, r in (("fp32", fp32), ("int8", int8))}


def reference_doc(fp32, int8, fp32_hash: str, int8_hash: str, split: Split, worker: int) -> dict:
    """What the first worker publishes for the others (scored results `fp32`, `int8`)."""
    return {"fp32_hash": fp32_hash, "int8_hash": int8_hash, **reference_values(fp32, int8, split),
            "by": workers.identity(worker)}


def check_reference(ref: dict, fp32_hash: str, int8_hash: str, mine: dict, study_name: str) -> None:
    """Every worker scores against the same FP32 and all-INT8: the published models, and (with the per-sample store
    on another machine's disk) the same values (`mine`: this worker's reference_values), else say so."""
    if (ref["fp32_hash"], ref["int8_hash"]) != (fp32_hash, int8_hash):
        raise SensqError(f"this worker's FP32/all-INT8 models differ from those of study {study_name}",
                         "run every worker with the same sensq version, model, calibration data and options")
    same = all(np.array_equal(mine[m][k], ref[m][k], equal_nan=True) for m in mine for k in mine[m])
    if not same:
        log.warning("FP32/all-INT8 scored on this machine (%s) differ from the study's (%s, by %s): intervals here use "
                    "this machine's per-sample results; share --cache-dir between workers to make them identical",
                    mine, {"fp32": ref["fp32"], "int8": ref["int8"]}, ref["by"].get("host"))
