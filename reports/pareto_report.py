"""Accuracy / latency Pareto front of a mixed-precision search: CSV, JSON, markdown, PNG and a terminal summary.

Trials maximize `metric` and minimize `latency_ms`. Only COMPLETE trials can be on the front: a pruned trial's
metric was measured on a subset and is not comparable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sensq.reports import plots

FRONT_COLUMNS = ["trial", "label", "metric", "latency_ms", "float_groups", "method", "percentile", "bops"]


def as_group_list(value) -> list[str]:
    """float_groups as a list whether it arrived as a list, a comma/semicolon-joined string or nothing."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, str):
        return [g.strip() for g in value.replace(";", ",").split(",") if g.strip()]
    if isinstance(value, (list, tuple, np.ndarray, set)):
        return [str(g) for g in value]
    return [str(value)]


def _is_complete(state) -> bool:
    # Accept "COMPLETE", "complete" and str(optuna.trial.TrialState.COMPLETE) == "TrialState.COMPLETE".
    return str(state).strip().upper().endswith("COMPLETE")


def _complete_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = df if "state" not in df.columns else df[df["state"].map(_is_complete)]
    metric = pd.to_numeric(rows["metric"], errors="coerce")
    latency = pd.to_numeric(rows["latency_ms"], errors="coerce")
    return rows[np.isfinite(metric) & np.isfinite(latency)]


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated COMPLETE rows (max metric, min latency), sorted by latency ascending.

    A row is dominated if another has metric >= and latency <= with one of them strict. Among exact duplicates
    (same metric and latency) only the lowest trial number is kept.
    """
    rows = _complete_rows(df)
    if rows.empty:
        return rows.iloc[0:0].reset_index(drop=True)
    metric = pd.to_numeric(rows["metric"]).to_numpy(dtype=np.float64)
    latency = pd.to_numeric(rows["latency_ms"]).to_numpy(dtype=np.float64)
    trial = pd.to_numeric(rows["trial"], errors="coerce").to_numpy(dtype=np.float64) if "trial" in rows else np.arange(len(rows), dtype=np.float64)
    trial = np.where(np.isnan(trial), np.inf, trial)
    # Fastest first, best metric first within a latency, lowest trial first within exact duplicates: a sweep that
    # keeps only strict metric improvements then drops exactly the dominated rows and the later duplicates.
    order = np.lexsort((trial, -metric, latency))
    keep, best = [], -math.inf
    for i in order:
        if metric[i] > best:
            keep.append(i)
            best = metric[i]
    return rows.iloc[keep].reset_index(drop=True)


def _jsonable(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _normalized(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    if "float_groups" in out.columns:
        out["float_groups"] = [as_group_list(v) for v in out["float_groups"]]
    return out


def front_to_csv_frame(front: pd.DataFrame) -> pd.DataFrame:
    """List-valued cells joined with ';' so the CSV stays one value per cell."""
    out = _normalized(front)
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
            out[col] = [";".join(str(x) for x in v) if isinstance(v, (list, tuple, np.ndarray)) else v for v in out[col]]
    ordered = [c for c in FRONT_COLUMNS if c in out.columns]
    return out[ordered + [c for c in out.columns if c not in ordered]]


def front_records(front: pd.DataFrame) -> list[dict]:
    out = _normalized(front)
    return [{str(k): _jsonable(v) for k, v in rec.items()} for rec in out.to_dict(orient="records")]


def _fmt(value, spec: str, missing: str = "-") -> str:
    if _is_missing(value):
        return missing
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def _fmt_trial(value) -> str:
    if _is_missing(value):
        return "-"
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return str(value)


def _label(row) -> str:
    value = row.get("label") if hasattr(row, "get") else None
    return "" if _is_missing(value) else str(value)


def format_front_summary(front_df: pd.DataFrame, metric_name: str = "mAP50-95", max_rows: int = 15) -> str:
    """Fixed-width terminal table of the front, fastest first; longer fronts end with a '… N more' line."""
    if front_df.empty:
        return "Pareto front: empty (no COMPLETE trials with a metric and a latency)"
    front = _normalized(front_df)
    header = f"{'trial':>5}  {metric_name:>10}  {'lat ms':>8}  {'#fp':>3}  {'float groups':<34}  {'method':<10}  {'pct':>7}  label"
    lines = [f"Pareto front: {len(front)} trial(s), {metric_name} higher is better, latency lower is better",
             header, "-" * len(header)]
    for _, row in front.head(max_rows).iterrows():
        groups = row.get("float_groups", [])
        text = ",".join(groups) if groups else "(all INT8)"
        if len(text) > 34:
            text = text[:33] + "…"
        method = "" if _is_missing(row.get("method")) else str(row.get("method"))
        lines.append(f"{_fmt_trial(row.get('trial')):>5}  {_fmt(row['metric'], '.4f'):>10}  "
                     f"{_fmt(row['latency_ms'], '.2f'):>8}  {len(groups):>3}  {text:<34}  {method[:10]:<10}  "
                     f"{_fmt(row.get('percentile'), 'g'):>7}  {_label(row)}")
    if len(front) > max_rows:
        lines.append(f"… {len(front) - max_rows} more on the front (see pareto.csv)")
    return "\n".join(lines)


def _markdown(front: pd.DataFrame, n_all: int, n_complete: int, metric_name: str, latency_unit: str,
              references: dict[str, tuple[float, float]], png_name: str) -> str:
    front = _normalized(front)
    has_label = "label" in front.columns and front["label"].map(lambda v: not _is_missing(v) and str(v) != "").any()
    lines = ["# Pareto front: accuracy vs latency", ""]
    lines.append(f"{len(front)} non-dominated trial(s) out of {n_complete} complete ({n_all} in total). A trial is on "
                 f"the front when no other complete trial has both a higher-or-equal {metric_name} and a lower-or-equal "
                 f"latency (one of them strictly). Float groups are the layer groups kept in FP32; the rest is INT8.")
    lines += ["", f"![pareto front]({png_name})", ""]
    cols = ["trial"] + (["label"] if has_label else []) + [metric_name, f"latency ({latency_unit})", "float groups",
                                                           "method", "percentile"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in front.iterrows():
        groups = row.get("float_groups", [])
        cells = [_fmt_trial(row.get("trial"))]
        if has_label:
            cells.append(_label(row))
        cells += [_fmt(row["metric"], ".4f"), _fmt(row["latency_ms"], ".2f"),
                  ", ".join(groups) if groups else "(all INT8)",
                  "-" if _is_missing(row.get("method")) else str(row.get("method")),
                  _fmt(row.get("percentile"), "g")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if references:
        lines += ["", "Reference results (other tools, same metric and latency measurement):", ""]
        for name, (metric, latency) in references.items():
            lines.append(f"- {name}: {metric_name} {metric:.4f} at {latency:.2f} {latency_unit}")
    lines.append("")
    return "\n".join(lines)


def plot_pareto(df: pd.DataFrame, front: pd.DataFrame, path: str | Path, metric_name: str, latency_unit: str,
                references: dict[str, tuple[float, float]]) -> Path:
    fig = plots.new_figure(9, 6)
    ax = fig.add_subplot()
    metric = pd.to_numeric(df["metric"], errors="coerce")
    latency = pd.to_numeric(df["latency_ms"], errors="coerce")
    ok = np.isfinite(metric) & np.isfinite(latency)
    complete = df["state"].map(_is_complete) if "state" in df.columns else pd.Series(True, index=df.index)
    sel = ok & complete
    ax.scatter(latency[sel], metric[sel], s=16, color=plots.COLOR_BACKGROUND, label=f"trials ({int(sel.sum())})", zorder=1)
    sel = ok & ~complete
    if sel.any():
        ax.scatter(latency[sel], metric[sel], s=14, marker="x", color=plots.COLOR_BACKGROUND, alpha=0.7,
                   label=f"pruned / failed ({int(sel.sum())})", zorder=1)
    if len(front):
        ax.plot(front["latency_ms"], front["metric"], drawstyle="steps-post", color=plots.COLOR_FRONT, linewidth=1.2, zorder=2)
        ax.scatter(front["latency_ms"], front["metric"], s=30, color=plots.COLOR_FRONT,
                   label=f"Pareto front ({len(front)})", zorder=3, edgecolors="black", linewidths=0.4)
    if "label" in df.columns:
        for _, row in df[ok].iterrows():
            text = _label(row)
            if text and not _is_complete(row.get("state", "COMPLETE")):
                text += " (pruned: score on the first samples only)"
            if text:
                ax.scatter([row["latency_ms"]], [row["metric"]], s=60, facecolors="none", edgecolors="black", zorder=4)
                ax.annotate(text, (row["latency_ms"], row["metric"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    labelled = {_label(row) for _, row in df.iterrows()} if "label" in df.columns else set()
    drawn = {k: v for k, v in (references or {}).items() if k not in labelled}  # a labelled row is drawn once
    for i, (name, (ref_metric, ref_latency)) in enumerate(drawn.items()):
        ax.scatter([ref_latency], [ref_metric], s=60, marker="D", color=plots.COLOR_REFERENCE, edgecolors="black",
                   linewidths=0.5, zorder=4, label="reference results" if i == 0 else None)
        ax.annotate(name, (ref_latency, ref_metric), textcoords="offset points", xytext=(6, -12), fontsize=8,
                    color="#2F6B3A")
    ax.set_xlabel(f"latency ({latency_unit})")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs latency (up and left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return plots.save_figure(fig, path)


def write_pareto_report(df: pd.DataFrame, out_dir: str | Path, metric_name: str = "mAP50-95", latency_unit: str = "ms",
                        references: dict[str, tuple[float, float]] | None = None) -> dict[str, Path]:
    """Write pareto.csv / pareto.json / pareto.md / pareto.png; references map a name to (metric, latency).

    pareto.json: {"metric_name", "metric_goal": "maximize", "latency_unit", "latency_goal": "minimize",
    "all_trials", "complete_trials", "front": [one record per front row, float_groups as a list],
    "references": {name: {"metric", "latency"}}}.
    """
    references = dict(references or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"pareto.{ext}" for ext in ("csv", "json", "md", "png")}
    front = pareto_front(df)
    # Reference rows (trial < 0, e.g. FP32) may sit on the front but are not trials: do not count them.
    is_trial = pd.to_numeric(df["trial"], errors="coerce").fillna(0) >= 0 if "trial" in df.columns else pd.Series(True, index=df.index)
    n_all, n_complete = int(is_trial.sum()), len(_complete_rows(df[is_trial]))

    front_to_csv_frame(front).to_csv(paths["csv"], index=False)
    doc = {
        "metric_name": metric_name,
        "metric_goal": "maximize",
        "latency_unit": latency_unit,
        "latency_goal": "minimize",
        "all_trials": n_all,
        "complete_trials": int(n_complete),
        "front": front_records(front),
        "references": {name: {"metric": _jsonable(float(m)), "latency": _jsonable(float(lat))}
                       for name, (m, lat) in references.items()},
    }
    paths["json"].write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(_markdown(front, n_all, n_complete, metric_name, latency_unit, references,
                                     paths["png"].name), encoding="utf-8")
    plot_pareto(df, front, paths["png"], metric_name, latency_unit, references)
    return paths
