"""Accuracy / latency Pareto front of a mixed-precision search: CSV, JSON, markdown, PNG and a terminal summary.

Input: the points of sensq.search.results (every full trial and FP32) with their intervals, the front and a summary.
The latency axis is the ratio to FP32 measured in the same interleaved rounds, with its 95 % interval; the measured
time of the model itself (this machine, the run it was measured in) is shown next to it and never rescaled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sensq.reports import plots

CSV_COLUMNS = ["trial", "label", "on_front", "recommended", "metric", "metric_lo", "metric_hi", "d_fp32", "d_fp32_lo",
               "d_fp32_hi", "d_int8", "d_int8_lo", "d_int8_hi", "confirm_metric", "confirm_metric_lo",
               "confirm_metric_hi", "confirm_d_fp32", "confirm_d_fp32_lo", "confirm_d_fp32_hi", "optimism", "ratio",
               "ratio_lo", "ratio_hi", "latency_confirmed", "search_ratio", "search_ratio_lo", "search_ratio_hi",
               "monotone_violation", "latency_value", "latency_iqr", "latency_unit", "fp32_value_same_rounds",
               "latency_date", "machine_id", "float_groups", "n_float_nodes", "method", "percentile", "per_channel",
               "overflow_fix", "source", "gbops", "plan_key", "structure_key"]


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _ci(row: dict, key: str, spec: str = ".4f", signed: bool = False) -> str:
    v = row.get(key)
    if not _ok(v):
        return "-"
    fmt = ("+" if signed else "") + spec
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if _ok(lo) and _ok(hi) else f"{v:{fmt}}"


def _ratio(row: dict) -> str:
    if not _ok(row.get("ratio")):
        return "-"
    lo, hi = row.get("ratio_lo"), row.get("ratio_hi")
    if _ok(lo) and _ok(hi) and lo != hi:
        return f"{row['ratio']:.3f}x [{lo:.3f}, {hi:.3f}]"
    return f"{row['ratio']:.3f}x"


def _search_ratio(row: dict) -> str:
    """The ratio measured during the search, shown next to the confirmed one."""
    return _ratio({"ratio": row.get("search_ratio"), "ratio_lo": row.get("search_ratio_lo"),
                   "ratio_hi": row.get("search_ratio_hi")})


def confirmation_line(summary: dict) -> str | None:
    """How the latency axis was confirmed (search/latency_confirm.py), or why it was not."""
    c = summary.get("latency_confirmation")
    if c is None:
        return None
    line = (f"latency confirmed: {len(c['trials'])} plan(s) re-timed with FP32 and all-INT8 in the same {c['rounds']} "
            f"interleaved rounds ({c['seconds']:.0f} s of a {c['budget']:.0f} s budget); front, recommendation and ms "
            f"come from those rounds (FP32 {c['fp32_ms']:.4g} {summary['latency_unit']})")
    if c.get("skipped"):
        line += f"; {len(c['skipped'])} not re-timed, off the front (pareto.json: latency_confirmation.skipped)"
    return line


def _measured(row: dict) -> str:
    v = row.get("latency_value")
    if not _ok(v):
        return "-"
    iqr = row.get("latency_iqr")
    return f"{v:.4g} ± {iqr:.2g}" if _ok(iqr) and iqr > 0 else f"{v:.4g}"


def _groups(row: dict) -> str:
    g = row.get("float_groups") or []
    return ", ".join(g) if g else "(all INT8)"


def _jsonable(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def confirm_label(summary: dict) -> str:
    """Header of the held-out columns: the search's metric on its confirm split, or (--rank-by agreement) the
    labeled metric the label-free search is confirmed on."""
    other = summary.get("confirm_metric_name")
    return f"{other} (labeled confirm)" if other else f"{summary['metric_name']} (confirm)"


def format_front_summary(front: list[dict], summary: dict, max_rows: int = 15) -> str:
    """Terminal table of the front (cheapest first) and the notes a user needs before picking a point."""
    m, unit = summary["metric_name"], summary["latency_unit"]
    confirm = any(_ok(r.get("confirm_metric")) for r in front)
    retimed = summary.get("latency_confirmation") is not None
    head = (f"{'trial':>5}  {m + ' (search) [95% CI]':<28}  {'vs FP32':<26}"
            + (f"  {confirm_label(summary):<28}" if confirm else "") + f"  {'latency x FP32 [95% CI]':<25}"
            + (f"  {'x FP32 during search':<25}" if retimed else "") + f"  {unit + ' (measured)':<16}  float groups")
    lines = [f"Pareto front: {len(front)} point(s); {m} higher is better, latency lower is better", head, "-" * len(head)]
    for r in front[:max_rows]:
        tag = " *" if r.get("recommended") else ""
        line = f"{('FP32' if r['trial'] < 0 else str(r['trial'])) + tag:>5}  {_ci(r, 'metric'):<28}  {_ci(r, 'd_fp32', signed=True):<26}"
        if confirm:
            line += f"  {_ci(r, 'confirm_metric'):<28}"
        line += f"  {_ratio(r):<25}" + (f"  {_search_ratio(r):<25}" if retimed else "")
        lines.append(line + f"  {_measured(r):<16}  {_groups(r)[:40]}")
    if len(front) > max_rows:
        lines.append(f"... {len(front) - max_rows} more on the front (see pareto.csv)")
    lines += [f"* recommended: {summary['recommendation_rule']}" if summary.get("recommended_trial") is not None
              else f"no recommended point: no front point measurably faster than FP32 is within {summary['max_drop']} of "
                   "FP32 (keep FP32, or raise --max-drop)"]
    lines += summary.get("neighbours", [])
    lines += summary.get("monotone_violations", [])
    if confirmation_line(summary):
        lines.append(confirmation_line(summary))
    if summary.get("scored_by"):
        lines.append(f"accuracy scored by {summary['scored_by']}")
    if summary.get("slower_than_fp32"):
        lines.append(f"float islands cost more than INT8 saves (slower than FP32, interval above 1x): trials "
                     f"{', '.join(map(str, summary['slower_than_fp32']))} (unfused Q/DQ per trial: trials.csv)")
    if summary.get("none_faster_than_fp32"):
        lines.append("no INT8 plan is measurably faster than FP32 on this runtime (every latency interval reaches 1x): "
                     "this front trades accuracy at about FP32 speed; try another --target or keep the model FP32")
    if summary.get("rejected"):
        lines.append(rejected_line(summary["rejected"]))
    if len(summary.get("machines", [])) > 1:
        lines.append(f"latency was measured on {len(summary['machines'])} machines: ratios are paired per machine, "
                     "compare them, not the ms")
    lines.append(f"{summary['distinct_plans']} distinct models scored ({summary['strategy']}), {summary['repeats']} repeated "
                 f"proposals skipped{_model_repeats(summary)}, {summary['pruned']} stopped after {summary['low_fidelity']} of "
                 f"{summary['search_samples']} search samples (~{summary['saved_seconds_estimate']:.0f} s saved); "
                 f"held-out confirm samples: {summary['confirm_samples'] or 'none'}")
    return "\n".join(lines)


def _model_repeats(summary: dict) -> str:
    """Which skipped proposals were new plans that built an already scored model (trials.csv: `repeat_of`)."""
    reps = summary.get("model_repeats") or {}
    if not reps:
        return ""
    shown = ", ".join(f"{a} = {b}" for a, b in list(reps.items())[:6]) + (", ..." if len(reps) > 6 else "")
    return f" ({len(reps)} of them new plans building an already scored model: trial {shown})"


def rejected_line(rejected: dict) -> str:
    """Plans never on the front: stopped by the collapse guard / knob screen before scoring (sensq/guard.py), or
    scored but not compiled or run by the latency runtime."""
    guarded = {n: r for n, r in rejected.items() if r.startswith(("collapse guard", "knob screen"))}
    runtime = {n: r for n, r in rejected.items() if n not in guarded}
    parts = []
    if guarded:
        parts.append(f"the plan guard rejected {len(guarded)} plan(s) before scoring (counted, not scored): trials "
                     f"{', '.join(map(str, guarded))}; first reason: {next(iter(guarded.values()))}")
    if runtime:
        parts.append(f"the latency runtime rejected {len(runtime)} plan(s) (no latency, not on the front): trials "
                     f"{', '.join(map(str, runtime))}; first reason: {next(iter(runtime.values()))}")
    return "; ".join(parts)


def _markdown(rows: list[dict], front: list[dict], summary: dict, png: str) -> str:
    m, unit = summary["metric_name"], summary["latency_unit"]
    mach = summary["machine"]
    lines = ["# Pareto front: accuracy vs latency", "",
             f"{len(front)} point(s) on the front out of {len(rows) - 1} fully scored plans and FP32. Metric: {m} on the "
             f"search split ({summary['search_samples']} samples; held-out confirm split: "
             f"{summary['confirm_samples'] or 'none'}). Intervals are 95 % paired BCa bootstrap intervals over samples "
             f"(1000 resamples), scored by {summary.get('scored_by') or 'onnxruntime'}. Latency: ratio to FP32 timed in interleaved rounds with backend `{summary['latency_backend']}`"
             f" on {mach.get('cpu_model')} ({', '.join(mach.get('isa') or [])}, {mach.get('threads')} threads, "
             f"{mach.get('runtime')} {mach.get('runtime_version')}), 95 % interval of the median ratio; "
             f"'{unit} (measured)' is the model's own median and IQR in the run it was measured in.", "",
             f"Recommended: **trial {summary['recommended_trial']}** — {summary['recommendation_rule']}."
             if summary.get("recommended_trial") is not None else
             f"No recommended point: no front point measurably faster than FP32 is within {summary['max_drop']} of FP32.", "",
             f"![pareto front]({png})", ""]
    cols = ["trial", "label", f"{m} (search)", "Δ vs FP32", "Δ vs all-INT8", confirm_label(summary), "Δ vs FP32 (confirm)",
            "latency x FP32", "x FP32 during search", f"{unit} (measured)", "float groups", "method", "overflow fix"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in front:
        cells = [("FP32" if r["trial"] < 0 else str(r["trial"])) + (" (recommended)" if r.get("recommended") else ""),
                 r.get("label") or "", _ci(r, "metric"), _ci(r, "d_fp32", signed=True), _ci(r, "d_int8", signed=True),
                 _ci(r, "confirm_metric"), _ci(r, "confirm_d_fp32", signed=True), _ratio(r), _search_ratio(r), _measured(r), _groups(r),
                 str(r.get("method") or "-") + (f" p{r['percentile']:g}" if _ok(r.get("percentile")) else ""),
                 str(r.get("overflow_fix") or "-")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Reading it", ""] + [f"- {n}" for n in summary.get("neighbours", [])]
    lines += [f"- {n}" for n in summary.get("monotone_violations", [])]
    if confirmation_line(summary):
        lines.append(f"- {confirmation_line(summary)[0].upper()}{confirmation_line(summary)[1:]}.")
    opt = [r for r in front if _ok(r.get("optimism")) and r["trial"] >= 0]
    if opt:
        lines.append(f"- Optimism (search − confirm) of the front points: mean {np.mean([r['optimism'] for r in opt]):+.4f}, "
                     f"range [{min(r['optimism'] for r in opt):+.4f}, {max(r['optimism'] for r in opt):+.4f}]: the search "
                     "split selected these points, the confirm split did not.")
    lines += [f"- {summary['distinct_plans']} distinct models scored by strategy `{summary['strategy']}`; "
              f"{summary['repeats']} repeated proposals were skipped (not run, not counted){_model_repeats(summary)}; "
              f"{summary['pruned']} plans "
              f"stopped after {summary['low_fidelity']} samples on paired evidence, each at a one-sided family-wise error "
              f"of {100 * summary.get('prune_alpha', 0.01):g} % (Bonferroni over every no-slower trial it was compared "
              "with: trials.csv `pruned_tests`).",
              f"- Hypervolume in (ratio, {m}) against ({summary['hypervolume_ref']['ratio']}, "
              f"{summary['hypervolume_ref']['metric']:.4f}): {summary['hypervolume']:.6f}."]
    if summary.get("rejected"):
        lines.append(f"- {rejected_line(summary['rejected'])} (trials.csv: `rejected`).")
    lines.append("")
    return "\n".join(lines)


def plot_pareto(rows: list[dict], front: list[dict], path: Path, summary: dict) -> Path:
    m = summary["metric_name"]
    fig = plots.new_figure(9, 6)
    ax = fig.add_subplot()
    others = [r for r in rows if not r.get("on_front")]
    if others:
        ax.scatter([r["ratio"] for r in others], [r["metric"] for r in others], s=14, color=plots.COLOR_BACKGROUND,
                   label=f"other plans ({len(others)})", zorder=1)
    x = np.array([r["ratio"] for r in front], np.float64)
    y = np.array([r["metric"] for r in front], np.float64)
    xerr = np.array([[r["ratio"] - (r.get("ratio_lo") if _ok(r.get("ratio_lo")) else r["ratio"]),
                      (r.get("ratio_hi") if _ok(r.get("ratio_hi")) else r["ratio"]) - r["ratio"]] for r in front]).T
    yerr = np.array([[r["metric"] - (r.get("metric_lo") if _ok(r.get("metric_lo")) else r["metric"]),
                      (r.get("metric_hi") if _ok(r.get("metric_hi")) else r["metric"]) - r["metric"]] for r in front]).T
    ax.plot(x, y, drawstyle="steps-post", color=plots.COLOR_FRONT, linewidth=1.0, zorder=2)
    ax.errorbar(x, y, xerr=np.maximum(xerr, 0), yerr=np.maximum(yerr, 0), fmt="o", color=plots.COLOR_FRONT, ms=5,
                capsize=2, elinewidth=0.8, label=f"front, search split ({len(front)}; 95 % intervals)", zorder=3)
    # a labeled confirmation of a label-free search is on another scale: in the table, not on this axis
    conf = [] if summary.get("confirm_metric_name") else [r for r in front if _ok(r.get("confirm_metric"))]
    if conf:
        ax.scatter([r["ratio"] for r in conf], [r["confirm_metric"] for r in conf], s=36, facecolors="none",
                   edgecolors=plots.COLOR_REFERENCE, label="same points, held-out confirm split", zorder=4)
    for r in front:
        text = "FP32" if r["trial"] < 0 else f"#{r['trial']}" + (" recommended" if r.get("recommended") else "")
        ax.annotate(text, (r["ratio"], r["metric"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel(f"latency / FP32 latency (paired rounds, backend {summary['latency_backend']})")
    ax.set_ylabel(f"{m} (up and left is better)")
    ax.set_title(f"{m} vs latency ratio: {summary['distinct_plans']} plans, {summary['strategy']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return plots.save_figure(fig, path)


def write_pareto_report(rows: list[dict], front: list[dict], summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """pareto.csv (all fully scored points, `on_front` marks the front), pareto.json (front rows, summary,
    recommended_trial), pareto.md, pareto.png and front/trial_N.json; prints the terminal summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"pareto.{ext}" for ext in ("csv", "json", "md", "png")}
    frame = pd.DataFrame(rows).drop(columns=["plan"], errors="ignore")
    frame["float_groups"] = [";".join(g or []) for g in frame["float_groups"]]
    frame[[c for c in CSV_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in CSV_COLUMNS]] \
        .to_csv(paths["csv"], index=False)
    doc = {"metric_name": summary["metric_name"], "metric_goal": "maximize", "latency_axis": "ratio to FP32",
           "latency_unit": summary["latency_unit"], "recommended_trial": summary.get("recommended_trial"),
           "summary": summary, "front": front, "points": len(rows)}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(_markdown(rows, front, summary, paths["png"].name), encoding="utf-8")
    plot_pareto(rows, front, paths["png"], summary)
    front_dir = out_dir / "front"
    front_dir.mkdir(exist_ok=True)
    keep = {f"trial_{r['trial']}.json" for r in front if r["trial"] >= 0}
    for f in front_dir.glob("trial_*.json"):
        if f.name not in keep:
            f.unlink()
    for r in front:
        if r["trial"] >= 0:
            (front_dir / f"trial_{r['trial']}.json").write_text(json.dumps(_jsonable(r), indent=1))
    print(format_front_summary(front, summary))
    print(f"outputs in {out_dir}: pareto.png, pareto.md/.csv/.json, trials.csv, front/trial_N.json, sensitivity.md; "
          f"export with: sensq export --workdir {out_dir} [--trial N] -o model.q.onnx")
    return paths
