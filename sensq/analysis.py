"""Per-layer error reports for a workspace: the glue between the quantizer and evaluators/layer_error.py."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .evaluators import layer_error
from .plan import PrecisionPlan
from .reports.layer_report import write_layer_report
from .targets import cpu_needs_reduced_range, get_target

# An input whose observed values reach past this is taken for raw pixels (0-255), not a normalised image.
RAW_PIXEL_MAX = 2.0


def _notes(ws, plan: PrecisionPlan, n: int) -> list[str]:
    notes = [(f"{n} calibration sample(s); plan: method={plan.method}, percentile={plan.percentile}, "
              f"per_channel={plan.per_channel}, target={plan.target}, placement={plan.placement or 'fused'}, "
              f"depthwise inputs per channel={plan.depthwise_per_channel}, bias_correction={plan.bias_correction or 'none'}, "
              f"weight_range={plan.weight_range or 'minmax'}, equalize={ws.cfg.equalize}")]
    notes += plan.notes
    if ws.cfg.data_free:
        notes.append("data-free mode: ranges come from synthetic inputs; flagged rows show where accuracy is lost")
    return notes + input_notes(ws, plan)


def input_notes(ws, plan: PrecisionPlan) -> list[str]:
    """What the first layers see: each model input's observed range and the overflow fix in use on this CPU.

    Whatever the input scale (raw 0-255 pixels or a normalised image), the uint8 codes of an input quantized with
    its min/max span 0-255 densely; on x86 without VNNI onnxruntime's u8s8 kernels saturate their int16 pair sums
    for such codes unless the first layers' weights use 7 bits (overflow_fix first_layer or all).
    """
    target = get_target(plan.target, plan.activation_type)
    fix = plan.overflow_fix or target.overflow_fix
    first = ws.builder.first_layer_weights
    notes = []
    for name in (i.name for i in ws.builder.model.graph.input):
        st = ws.stats.tensors.get(name)
        if st is None or st.count == 0:
            continue
        raw = st.min >= 0 and st.max > RAW_PIXEL_MAX
        notes.append(f"model input `{name}` observed range [{st.min:.4g}, {st.max:.4g}]"
                     + (" (raw 0-255 values: no normalisation before the first layer; its minmax range quantizes "
                        "integer pixels without loss when it spans 0-255)" if raw else ""))
    vnni = "without VNNI: u8s8 kernels can saturate" if cpu_needs_reduced_range() else "with VNNI: no u8s8 saturation"
    notes.append(f"{len(first)} first layer(s) read a model input; overflow_fix={fix} (this CPU {vnni}"
                 + ("; 7-bit weights for those layers" if fix == "first_layer" else "; 7-bit weights everywhere" if fix == "all" else "")
                 + ")")
    return notes


def first_layer_nodes(ws) -> set[str]:
    """Compute nodes whose weight is a first-layer weight (they read a model input, maybe through normalisation)."""
    weights = set(ws.builder.first_layer_weights)
    return {n.name for n in ws.builder.model.graph.node if len(n.input) > 1 and n.input[1] in weights}


def first_layer_note(df: pd.DataFrame, units: dict[str, list[str]], first: set[str], column: str) -> str | None:
    """Where the units holding first layers rank by `column` (1 = worst), so the report says if they are the problem."""
    if df.empty or not first:
        return None
    labels = list(units)
    ranks = df[column].rank(ascending=False, method="min")
    parts = [f"`{labels[i]}` {column} {df[column].iloc[i]:.4g} (rank {int(ranks.iloc[i])} of {len(df)})"
             for i in range(len(df)) if first & set(units[labels[i]])]
    return "first layers (reading a model input): " + "; ".join(parts) if parts else None


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
    tensors = layer_error.region_outputs(ws.builder.model, ws.probe_float_nodes(plan))
    t = time.perf_counter()
    df = layer_error.isolated_errors(ws.builder, plan, units, feeds, ws.builder.model, progress=progress, tensors=tensors)
    seconds = time.perf_counter() - t
    notes = _notes(ws, plan, len(feeds))
    first = first_layer_note(df, units, first_layer_nodes(ws), "Output SNR")
    if first:
        notes.append(first)
    outputs = {o.name for o in ws.builder.model.graph.output}
    where = ("the model outputs" if set(tensors) <= outputs else
             "the inputs of the float head (where the quantized region ends)")
    shown = ", ".join(f"`{x}`" for x in tensors[:6]) + (f" and {len(tensors) - 6} more" if len(tensors) > 6 else "")
    notes.append(f"Output SNR / Cosine measured at {where}: {shown}")
    df = df.sort_values("Output SNR", ascending=False).reset_index(drop=True)
    title = f"{Path(ws.cfg.model_path).name}: isolated per-layer error (one {'layer' if by == 'node' else 'group'} quantized at a time)"
    notes.append(f"{len(units)} unit(s) analysed in {seconds:.1f} s; rows sorted by Output SNR")
    return write_layer_report(df, out_prefix, title, "isolated", notes=notes), seconds
