"""Two workers on one machine measure latency as one worker does: the paired ratios to FP32 of the seeded trials
(all-INT8, top-1/2/3 groups float) from a two-worker study agree with those of a single-worker study within their
reported intervals, because measurement is serialized across processes (sensq.latency.measurement_lock) and every
ratio is paired with this machine's own FP32 in the same rounds.

    python bench/bench_workers.py [--limit 48] [--repeats 1]

yolov5n, `ort` latency (the CLI default), 48 evaluation images, budget 4 (the four seeds), sensitivity budget 20 s.
The two workers share one SQLite study (same machine) and one cache directory; the single worker has its own study.
Run it when the machine is otherwise quiet (see `uptime`). Writes bench/results/workers.json (not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO))

MODEL = DATA / "models" / "yolov5n.onnx"
SEEDS = ["all-INT8", "seed: top-1 float", "seed: top-2 float", "seed: top-3 float"]


def command(workdir: Path, limit: int, storage: str | None = None, worker: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "sensq", "search", "-m", str(MODEL), "--calib", str(DATA / "coco" / "train2017"),
           "--data", str(DATA / "coco"), "--limit", str(limit), "--budget", "4", "--confirm", "0",
           "--sensitivity-budget", "20", "--latency", "ort", "--workdir", str(workdir), "-q"]
    if storage:
        cmd += ["--storage", storage]
    if worker is not None:
        cmd += ["--worker", str(worker)]
    return cmd


def seeded(workdir: Path) -> dict[str, dict]:
    import optuna

    from sensq.search import records
    from sensq.search.coordination import open_storage

    info = json.loads((workdir / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    out = {}
    for r in records(study):
        if r.label in SEEDS and r.latency:
            who = next(t.user_attrs.get("worker_identity", {}) for t in study.trials if t.number == r.number)
            out[r.label] = {"ratio": r.latency["ratio"], "ci": list(r.latency["ratio_ci"]), "trial": r.number,
                            "worker": who.get("worker"), "machine_id": r.latency["machine_id"],
                            "ms": r.latency["value"], "fp32_ms_same_rounds": r.latency["ref_value"]}
    return out


def run(cmds: list[list[str]], env: dict, logs: list[Path]) -> float:
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=l.open("w"), stderr=subprocess.STDOUT) for c, l in zip(cmds, logs)]
    for p, l in zip(procs, logs):
        if p.wait() != 0:
            raise SystemExit(f"worker failed, see {l}:\n{l.read_text()[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not MODEL.is_file():
        sys.exit(f"shared data not found ({MODEL}); set SENSQ_DATA to the shared/data folder")
    tmp = Path(tempfile.mkdtemp(prefix="sensq-workers-"))
    env = {**os.environ, "SENSQ_CACHE": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    load = [os.getloadavg()[0]]
    try:
        single_s = run([command(tmp / "single", args.limit)], env, [tmp / "single.log"])
        load.append(os.getloadavg()[0])
        storage = f"sqlite:///{tmp / 'two.db'}"
        two_s = run([command(tmp / f"w{w}", args.limit, storage, w) for w in (0, 1)], env,
                    [tmp / "w0.log", tmp / "w1.log"])
        load.append(os.getloadavg()[0])
        single, two = seeded(tmp / "single"), seeded(tmp / "w0")
        assert seeded(tmp / "w1") == two  # one study: both work directories read the same records
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    print(f"{'seed':<20}{'single worker x FP32 [95% CI]':>32}{'two workers x FP32 [95% CI]':>32}{'by':>4}  agree")
    for label in SEEDS:
        a, b = single.get(label), two.get(label)
        if a is None or b is None:
            continue
        overlap = a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]
        both_in = a["ci"][0] <= b["ratio"] <= a["ci"][1] and b["ci"][0] <= a["ratio"] <= b["ci"][1]
        rows.append({"seed": label, "single": a, "two_workers": b, "intervals_overlap": overlap,
                     "each_ratio_in_the_other_interval": both_in})
        print(f"{label:<20}{a['ratio']:>10.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]{'':>6}"
              f"{b['ratio']:>10.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}]{'':>6}{b['worker']!s:>4}  "
              f"{'yes' if overlap else 'NO'}{' (each in the other)' if both_in else ''}")
    res = {"limit": args.limit, "single_seconds": round(single_s, 1), "two_workers_seconds": round(two_s, 1),
           "load_avg_1min": load, "rows": rows,
           "all_agree": bool(rows) and all(r["intervals_overlap"] for r in rows),
           "workers_measuring": sorted({r["two_workers"]["worker"] for r in rows})}
    print(f"single worker {single_s:.0f} s, two workers {two_s:.0f} s; load average {load}")
    out = REPO / "bench" / "results" / "workers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
