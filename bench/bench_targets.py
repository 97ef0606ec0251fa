"""The same search for two runtimes on this machine: ONNX Runtime CPU (`--target ort-cpu`) and OpenVINO CPU
(`--target openvino-cpu`), each front's latency a ratio to that runtime's own FP32, measured in one run.

    python bench/bench_targets.py [--model yolov5n efficientnet] [--budget 20]

Needs the `openvino` extra. Prints both fronts side by side and the configurations on one front but not the other;
writes bench/results/targets.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_search import MODELS, write_results  # noqa: E402

TARGETS = ("ort-cpu", "openvino-cpu")


def config_name(row: dict) -> str:
    groups = "+".join(row["float_groups"]) if row["float_groups"] else "all INT8"
    method = row["method"] + (f" p{row['percentile']:g}" if row.get("percentile") else "")
    return f"{groups} | {method} | per_channel={row['per_channel']} | overflow_fix={row['overflow_fix']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--confirm", default="0.5")
    args = ap.parse_args()
    try:
        import openvino  # noqa: F401
    except ImportError:
        sys.exit('openvino is not installed: pip install -e ".[openvino]"')
    from sensq.cli import setup_logging
    from sensq.defaults import setup
    from sensq.search import SearchSettings, run_search

    setup_logging(quiet=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            fronts = {}
            for target in TARGETS:
                _, ws, ev = setup(progress=False, model=str(MODELS[model]), target=target, cache_dir=f"{tmp}/{model}-{target}")
                res = run_search(ws, ev, SearchSettings(budget=args.budget, workdir=f"{tmp}/{model}-{target}/run",
                                                        confirm=args.confirm), progress=False)
                fronts[target] = [r for r in res.front if r["trial"] >= 0]
                out[f"{model}/{target}"] = {"front": res.front, "summary": res.summary}
            names = {t: {config_name(r) for r in f} for t, f in fronts.items()}
            only = {t: sorted(names[t] - names[o]) for t, o in (TARGETS, TARGETS[::-1])}
            out[f"{model}/differences"] = only
            print(f"\n{model}: front points (metric search / confirm, latency x own FP32 [95% CI])")
            for t in TARGETS:
                for r in fronts[t]:
                    print(f"  {t:13} {r['metric']:.4f} / {r.get('confirm_metric', float('nan')):.4f}  "
                          f"{r['ratio']:.3f}x [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}]  {config_name(r)}")
            for t in TARGETS:
                print(f"  only on the {t} front: {only[t] or 'none'}")
    write_results("targets", out)


if __name__ == "__main__":
    main()
