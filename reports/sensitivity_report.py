"""Leave-one-out sensitivity report: which layer group, kept in float, recovers the most task accuracy.

Input: one row per layer group with columns `group`, `metric` (task metric with that group float and the rest
INT8), `delta` (metric - all-INT8 metric), optional `output_snr`, `n_nodes`. metric_name / int8_metric /
fp32_metric come from the arguments or, when those are None, from `df.attrs`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from sensq.reports import plots
from sensq.reports.layer_report import fmt_float


def _setting(df: pd.DataFrame, name: str, value):
    return df.attrs.get(name) if value is None else value


def _group_text(group) -> str:
    if isinstance(group, (list, tuple, np.ndarray)):
        return "+".join(str(g) for g in group)
    return str(group)


def rank_groups(df: pd.DataFrame, int8_metric: float | None = None) -> pd.DataFrame:
    """Copy sorted by metric descending (ties keep input order) with a 0-based `rank` column first.

    `delta` is recomputed from int8_metric when given, so the ranking, the text and the chart use one number.
    """
    int8_metric = _setting(df, "int8_metric", int8_metric)
    out = df.drop(columns=["rank"], errors="ignore")  # re-ranking an already ranked frame
    out["metric"] = pd.to_numeric(out["metric"], errors="coerce")
    if int8_metric is not None:
        out["delta"] = out["metric"] - float(int8_metric)
    elif "delta" not in out.columns:
        raise ValueError("need a delta column or int8_metric to rank sensitivity rows")
    out = out.sort_values("metric", ascending=False, kind="mergesort", na_position="last").reset_index(drop=True)
    out.insert(0, "rank", np.arange(len(out)))
    return out


def format_topk(df: pd.DataFrame, k: int, metric_name: str | None = None, int8_metric: float | None = None) -> str:
    """`Top0: float model.24 → mAP50-95 0.2950 (+0.0298 vs all-INT8)`, one line per group, best metric first."""
    metric_name = _setting(df, "metric_name", metric_name) or "metric"
    ranked = rank_groups(df, int8_metric)
    lines = []
    for row in ranked.head(max(0, k)).itertuples(index=False):
        lines.append(f"Top{row.rank}: float {_group_text(row.group)} → {metric_name} {row.metric:.4f} "
                     f"({row.delta:+.4f} vs all-INT8)")
    return "\n".join(lines)


def _md_table(ranked: pd.DataFrame, metric_name: str, has_gap: bool) -> list[str]:
    cols = [("rank", "rank"), ("group", "group kept float"), ("metric", metric_name), ("delta", "Δ vs all-INT8")]
    if has_gap:
        cols.append(("gap_recovered", "FP32 gap recovered"))
    for extra, header in (("output_snr", "output SNR"), ("n_nodes", "nodes")):
        if extra in ranked.columns:
            cols.append((extra, header))
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in ranked.iterrows():
        cells = []
        for col, _ in cols:
            v = row[col]
            if col == "delta":
                cells.append("-" if pd.isna(v) else f"{v:+.4f}")
            elif col == "gap_recovered":
                cells.append("-" if pd.isna(v) else f"{100 * v:.1f} %")
            elif col in ("rank", "n_nodes"):
                cells.append("-" if pd.isna(v) else str(int(v)))
            elif col == "group":
                cells.append(_group_text(v).replace("|", "\\|"))
            else:
                cells.append(fmt_float(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_sensitivity(ranked: pd.DataFrame, path: str | Path, metric_name: str, int8_metric: float,
                     fp32_metric: float | None = None) -> Path:
    if len(ranked) == 0:
        return plots.empty_chart(path, "Layer-group sensitivity", "no groups evaluated")
    n = len(ranked)
    delta = ranked["delta"].to_numpy(dtype=np.float64)
    colors = np.where(delta > 0, plots.COLOR_FLAGGED, plots.COLOR_OK)
    fig = plots.new_figure(*plots.bar_figure_size(n, inches_per_bar=0.22))
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(delta), color=colors, width=0.8)
    ax.axhline(0.0, color="black", linewidth=1.0, label=f"all-INT8 baseline ({metric_name} {int8_metric:.4f})")
    if fp32_metric is not None and math.isfinite(fp32_metric):
        gap = fp32_metric - int8_metric
        ax.axhline(gap, color=plots.COLOR_REFERENCE, linestyle="--", linewidth=1.2,
                   label=f"FP32 gap ({metric_name} {fp32_metric:.4f}, {gap:+.4f})")
    ax.set_xticks(x)
    ax.set_xticklabels([plots.shorten_name(_group_text(g), 24) for g in ranked["group"]], rotation=90,
                       fontsize=plots.tick_fontsize(n))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(f"layer group kept in float (ranked by {metric_name}, most sensitive left)", fontsize=9)
    ax.set_ylabel(f"Δ {metric_name} vs all-INT8 (absolute {metric_name} points)", fontsize=9)
    ax.set_title(f"Leave-one-out sensitivity: {metric_name} gained by keeping one group float", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return plots.save_figure(fig, path)


def write_sensitivity_report(df: pd.DataFrame, out_dir: str | Path, metric_name: str | None = None,
                             int8_metric: float | None = None, fp32_metric: float | None = None,
                             top_k: int = 10) -> dict[str, Path]:
    """Write sensitivity.csv (ranked, with `rank`), sensitivity.md and sensitivity.png into out_dir."""
    metric_name = _setting(df, "metric_name", metric_name) or "metric"
    int8_metric = _setting(df, "int8_metric", int8_metric)
    fp32_metric = _setting(df, "fp32_metric", fp32_metric)
    if int8_metric is None:
        raise ValueError("int8_metric (the all-INT8 score) is required for a sensitivity report")
    int8_metric = float(int8_metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sensitivity.csv", "md": out_dir / "sensitivity.md", "png": out_dir / "sensitivity.png"}

    ranked = rank_groups(df, int8_metric)
    gap = None if fp32_metric is None else float(fp32_metric) - int8_metric
    has_gap = gap is not None and gap != 0 and math.isfinite(gap)
    if has_gap:
        ranked["gap_recovered"] = ranked["delta"] / gap  # share of the FP32-INT8 gap this one group closes

    csv_frame = ranked.copy()
    csv_frame["group"] = [_group_text(g) for g in csv_frame["group"]]
    csv_frame.to_csv(paths["csv"], index=False)

    lines = ["# Layer-group sensitivity (leave-one-out)", ""]
    lines.append(
        f"Each row keeps one layer group in float while every other layer is INT8, and scores the model on "
        f"**{metric_name}** (higher is better). Δ = metric − all-INT8 metric ({int8_metric:.4f}): the accuracy that "
        f"quantizing this group costs. Rows are ranked by metric, rank 0 being the group whose quantization hurts most; "
        f"these are the first candidates to keep in float.")
    if fp32_metric is not None:
        lines.append("")
        lines.append(f"FP32 {metric_name} = {float(fp32_metric):.4f}, so the whole INT8 gap is {gap:+.4f}"
                     + ("; *FP32 gap recovered* is Δ as a share of it." if has_gap else "."))
    lines += ["", f"![sensitivity]({paths['png'].name})", "", f"## Top {min(top_k, len(ranked))}", "", "```",
              format_topk(ranked, top_k, metric_name, int8_metric), "```", "", "## All groups", ""]
    lines += _md_table(ranked, metric_name, has_gap)
    lines.append("")
    paths["md"].write_text("\n".join(lines), encoding="utf-8")

    plot_sensitivity(ranked, paths["png"], metric_name, int8_metric, None if fp32_metric is None else float(fp32_metric))
    return paths
