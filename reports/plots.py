"""Shared matplotlib helpers for the report PNGs.

Figures are built on matplotlib's Agg canvas directly (Figure + FigureCanvasAgg) rather than through pyplot:
nothing needs a display, no global figure registry fills up during a long search, and importing sensq never
switches the backend of a user's notebook.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Colours shared by all reports so "flagged" looks the same everywhere.
COLOR_OK = "#4C72B0"
COLOR_FLAGGED = "#C44E52"  # over the plotted threshold
COLOR_OTHER_FLAG = "#DD8452"  # flagged by another measure (e.g. cosine) while under the plotted threshold
COLOR_BACKGROUND = "#C8C8C8"
COLOR_FRONT = "#C44E52"
COLOR_REFERENCE = "#55A868"

DPI = 100
MAX_FIG_INCHES = 60.0  # keeps a 1000-layer chart from producing a gigapixel image


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(min(width, MAX_FIG_INCHES), min(height, MAX_FIG_INCHES)), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def bar_figure_size(n_bars: int, min_width: float = 8.0, height: float = 5.5, inches_per_bar: float = 0.13) -> tuple[float, float]:
    """Width grows with the number of bars so 60-250 rotated tick labels in a small font stay legible."""
    width = max(min_width, 2.0 + inches_per_bar * n_bars)
    return width, height


def tick_fontsize(n_bars: int) -> float:
    if n_bars <= 30:
        return 8.0
    if n_bars <= 120:
        return 6.5
    return 5.5


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


_OUTPUT_SUFFIX = re.compile(r"_output_\d+$")


def shorten_name(name: str, max_len: int = 32) -> str:
    """Compact tensor name for a tick label.

    `/model.2/m.0/cv1/conv/Conv_output_0` -> `model.2/…/cv1/conv/Conv`; `model.0.conv.weight[Constant]` ->
    `model.0.conv.weight (w)`. The head (the block, e.g. model.2) and the tail (the op) are what tell rows apart,
    so the middle is what gets elided.
    """
    s = str(name)
    is_weight = s.endswith("[Constant]")
    if is_weight:
        s = s[: -len("[Constant]")]
    s = _OUTPUT_SUFFIX.sub("", s.lstrip("/"))
    suffix = " (w)" if is_weight else ""
    budget = max(8, max_len - len(suffix))
    if len(s) > budget:
        parts = s.split("/")
        if len(parts) > 2:
            head = parts[0]
            tail: list[str] = []
            for p in reversed(parts[1:]):
                candidate = "/".join([p] + tail)
                if len(head) + 2 + len(candidate) > budget:
                    break
                tail.insert(0, p)
            s = f"{head}/…/{'/'.join(tail)}" if tail else "…" + s[-(budget - 1):]
        else:
            s = "…" + s[-(budget - 1):]
    return s + suffix


def spans_decades(values, decades: float = 2.0) -> bool:
    """True when the positive finite values span more than `decades` powers of ten (then a log axis reads better)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < 2:
        return False
    return math.log10(v.max() / v.min()) > decades


def plottable(values, log: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Bar heights with inf/NaN/zero made drawable.

    Returns (heights, is_inf mask, bottom, top): inf is drawn at the top of the axis (and marked by the caller),
    NaN as an empty bar, and on a log axis zeros sit at the floor instead of vanishing.
    """
    v = np.asarray(values, dtype=np.float64).copy()
    is_inf = np.isinf(v)
    finite = v[np.isfinite(v)]
    positive = finite[finite > 0]
    if log:
        bottom = positive.min() / 3.0 if positive.size else 1e-6
        top = positive.max() * 3.0 if positive.size else 1.0
    else:
        bottom = 0.0
        top = finite.max() * 1.1 if finite.size and finite.max() > 0 else 1.0
    v[np.isnan(v)] = bottom
    v[is_inf] = top
    if log:
        v = np.maximum(v, bottom)
    return v, is_inf, bottom, top


def empty_chart(path: str | Path, title: str, message: str) -> Path:
    fig = new_figure(6, 3)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)
