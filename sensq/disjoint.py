"""Calibration and evaluation images kept apart: a run that calibrates on the images it scores reports an optimistic
accuracy, so sensq refuses it unless asked (allow_calib_on_eval). Images are matched by resolved path or by
content (sha256), never by file name: a copy under another name is the same image, another image under the same
name is not."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import SensqError
from .pt_export import file_sha256 as _sha256

log = logging.getLogger("sensq")


def calibration_images(cfg) -> list[Path]:
    """The image files calibration reads: the first calibration_step of each image input's list."""
    from .data import list_files

    if cfg.data_free:
        return []
    files: list[Path] = []
    for i, ip in enumerate(cfg.inputs or []):
        if ip.file_type == "img" and ip.data_list_path:
            files += list_files(cfg.resolve(ip.data_list_path), "img", ip.input_name or f"input {i}")[:cfg.calibration_step]
    return files


def shared_images(calib: list[Path], scored: list[Path]) -> int:
    """How many of `calib` are also in `scored` (same resolved path or same bytes). Only files whose sizes match
    one on the other side are hashed, so two disjoint folders cost a stat per file."""
    scored_paths = {Path(p).resolve() for p in scored}
    resolved = [Path(c).resolve() for c in calib]
    by_size: dict[int, list[Path]] = {}
    for p in scored_paths:
        by_size.setdefault(p.stat().st_size, []).append(p)
    same_path = [p for p in resolved if p in scored_paths]
    maybe = [p for p in resolved if p not in scored_paths and p.stat().st_size in by_size]
    hashes = {_sha256(s) for size in {p.stat().st_size for p in maybe} for s in by_size[size]}
    return len(same_path) + sum(_sha256(p) in hashes for p in maybe)


def refuse_overlap(cfg, evaluator, allow: bool) -> None:
    """SensqError when calibration would read images the evaluator scores (unless allowed, then said once)."""
    scored = getattr(getattr(evaluator, "data", None), "files", None)
    if not scored:
        return  # a plugin evaluator that does not list its files: nothing to compare
    n = shared_images(calibration_images(cfg), list(scored))
    if n == 0:
        return
    if allow:
        log.warning("%d calibration image(s) are also scored (allow_calib_on_eval): the accuracy is optimistic", n)
        return
    raise SensqError(f"{n} calibration images are also evaluation images (same file or same content), so the "
                     f"scores would be measured on what calibrated the model",
                     "pass a --calib folder disjoint from --data, or --allow-calib-on-eval to do it anyway")
