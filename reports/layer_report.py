"""Per-layer quantization error report (markdown + CSV + PNG) in the column layout of SpacemiT xquant / PPQ.

One row per quantized tensor. The markdown is for people (xquant's table with flagged cells marked), the CSV for
scripts (tuples split into numeric columns, boolean flag columns) and the PNG for spotting the bad layers among
hundreds. All three take their flags from `flagged()` / `cell_flags()` so they always agree.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sensq.evaluators.measure import COSINE_FLAG, SNR_FLAG
from sensq.reports import plots

Kind = Literal["cumulative", "isolated"]

FLAG_MARK = "⚠"


# ---------------------------------------------------------------- formatting

def fmt_float(value, decimals: int = 4) -> str:
    """xquant-style fixed decimals; '-' for a missing value, 'inf' / '-inf' spelled out."""
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{decimals}f}"


def fmt_sig(value, digits: int = 4) -> str:
    """Four significant digits, so small error ratios keep their magnitude (0.0001234, 1.234e-06; never 0.0000)
    and values next to the 0.1 flag threshold stay distinguishable (0.1 vs 0.1001)."""
    text = fmt_float(value)
    if text in ("-", "inf", "-inf"):
        return text
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return text


def _pair_values(value) -> tuple[float, float] | None:
    """(min, max) from a tuple / list / array, or from an 'a,b' string as read back from a file."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        parts = value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")
        if len(parts) != 2:
            return None
        return float(parts[0]), float(parts[1])
    seq = list(np.asarray(value, dtype=np.float64).ravel())
    if len(seq) != 2:
        return None
    return float(seq[0]), float(seq[1])


def fmt_minmax(value) -> str:
    pair = _pair_values(value)
    if pair is None:
        return "-"
    return f"{pair[0]:.3f},{pair[1]:.3f}"


def _hist_values(value) -> list[int] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return [int(float(t)) for t in value.replace(",", " ").split()]
    return [int(c) for c in np.asarray(value).ravel()]


def fmt_hist(value, sep: str = ",") -> str:
    counts = _hist_values(value)
    return "-" if counts is None else sep.join(str(c) for c in counts)


def _fmt_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value)


def _fmt_generic(value) -> str:
    if isinstance(value, (float, np.floating)):
        return fmt_float(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(str(v) for v in np.asarray(value).ravel())
    return _fmt_text(value)


# xquant's column order: (DataFrame column, markdown header, cell formatter). Anything else follows, in df order.
KNOWN_COLUMNS: list[tuple[str, str, Callable]] = [
    ("Op", "Op", _fmt_text),
    ("Var", "Var", _fmt_text),
    ("SNR", "SNR", fmt_sig),
    ("SQNR_dB", "SQNR dB", lambda v: fmt_float(v, 2)),
    ("MSE", "MSE", fmt_sig),
    ("Cosine", "Cosine", fmt_float),
    ("Q.MinMax", "Q.MinMax", fmt_minmax),
    ("F.MinMax", "F.MinMax", fmt_minmax),
    ("F.Hist", "F.Hist", fmt_hist),
]
_KNOWN_NAMES = {c for c, _, _ in KNOWN_COLUMNS}
_OUTPUT_COLUMNS = {"Output SNR": fmt_sig, "Output SQNR_dB": lambda v: fmt_float(v, 2), "Output Cosine": fmt_float}


def ordered_columns(df: pd.DataFrame) -> list[tuple[str, str, Callable]]:
    cols = [spec for spec in KNOWN_COLUMNS if spec[0] in df.columns]
    for c in df.columns:
        if c not in _KNOWN_NAMES:
            cols.append((c, str(c), _OUTPUT_COLUMNS.get(c, _fmt_generic)))
    return cols


# ---------------------------------------------------------------- flags

def cell_flags(df: pd.DataFrame, snr_threshold: float = SNR_FLAG, cosine_threshold: float = COSINE_FLAG) -> dict[str, pd.Series]:
    """Per-column boolean flags: SNR > snr_threshold, Cosine < cosine_threshold, Output SNR > snr_threshold.

    Only columns present in df appear. Missing values (NaN) are never flagged; an inf SNR is.
    """
    out: dict[str, pd.Series] = {}
    for col, over in (("SNR", True), ("Cosine", False), ("Output SNR", True)):
        if col not in df.columns:
            continue
        v = pd.to_numeric(df[col], errors="coerce")
        out[col] = (v > snr_threshold) if over else (v < cosine_threshold)
    return out


def flagged(df: pd.DataFrame, snr_threshold: float = SNR_FLAG, cosine_threshold: float = COSINE_FLAG) -> pd.Series:
    """True for rows with SNR > snr_threshold, Cosine < cosine_threshold or Output SNR > snr_threshold."""
    result = pd.Series(False, index=df.index, dtype=bool)
    for flags in cell_flags(df, snr_threshold, cosine_threshold).values():
        result |= flags.fillna(False).astype(bool)
    return result


# ---------------------------------------------------------------- outputs

def report_paths(prefix: str | Path, kind: Kind = "cumulative") -> dict[str, Path]:
    """`<prefix>.q_report.{md,csv,png}` (cumulative) or `<prefix>.isolated_report.*` (isolated)."""
    stem = "q_report" if kind == "cumulative" else "isolated_report"
    base = str(prefix)  # not Path.with_suffix: prefixes such as "yolov5n.opset13" contain dots
    return {ext: Path(f"{base}.{stem}.{ext}") for ext in ("md", "csv", "png")}


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _plotted_column(df: pd.DataFrame, kind: Kind) -> str | None:
    """The isolated view is about the effect at the model outputs, so it plots Output SNR when it has one."""
    if kind == "isolated" and "Output SNR" in df.columns:
        return "Output SNR"
    return "SNR" if "SNR" in df.columns else None


def _row_name(df: pd.DataFrame, i: int) -> str:
    for col in ("Var", "Op"):
        if col in df.columns and isinstance(df[col].iloc[i], str):
            return df[col].iloc[i]
    return str(df.index[i])


def render_markdown(df: pd.DataFrame, title: str, kind: Kind = "cumulative", snr_threshold: float = SNR_FLAG,
                    cosine_threshold: float = COSINE_FLAG, notes: list[str] | None = None,
                    png_name: str | None = None, worst_n: int = 10) -> str:
    flags = cell_flags(df, snr_threshold, cosine_threshold)
    row_flags = flagged(df, snr_threshold, cosine_threshold)
    snr_t, cos_t = f"{snr_threshold:g}", f"{cosine_threshold:g}"
    db_t = fmt_float(-10 * math.log10(snr_threshold), 1) if snr_threshold > 0 else "inf"

    lines = [f"# {title}", ""]
    lines.append(
        f"**SNR** in this report is the *noise-to-signal power ratio* ||q − f||² / ||f||² between the quantized "
        f"tensor q and its float reference f (the PPQ / xquant definition, not a dB value): 0 is a perfect match, "
        f"lower is better, and rows with SNR > {snr_t} are flagged. **SQNR dB** = −10·log10(SNR) is the same "
        f"quantity in the usual higher-is-better form (SNR {snr_t} ≙ {db_t} dB). **Cosine** is the cosine "
        f"similarity of q and f; rows with Cosine < {cos_t} are flagged. MSE is the mean squared error, Q.MinMax / "
        f"F.MinMax the value ranges of q and f, F.Hist a 32-bin histogram of f. Flagged values are shown as "
        f"**value** {FLAG_MARK}.")
    lines.append("")
    if kind == "isolated":
        lines.append(
            "*Isolated view*: each row quantizes only that layer and runs the rest of the model in float, so a row "
            "shows the error that layer causes on its own. **Output SNR** is the same ratio measured where the "
            "quantized region ends (the inputs of a float head such as a detector's decode, else the model outputs; "
            f"listed below), summed over those tensors; rows with Output SNR > {snr_t} are flagged.")
    else:
        lines.append(
            "*Cumulative view*: the whole model is quantized, so each row's error includes the error propagated "
            "from the layers before it.")
    lines.append("")

    counts = ", ".join(
        f"{col} {'>' if col != 'Cosine' else '<'} {cos_t if col == 'Cosine' else snr_t}: {int(s.fillna(False).sum())}"
        for col, s in flags.items())
    lines.append(f"**{int(row_flags.sum())} of {len(df)} rows flagged**" + (f" ({counts})." if counts else "."))
    lines.append("")
    for note in notes or []:
        lines.append(f"- {note}")
    if notes:
        lines.append("")
    if png_name:
        lines.append(f"![per-layer SNR]({png_name})")
        lines.append("")

    plotted = _plotted_column(df, kind)
    if plotted is not None and len(df):
        values = pd.to_numeric(df[plotted], errors="coerce")
        order = values.sort_values(ascending=False, na_position="last", kind="mergesort").index[:worst_n]
        lines.append(f"## Largest {plotted}")
        lines.append("")
        for idx in order:
            i = df.index.get_loc(idx)
            mark = f" {FLAG_MARK}" if row_flags.iloc[i] else ""
            lines.append(f"- `{_row_name(df, i)}` {plotted} {fmt_sig(values.loc[idx])}{mark}")
        lines.append("")

    columns = ordered_columns(df)
    lines.append("## All rows")
    lines.append("")
    lines.append("|  | " + " | ".join(_md_escape(h) for _, h, _ in columns) + " |")
    lines.append("|" + "---|" * (len(columns) + 1))
    for i in range(len(df)):
        cells = [_md_escape(str(df.index[i]))]
        for col, _, fmt in columns:
            text = _md_escape(fmt(df[col].iloc[i]))
            if col in flags and bool(flags[col].iloc[i]):
                text = f"**{text}** {FLAG_MARK}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def to_csv_frame(df: pd.DataFrame, snr_threshold: float = SNR_FLAG, cosine_threshold: float = COSINE_FLAG) -> pd.DataFrame:
    """Machine-friendly copy: min/max tuples split into numeric columns, F.Hist space-separated, flag columns added."""
    out: dict[str, object] = {}
    for col, _, _ in ordered_columns(df):
        if col in ("Q.MinMax", "F.MinMax"):
            side = col[0]
            pairs = [_pair_values(v) for v in df[col]]
            out[f"{side}.Min"] = [p[0] if p else np.nan for p in pairs]
            out[f"{side}.Max"] = [p[1] if p else np.nan for p in pairs]
        elif col == "F.Hist":
            out[col] = [fmt_hist(v, sep=" ") if _hist_values(v) is not None else "" for v in df[col]]
        else:
            out[col] = list(df[col])
    flags = cell_flags(df, snr_threshold, cosine_threshold)
    no_flag = pd.Series(False, index=df.index)
    # SNR_flag / Cosine_flag are always present so scripts can rely on the schema; False when the measure is absent.
    out["SNR_flag"] = list(flags.get("SNR", no_flag).fillna(False).astype(bool))
    out["Cosine_flag"] = list(flags.get("Cosine", no_flag).fillna(False).astype(bool))
    if "Output SNR" in flags:
        out["Output_SNR_flag"] = list(flags["Output SNR"].fillna(False).astype(bool))
    out["flagged"] = list(flagged(df, snr_threshold, cosine_threshold))
    return pd.DataFrame(out)


def plot_layer_snr(df: pd.DataFrame, path: str | Path, title: str, kind: Kind = "cumulative",
                   snr_threshold: float = SNR_FLAG, cosine_threshold: float = COSINE_FLAG) -> Path:
    """Bar per tensor in execution order; red over the threshold, orange if flagged only by another measure."""
    column = _plotted_column(df, kind)
    if column is None or len(df) == 0:
        return plots.empty_chart(path, title, "no SNR values to plot")
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    n = len(values)
    log = plots.spans_decades(values)
    heights, is_inf, bottom, top = plots.plottable(values, log)
    if log:
        bottom, top = min(bottom, snr_threshold / 3), max(top, snr_threshold * 3)
    else:
        top = max(top, snr_threshold * 1.2)

    over = np.nan_to_num(values, nan=-np.inf) > snr_threshold
    other = flagged(df, snr_threshold, cosine_threshold).to_numpy() & ~over
    colors = np.where(over, plots.COLOR_FLAGGED, np.where(other, plots.COLOR_OTHER_FLAG, plots.COLOR_OK))

    fig = plots.new_figure(*plots.bar_figure_size(n))
    ax = fig.add_subplot()
    x = np.arange(n)
    if log:
        ax.set_yscale("log")
        ax.bar(x, heights - bottom, bottom=bottom, color=colors, width=0.8)
    else:
        ax.bar(x, heights, color=colors, width=0.8)
    ax.set_ylim(bottom, top * (2.0 if log else 1.08))
    for xi in np.flatnonzero(is_inf):
        ax.text(xi, top, "∞", ha="center", va="bottom", fontsize=8, color=plots.COLOR_FLAGGED)
    ax.axhline(snr_threshold, color="black", linestyle="--", linewidth=1.0)

    labels = [plots.shorten_name(_row_name(df, i)) for i in range(n)]
    fs = plots.tick_fontsize(n)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("tensor (execution order)", fontsize=9)
    what = "at model outputs, this layer alone quantized" if column == "Output SNR" else "per tensor"
    ax.set_ylabel(f"{column} = ‖q−f‖² / ‖f‖²  (lower is better{', log scale' if log else ''})", fontsize=9)
    ax.set_title(f"{title} — {column} {what}", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")

    handles = [Line2D([0], [0], color="black", linestyle="--", label=f"flag threshold {column} > {snr_threshold:g}"),
               Patch(color=plots.COLOR_FLAGGED, label=f"{column} > {snr_threshold:g} ({int(over.sum())})")]
    if other.any():
        handles.append(Patch(color=plots.COLOR_OTHER_FLAG, label=f"flagged by another measure ({int(other.sum())})"))
    handles.append(Patch(color=plots.COLOR_OK, label=f"ok ({int((~over & ~other).sum())})"))
    # outside the axes: with hundreds of bars any inside position hides some of them
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    return plots.save_figure(fig, path)


def write_layer_report(df: pd.DataFrame, prefix: str | Path, title: str, kind: Kind = "cumulative",
                       snr_threshold: float = SNR_FLAG, cosine_threshold: float = COSINE_FLAG,
                       notes: list[str] | None = None) -> dict[str, Path]:
    """Write `<prefix>.q_report.{md,csv,png}` (or `.isolated_report.*`) and return {"md":…, "csv":…, "png":…}."""
    if kind not in ("cumulative", "isolated"):
        raise ValueError(f"kind must be 'cumulative' or 'isolated', not {kind!r}")
    paths = report_paths(prefix, kind)
    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    plot_layer_snr(df, paths["png"], title, kind, snr_threshold, cosine_threshold)
    md = render_markdown(df, title, kind, snr_threshold, cosine_threshold, notes, png_name=paths["png"].name)
    paths["md"].write_text(md, encoding="utf-8")
    to_csv_frame(df, snr_threshold, cosine_threshold).to_csv(paths["csv"], index=False)
    return paths
