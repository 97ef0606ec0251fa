"""Layer-group sensitivity report: which group, kept in float, recovers the most task accuracy (csv, md, png, top-k).

Input: a sensq.sensitivity.SensitivityResult. Its `ranked` table is the one ranking (metric-scored groups by gain,
then proxy-only groups by proxy SNR); this module only presents it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sensq.reports import plots


def _num(v, spec: str) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(x) else format(x, spec)


def format_topk(result, k: int) -> str:
    """`Top0: float model.24 → mAP50-95 0.2950 (+0.0298 vs all-INT8)`, one line per group, most sensitive first;
    proxy-only groups say so."""
    lines = []
    for row in result.ranked.head(max(0, k)).itertuples(index=False):
        if row.scored_by == "metric":
            lines.append(f"Top{row.rank}: float {row.group} → {result.metric_name} {row.metric:.4f} "
                         f"({row.delta:+.4f} vs all-INT8)")
        else:
            lines.append(f"Top{row.rank}: float {row.group} → not scored by {result.metric_name} "
                         f"(proxy SNR {row.proxy_snr:.3g})")
    return "\n".join(lines)


def _md_table(ranked, metric_name: str, gap: float | None) -> list[str]:
    header = ["rank", "group kept float", metric_name, "Δ vs all-INT8"]
    header += (["FP32 gap recovered"] if gap else []) + ["proxy SNR", "proxy SQNR dB", "scored by", "nodes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in ranked.iterrows():
        cells = [str(int(r["rank"])), str(r["group"]).replace("|", "\\|"), _num(r["metric"], ".4f"),
                 _num(r["delta"], "+.4f")]
        if gap:
            cells.append(_num(100 * r["delta"] / gap, ".1f") + (" %" if np.isfinite(r["delta"]) else ""))
        cells += [_num(r["proxy_snr"], ".3g"), _num(r["proxy_sqnr_db"], ".1f"), str(r["scored_by"]), str(int(r["n_nodes"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_sensitivity(result, path: str | Path) -> Path:
    ranked = result.ranked
    scored = ranked[ranked["scored_by"] == "metric"]
    if len(scored) == 0:
        return plots.empty_chart(path, "Layer-group sensitivity", "no group scored by the task metric")
    n = len(scored)
    delta = scored["delta"].to_numpy(dtype=np.float64)
    fig = plots.new_figure(*plots.bar_figure_size(n, inches_per_bar=0.22))
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(delta), color=np.where(delta > 0, plots.COLOR_FLAGGED, plots.COLOR_OK), width=0.8)
    ax.axhline(0.0, color="black", linewidth=1.0, label=f"all-INT8 ({result.metric_name} {result.int8_metric:.4f})")
    gap = result.fp32_metric - result.int8_metric
    if math.isfinite(gap):
        ax.axhline(gap, color=plots.COLOR_REFERENCE, linestyle="--", linewidth=1.2,
                   label=f"FP32 gap ({result.metric_name} {result.fp32_metric:.4f}, {gap:+.4f})")
    ax.set_xticks(x)
    ax.set_xticklabels([plots.shorten_name(str(g), 24) for g in scored["group"]], rotation=90, fontsize=plots.tick_fontsize(n))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel(f"layer group kept in float (most sensitive left; {len(ranked) - n} proxy-only groups not shown)", fontsize=9)
    ax.set_ylabel(f"Δ {result.metric_name} vs all-INT8 ({result.n_samples} samples)", fontsize=9)
    ax.set_title(f"Leave-one-out sensitivity: {result.metric_name} gained by keeping one group float", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return plots.save_figure(fig, path)


def write_sensitivity_report(result, out_dir: str | Path, top_k: int = 10) -> dict[str, Path]:
    """Write sensitivity.csv (ranked, with `rank`), sensitivity.md and sensitivity.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sensitivity.csv", "md": out_dir / "sensitivity.md", "png": out_dir / "sensitivity.png"}
    ranked = result.ranked
    ranked.drop(columns=["model_hash"], errors="ignore").to_csv(paths["csv"], index=False)
    gap = result.fp32_metric - result.int8_metric
    gap = gap if math.isfinite(gap) and gap != 0 else None
    rho = result.proxy_agreement
    m = result.metric_name
    lines = ["# Layer-group sensitivity", "",
             f"Each metric-scored row keeps one layer group in float while every other layer is INT8 and scores the "
             f"model on **{m}** over {result.n_samples} samples (higher is better); Δ = metric − all-INT8 "
             f"({result.int8_metric:.4f}). The proxy is sensq's SNR = ‖q−f‖²/‖f‖² (lower is better; SQNR dB = "
             f"−10·log10 SNR) with only that group quantized, measured where the quantized region ends. "
             + " ".join(result.notes), "",
             f"FP32 {m} = {result.fp32_metric:.4f} on the same samples"
             + (f", so the whole INT8 gap is {gap:+.4f}." if gap else "."), "",
             ("Proxy agreement: Spearman's ρ between proxy SNR and metric gain over the metric-scored groups = "
              f"**{rho:.2f}**" + (" (close to 1: the proxy ranks groups like the metric; near 0 or negative: trust "
                                  "the metric rows only)." if math.isfinite(rho) else ""))
             if math.isfinite(rho) else "Proxy agreement: not computable (fewer than 3 metric-scored groups).",
             "", f"![sensitivity]({paths['png'].name})", "", f"## Top {min(top_k, len(ranked))}", "", "```",
             format_topk(result, top_k), "```", "", "## All groups", ""]
    lines += _md_table(ranked, m, gap)
    lines.append("")
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    plot_sensitivity(result, paths["png"])
    return paths
