"""Does the search's front reproduce outside sensq? The README job, re-timed independently, twice.

    python bench/bench_front_repro.py [--budget 50] [--runs 2] [--rounds 20] [--keep]

1. Runs the README's main command (`sensq search --model yolov5n.onnx --budget 50 --confirm 0.5`) `--runs` times
   with the same seed, each in its own work directory and a fresh cache (so each costs what a new user pays);
   wall time and peak RSS of each.
2. Exports every front point of each run (`sensq export --trial N`) and re-times them, with FP32 and all-INT8, in a
   fresh process (bench/retime_independent.py: plain onnxruntime, no sensq code on the timing path), `--rounds`
   interleaved rounds, 2 threads, spinning off.
3. Prints per front point the confirmed ratio [95 %], the search-time ratio and the re-timed ratio [IQR], and checks
   the acceptance of issue 17: re-timed inside the confirmed interval widened by 0.03; no front point keeps a
   superset of another's float nodes while shown faster; confirmation <= 60 s, the job <= 8 min; the two runs'
   recommended points agree within their confirmed intervals; no two scored trials share a built model.
Writes bench/results/front_repro.json (every number printed, plus the raw round ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data"))
MODEL = DATA / "models" / "yolov5n.onnx"
WIDEN = 0.03


def run_search(workdir: Path, cache: Path, budget: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "sensq", "search", "--model", str(MODEL), "--budget", str(budget), "--confirm", "0.5",
           "--workdir", str(workdir), "--seed", str(seed), "--quiet"]
    env = {**os.environ, "SENSQ_CACHE": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"search failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(max(rss, before) / 1024, 1), "stdout": proc.stdout[-6000:]}


def export(workdir: Path, cache: Path, trial: int) -> Path:
    out = workdir / "export" / f"trial_{trial}.onnx"
    out.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "sensq", "export", "--workdir", str(workdir), "--trial", str(trial), "-o", str(out)],
                   env={**os.environ, "SENSQ_CACHE": str(cache)}, check=True, capture_output=True, text=True)
    return out


def retime(reference: Path, models: list[Path], rounds: int) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "retime_independent.py"), str(reference),
                           *map(str, models), "--rounds", str(rounds)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def superset_faster(front: list[dict]) -> list[str]:
    out = []
    for a in front:
        for b in front:
            if a is b or a["trial"] < 0 or b["trial"] < 0:
                continue
            fa, fb = set(a["plan"]["float_nodes"]), set(b["plan"]["float_nodes"])
            if fb < fa and a["ratio"] < b["ratio"]:
                out.append(f"trial {a['trial']} keeps a superset of trial {b['trial']}'s float nodes and is shown faster")
    return out


def check_run(workdir: Path, cache: Path, rounds: int) -> dict:
    doc = json.loads((workdir / "pareto.json").read_text())
    summary, front = doc["summary"], doc["front"]
    trials = pd.read_csv(workdir / "trials.csv")
    int8_trial = int(trials.loc[trials["label"] == "all-INT8", "trial"].iloc[0])
    points = [r for r in front if r["trial"] >= 0]
    numbers = sorted({r["trial"] for r in points} | {int8_trial})
    paths = {t: export(workdir, cache, t) for t in numbers}
    timed = retime(MODEL, [paths[t] for t in numbers], rounds)
    rows = []
    pareto = pd.read_csv(workdir / "pareto.csv").set_index("trial")
    for t in numbers:
        r = next((p for p in points if p["trial"] == t), None) or pareto.loc[t].to_dict()
        re = timed["models"][str(paths[t])]
        lo, hi = r["ratio_lo"], r["ratio_hi"]
        rows.append({"trial": t, "on_front": any(p["trial"] == t for p in points), "recommended": bool(r.get("recommended")),
                     "float_groups": r["float_groups"] if isinstance(r["float_groups"], list) else str(r["float_groups"]).split(";"),
                     "confirmed": r["ratio"], "confirmed_lo": lo, "confirmed_hi": hi,
                     "search_ratio": r.get("search_ratio"), "retimed": re["ratio"], "retimed_iqr": re["iqr"],
                     "retimed_ci": re["ci"], "retimed_ms": re["ms"], "confirmed_ms": r.get("latency_value"),
                     "inside": lo - WIDEN <= re["ratio"] <= hi + WIDEN, "round_ratios": re["round_ratios"]})
    scored = trials["repeat_of"].isna() & ~trials["pruned"] & trials["model_hash"].notna() & (trials["source"] != "sensitivity")
    hashes = trials.loc[scored, "model_hash"]  # warm-start entries reuse the sensitivity pass's models by design
    return {"rows": rows, "fp32_ms_retimed": timed["models"][str(MODEL)]["ms"], "onnxruntime": timed["onnxruntime"],
            "superset_faster": superset_faster(front), "confirm_seconds": summary["stage_seconds"].get("latency confirm"),
            "latency_confirmation": summary.get("latency_confirmation"), "recommended_trial": summary.get("recommended_trial"),
            "duplicate_models": int(hashes.duplicated().sum()), "scored_models": int(len(hashes))}


def print_run(i: int, run: dict) -> None:
    print(f"\nrun {i}: {run['seconds'] / 60:.1f} min, peak RSS {run['peak_rss_mb']:.0f} MB, latency confirmation "
          f"{run['confirm_seconds']} s, FP32 re-timed {run['fp32_ms_retimed']:.2f} ms; recommended trial {run['recommended_trial']}")
    print(f"{'trial':>6} {'front':>5}  {'confirmed [95%]':<24} {'search':>7}  {'re-timed [IQR]':<24} {'inside±0.03':>11}  float groups")
    for r in run["rows"]:
        tag = "*" if r["recommended"] else ""
        search = f"{r['search_ratio']:.3f}" if r["search_ratio"] is not None else "-"
        print(f"{str(r['trial']) + tag:>6} {'yes' if r['on_front'] else 'no':>5}  "
              f"{r['confirmed']:.3f} [{r['confirmed_lo']:.3f}, {r['confirmed_hi']:.3f}]{'':<4} {search:>7}  "
              f"{r['retimed']:.3f} [{r['retimed_iqr'][0]:.3f}, {r['retimed_iqr'][1]:.3f}]{'':<4} "
              f"{'yes' if r['inside'] else 'NO':>11}  {', '.join(r['float_groups'])[:50] or '(all INT8)'}")
    print(f"superset shown faster: {run['superset_faster'] or 'none'}; scored models {run['scored_models']}, "
          f"duplicates {run['duplicate_models']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directories (printed)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="front_repro_"))
    runs = []
    for i in range(a.runs):
        workdir, cache = base / f"run{i}", base / f"cache{i}"
        run = run_search(workdir, cache, a.budget, a.seed)
        run.update(check_run(workdir, cache, a.rounds))
        print_run(i, run)
        runs.append(run)
    recs = [next((r for r in run["rows"] if r["recommended"]), None) for run in runs]
    agree = None
    if len(runs) > 1 and all(recs):
        agree = max(r["confirmed_lo"] for r in recs) <= min(r["confirmed_hi"] for r in recs)
        print(f"\nrecommended points: " + "; ".join(f"run {i} trial {r['trial']} {r['confirmed']:.3f} "
                                                 f"[{r['confirmed_lo']:.3f}, {r['confirmed_hi']:.3f}]" for i, r in enumerate(recs))
              + f" -> intervals {'overlap' if agree else 'DO NOT overlap'}")
    fastest_agree = None  # when no run recommends a point (no INT8 plan measurably faster than FP32), the next best check
    if len(runs) > 1:
        fastest = [min((r for r in run["rows"] if r["on_front"]), key=lambda r: r["confirmed"], default=None) for run in runs]
        if all(fastest):
            fastest_agree = max(r["confirmed_lo"] for r in fastest) <= min(r["confirmed_hi"] for r in fastest)
            print("fastest front points: " + "; ".join(f"run {i} trial {r['trial']} {r['confirmed']:.3f} "
                                                       f"[{r['confirmed_lo']:.3f}, {r['confirmed_hi']:.3f}]" for i, r in enumerate(fastest))
                  + f" -> intervals {'overlap' if fastest_agree else 'DO NOT overlap'}")
    ok = {"retimed_inside_widened": all(r["inside"] for run in runs for r in run["rows"] if r["on_front"]),
          "no_superset_faster": not any(run["superset_faster"] for run in runs),
          "confirm_le_60s": all((run["confirm_seconds"] or 0) <= 60 for run in runs),
          "job_le_8min": all(run["seconds"] <= 480 for run in runs),
          "recommended_agree": agree, "fastest_front_agree": fastest_agree, "no_duplicate_models": all(run["duplicate_models"] == 0 for run in runs)}
    print("acceptance:", ", ".join(f"{k} {'yes' if v else 'NO' if v is not None else 'n/a'}" for k, v in ok.items()))
    out = REPO / "bench" / "results" / "front_repro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget": a.budget, "rounds": a.rounds, "seed": a.seed, "runs": runs, "acceptance": ok},
                              indent=1, default=float))
    print(f"wrote {out}" + (f"; work directories in {base}" if a.keep else ""))
    if not a.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
