"""Per-layer error reports for a workspace: the glue between the quantizer and evaluators/layer_error.py."""
from __future__ import annotations

import time
from pathlib import Path

from .evaluators import layer_error
from .plan import PrecisionPlan
from .reports.layer_report import write_layer_report


def _notes(ws, plan: PrecisionPlan, n: int) -> list[str]:
    notes = [f"{n} calibration sample(s); plan: method={plan.method}, percentile={plan.percentile}, "
             f"per_channel={plan.per_channel}, target={plan.target}"]
    notes += plan.notes
    if ws.cfg.data_free:
        notes.append("data-free mode: ranges come from synthetic inputs; flagged rows show where accuracy is lost")
    return notes


def cumulative_report(ws, out_prefix: str | Path, plan: PrecisionPlan | None = None, n_samples: int = 8,
                      progress: bool = True) -> dict[str, Path]:
    plan = plan or ws.base_plan
    feeds = ws.samples(n_samples)
    df = layer_error.cumulative_errors(ws.builder.model, ws.build(plan), feeds, progress=progress)
    title = f"{Path(ws.cfg.model_path).name}: cumulative per-layer quantization error"
    return write_layer_report(df, out_prefix, title, "cumulative", notes=_notes(ws, plan, len(feeds)))


def isolated_report(ws, out_prefix: str | Path, plan: PrecisionPlan | None = None, n_samples: int = 8,
                    by: str = "node", depth: int = 1, progress: bool = True) -> tuple[dict[str, Path], float]:
    plan = plan or ws.base_plan
    feeds = ws.samples(n_samples)
    units = layer_error.compute_units(ws.graph, plan, by=by, depth=depth)
    t = time.perf_counter()
    df = layer_error.isolated_errors(ws.builder, plan, units, feeds, ws.builder.model, progress=progress)
    seconds = time.perf_counter() - t
    df = df.sort_values("Output SNR", ascending=False).reset_index(drop=True)
    title = f"{Path(ws.cfg.model_path).name}: isolated per-layer error (one {'layer' if by == 'node' else 'group'} quantized at a time)"
    notes = _notes(ws, plan, len(feeds)) + [f"{len(units)} unit(s) analysed in {seconds:.1f} s; rows sorted by Output SNR"]
    return write_layer_report(df, out_prefix, title, "isolated", notes=notes), seconds
