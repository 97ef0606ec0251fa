"""Cost at scale: peak memory and time of `sensq eval` and of a budget-5 `sensq search` on >= 5,000 images.

    python bench/bench_scale.py [--copies 25] [--budget 5] [--skip-search]

The evaluation set is built here: the shared 206 COCO val2017 images repeated under new ids (symlinks with new
file names in a temporary folder, plus a generated annotations JSON), 25 copies = 5,150 images. Its mAP is
MEANINGLESS (the same images 25 times): it measures cost only. Everything runs with a fresh cache directory
(SENSQ_CACHE in the temporary folder, removed at the end), so the first evaluation preprocesses every image.

Measured:
- `sensq eval` and `sensq search --budget 5` as subprocesses: peak RSS (os.wait4's ru_maxrss) and wall time;
- evaluation time vs pure inference: the evaluator's second call (inputs on disk) against the summed time of
  session.run over the same inputs, normalised outside the timer, back to back in this process;
- the search's time per trial (build + low/full scoring + latency, from its trial records) and its stages.
Writes bench/results/scale.json (not committed). Shared data: SENSQ_DATA (default <repo>/../shared/data).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
COCO = DATA / "coco"
GIB = 1024 ** 3


def build_set(root: Path, copies: int) -> tuple[Path, int]:
    """root/annotations/instances_val2017.json + root/val2017/ with `copies` renamed symlinks of every val image."""
    src = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    ann_id = 1
    for k in range(copies):
        for im in src["images"]:
            new_id = (k + 1) * 10_000_000 + int(im["id"])
            name = f"{new_id:012d}.jpg"
            (root / "val2017" / name).symlink_to(COCO / "val2017" / im["file_name"])
            images.append({**im, "id": new_id, "file_name": name})
        for a in src["annotations"]:
            anns.append({**a, "id": ann_id, "image_id": (k + 1) * 10_000_000 + int(a["image_id"])})
            ann_id += 1
    doc = {**src, "images": images, "annotations": anns,
           "info": {"description": f"{copies} copies of the shared val2017 subset: cost benchmark, metric meaningless"}}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return root, len(images)


def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Wall time, exit code and peak RSS (MiB) of one subprocess."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def eval_vs_inference(data: Path, blocks: int = 10) -> dict:
    """evaluate() (inputs on disk) against pure session.run time over the same inputs, in alternating blocks of
    images (pure, then evaluate, block after block) so that the machine's drift hits both alike."""
    import numpy as np

    from sensq.evaluators import make_evaluator
    from sensq.runtime import make_session

    ev = make_evaluator(str(data), kind="coco", model=str(MODEL))
    session = make_session(str(MODEL))
    ev.evaluate(session, progress=False, limit=8)  # sets up the store (inputs already on disk from `sensq eval`)
    ev.store.fill(range(len(ev)))
    inp = session.get_inputs()[0]
    pure, wall, infer, ratios = 0.0, 0.0, 0.0, []
    for block in np.array_split(np.arange(len(ev)), blocks):
        p = 0.0
        for _, px, _ in ev.store.batches(block.tolist(), 1):
            x = ev.preprocessor.normalize(px).astype(np.float32, copy=False)
            t = time.perf_counter()
            session.run(None, {inp.name: x})
            p += time.perf_counter() - t
        r = ev.evaluate(session, progress=False, indices=block.tolist())
        pure, wall, infer = pure + p, wall + r.seconds, infer + r.inference_seconds
        ratios.append(r.seconds / p)
    n = len(ev)
    return {"n_images": n, "blocks": blocks, "pure_inference_seconds": round(pure, 1), "eval_seconds": round(wall, 1),
            "eval_inference_seconds": round(infer, 1), "ratio": round(wall / pure, 3),
            "block_ratio_median": round(float(np.median(ratios)), 3), "block_ratio_min": round(min(ratios), 3),
            "ms_per_image_eval": round(1000 * wall / n, 2), "ms_per_image_pure": round(1000 * pure / n, 2)}


def search_costs(workdir: Path) -> dict:
    from sensq.search import records
    from sensq.search.coordination import open_storage

    import optuna

    info = json.loads((workdir / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    recs = [r for r in records(study) if r.source != "sensitivity"]
    per_trial = [round(sum(r.seconds.values()), 1) for r in recs]
    summary = json.loads((workdir / "pareto.json").read_text())["summary"]
    return {"trials": len(recs), "seconds_per_trial": per_trial,
            "mean_seconds_per_trial": round(sum(per_trial) / max(len(per_trial), 1), 1),
            "pruned": sum(bool(r.pruned) for r in recs), "stage_seconds": summary.get("stage_seconds"),
            "search_samples": summary.get("search_samples"), "confirm_samples": summary.get("confirm_samples")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=25, help="copies of the 206 val images (25: 5,150 images)")
    ap.add_argument("--budget", type=int, default=5)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--only-search", action="store_true", help="skip `sensq eval` and the evaluation-vs-inference pass")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (set, cache, work directory)")
    args = ap.parse_args()
    if not MODEL.is_file():
        sys.exit(f"shared data not found ({MODEL}); set SENSQ_DATA to the shared/data folder")
    tmp = Path(tempfile.mkdtemp(prefix="sensq-scale-"))
    load_before = os.getloadavg()[0]
    try:
        data, n = build_set(tmp / "coco-scale", args.copies)
        env = {**os.environ, "SENSQ_CACHE": str(tmp / "cache"),
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        os.environ["SENSQ_CACHE"] = env["SENSQ_CACHE"]
        sensq = [sys.executable, "-m", "sensq"]
        res = {"n_images": n, "note": "metric meaningless: the shared 206 val images repeated under new ids"}
        if not args.only_search:
            res["eval_cli"] = run_measured([*sensq, "eval", "-m", str(MODEL), "--data", str(data), "-q"], env,
                                           tmp / "eval.log")
            print(f"sensq eval: {res['eval_cli']}", flush=True)
            res["eval_vs_inference"] = eval_vs_inference(data)
            print(f"eval vs pure inference: {res['eval_vs_inference']}", flush=True)
        if not args.skip_search:
            workdir = tmp / "search"
            cmd = [*sensq, "search", "-m", str(MODEL), "--calib", str(COCO / "train2017"), "--data", str(data),
                   "--budget", str(args.budget), "--workdir", str(workdir), "-q"]
            res["search_cli"] = run_measured(cmd, env, tmp / "search.log")
            res["search_cli"].update(search_costs(workdir))
            print(f"sensq search: {res['search_cli']}", flush=True)
        res["pixel_store_gib"] = round(sum(f.stat().st_size for f in (tmp / "cache").rglob("*.npy")) / GIB, 2)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res["env"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load_avg_1min_before": load_before,
                  "load_avg_1min_after": os.getloadavg()[0]}
    limit = 2 * 1024
    print(f"\n{'what':<28}{'peak RSS MiB':>14}{'wall s':>9}  limit {limit} MiB")
    for key in ("eval_cli", "search_cli"):
        if key in res:
            print(f"{key:<28}{res[key]['peak_rss_mib']:>14.0f}{res[key]['wall_seconds']:>9.0f}  "
                  f"{'ok' if res[key]['peak_rss_mib'] <= limit else 'OVER'}")
    if "eval_vs_inference" in res:
        e = res["eval_vs_inference"]
        print(f"evaluation {e['eval_seconds']} s vs pure inference {e['pure_inference_seconds']} s on {e['n_images']} "
              f"images: ratio {e['ratio']} (median over {e['blocks']} alternating blocks {e['block_ratio_median']}; "
              f"limit 1.2)")
    if "search_cli" in res:
        print(f"search: {res['search_cli']['mean_seconds_per_trial']} s per trial "
              f"({res['search_cli']['seconds_per_trial']}), stages {res['search_cli']['stage_seconds']}")
    out = REPO / "bench" / "results" / ("scale-search.json" if args.only_search else "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
