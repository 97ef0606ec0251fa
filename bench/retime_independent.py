"""Re-time ONNX models against a reference in interleaved rounds, with no sensq code on the timing path.

    python bench/retime_independent.py REFERENCE.onnx A.onnx B.onnx ... [--rounds 20] [--threads 2] [--runs 2]

Each round runs every model, in a shuffled order (seeded), `--warm` times untimed (default 1: the first run after
another model pays for the caches that model evicted, which a deployment running one model does not) and then
`--runs` times timed; a model's ratio in a round is its median over the reference's median in that round. Prints one JSON object: per model the median ratio, its IQR over rounds, the
order-statistic 95 % interval of the median, and the model's median ms. Plain onnxruntime + numpy + scipy: the
independent check of sensq's latency confirmation (bench/bench_front_repro.py).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from scipy.stats import binom

DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, rng) -> dict:
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dtype = DTYPES[i.type]
        out[i.name] = (rng.random(shape, dtype=np.float32) if dtype is np.float32
                       else rng.integers(0, 256, shape).astype(dtype))
    return out


def median_interval(x, level=0.95) -> tuple[float, float]:
    """Order statistics (k, n-k+1) with binomial coverage >= level (scipy's binomial, not sensq's)."""
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    k = int(binom.ppf((1 - level) / 2, n, 0.5))  # P(B <= k-1) <= alpha/2 for the largest such k
    while k > 0 and binom.cdf(k - 1, n, 0.5) > (1 - level) / 2:
        k -= 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--warm", type=int, default=1, help="untimed runs of a model before its timed runs in each round")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    paths = [a.reference] + a.models
    sessions = {p: session(p, a.threads) for p in paths}
    inputs = {p: feeds(s, rng) for p, s in sessions.items()}
    for p, s in sessions.items():
        for _ in range(a.warmup):
            s.run(None, inputs[p])
    ratios = {p: [] for p in paths}
    times = {p: [] for p in paths}
    for _ in range(a.rounds):
        own = {p: [] for p in paths}
        for p in rng.permutation(paths):
            for _ in range(a.warm):
                sessions[p].run(None, inputs[p])
            for _ in range(a.runs):
                t = time.perf_counter()
                sessions[p].run(None, inputs[p])
                own[p].append((time.perf_counter() - t) * 1e3)
        ref = np.median(own[a.reference])
        for p in paths:
            ratios[p].append(float(np.median(own[p]) / ref))
            times[p] += own[p]
    out = {"onnxruntime": ort.__version__, "rounds": a.rounds, "runs": a.runs, "warm": a.warm, "threads": a.threads,
           "models": {}}
    for p in paths:
        q25, q75 = np.percentile(ratios[p], [25, 75])
        out["models"][p] = {"ratio": float(np.median(ratios[p])), "iqr": [float(q25), float(q75)],
                            "ci": median_interval(ratios[p]), "ms": float(np.median(times[p])),
                            "round_ratios": [round(r, 5) for r in ratios[p]]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
