"""Mixed-precision search: an Optuna multi-objective study (maximize the task metric, minimize latency).

Each trial turns sampled knobs into a PrecisionPlan, builds the QDQ model from cached statistics, measures its
latency, scores it on the first `low_fidelity` samples and stops there when it cannot reach the front
(successive-halving style: dominated at low fidelity by a finished trial, or slower than FP32); otherwise it is
scored on all samples. The study lives in Optuna RDB storage, so rerunning the same command resumes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from tqdm import tqdm

from . import latency as latency_mod
from .errors import SensqError
from .plan import PrecisionPlan
from .runtime import make_session
from .search_spaces import SearchSpace, load_space
from .sensitivity import SensitivityResult, evaluator_signature, quantizable_groups, run_sensitivity

log = logging.getLogger("sensq")

LATENCY_TOLERANCE = 0.02  # relative: measured latencies closer than this are treated as equal when pruning
PRUNE_MARGIN = 0.002  # metric: a low-fidelity score this much below a faster finished trial's is pruned


@dataclass
class SearchSettings:
    budget: int = 50
    workdir: str = "runs/search"
    storage: str | None = None  # Optuna URL; default sqlite:///<workdir>/study.db
    study_name: str | None = None
    seed: int = 0
    space: str = "default"
    latency: str = "ort"
    low_fidelity: int | None = None  # samples for the first stage; None: a third of the evaluation set (>= 32)
    sensitivity_limit: int | None = None  # samples per sensitivity run; None: same as low_fidelity
    max_drop: float | None = None  # optional constraint: metric drop vs FP32 at most this
    depth: int = 1
    group_by: str = "group"
    top_k: int | None = None  # overrides the space's group toggle count

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.workdir).resolve() / 'study.db'}"


@dataclass
class SearchResult:
    trials: pd.DataFrame
    front: pd.DataFrame
    fp32: dict
    sensitivity: SensitivityResult
    reports: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    pruned: int = 0
    saved_seconds: float = 0.0


def plan_for(ws, groups: dict[str, list[str]], choice: dict) -> PrecisionPlan:
    """Sampled knobs -> precision plan (float groups added to the base plan's float regions)."""
    float_nodes = [n for g in choice["float_groups"] for n in groups[g]]
    overrides = dict(ws.base_plan.tensor_overrides)
    for g, method in choice.get("group_methods", {}).items():
        for n in groups[g]:
            for t in ws.graph.nodes[n].output:
                overrides[t] = {"method": method}
    changes = {k: choice[k] for k in ("method", "per_channel", "activation_type", "target", "overflow_fix") if k in choice}
    if "percentile" in choice:
        changes["percentile"] = choice["percentile"]
    plan = ws.base_plan.with_float(float_nodes, tensor_overrides=overrides, **changes)
    plan.notes = list(ws.base_plan.notes) + ([f"float groups: {', '.join(choice['float_groups'])}"] if choice["float_groups"] else [])
    return plan


def _study_name(ws, space: SearchSpace, settings: SearchSettings, evaluator) -> str:
    raw = json.dumps([ws.stats.key, ws.base_plan.key(), Path(space.source).read_text(), settings.latency,
                      evaluator_signature(evaluator), settings.low_fidelity, settings.depth, settings.group_by,
                      settings.top_k, settings.max_drop], default=str)
    return f"sensq-{Path(ws.cfg.model_path).stem}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def _finished(study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def trials_frame(study) -> pd.DataFrame:
    rows = []
    for t in _finished(study):
        a = t.user_attrs
        rows.append({
            "trial": t.number, "state": t.state.name,
            "metric": t.values[0] if t.values else a.get("low_metric"),
            "latency_ms": t.values[1] if t.values else a.get("latency_ms"),
            "low_metric": a.get("low_metric"), "float_groups": a.get("float_groups", []),
            "method": a.get("method"), "percentile": a.get("percentile"), "per_channel": a.get("per_channel"),
            "overflow_fix": a.get("overflow_fix"),
            "bops": a.get("gbops"), "latency_spread_ms": a.get("latency_spread_ms"), "label": a.get("label", ""),
            "n_float_nodes": a.get("n_float_nodes"),
        })
    return pd.DataFrame(rows)


def run_search(ws, evaluator, settings: SearchSettings, progress: bool = True) -> SearchResult:
    """Python API of `sensq search`: sensitivity (cached), then the study, then the Pareto report."""
    t_start = time.perf_counter()
    workdir = Path(settings.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    space = load_space(settings.space)
    top_k = settings.top_k if settings.top_k is not None else space.top_k
    n_all = len(evaluator)
    low = settings.low_fidelity or max(32, n_all // 3)
    low = min(low, n_all)
    settings.low_fidelity = low
    sens_limit = min(n_all, settings.sensitivity_limit or low)
    backend = latency_mod.make_latency_backend(settings.latency)

    groups = quantizable_groups(ws, settings.depth, settings.group_by)
    if not groups:
        raise SensqError("nothing left to search: every node is already float", "check truncate_var_names / float_nodes")
    sens = run_sensitivity(ws, evaluator, limit=sens_limit, depth=settings.depth, by=settings.group_by,
                           progress=progress, cache=workdir / "cache")
    from .sensitivity import summary, write_report

    sens_paths = write_report(sens, workdir)
    print(summary(sens, 10))
    ranked = [g for g in sens.ranked_groups if g in groups]
    space.params.setdefault("float_groups", {"type": "group_toggles"})["top_k"] = top_k

    # References: FP32 (not a trial: it is not a plan) and, below, the seeded all-INT8 trial.
    fp32_key = hashlib.sha256(json.dumps([evaluator_signature(evaluator), settings.latency, ws.stats.key,
                                          ws.base_plan.key(), low], default=str).encode()).hexdigest()[:16]
    fp32_file = workdir / "cache" / f"fp32-{fp32_key}.json"
    if fp32_file.is_file():
        fp32 = json.loads(fp32_file.read_text())
    else:
        res = evaluator.evaluate(ws.model, progress=progress)
        runs = sorted((backend.measure(ws.model) for _ in range(3)), key=lambda r: r.value)
        lat = runs[1]  # median of three measurements: the reference every trial is compared with
        fp32 = {"metric": res.value, "latency_ms": lat.value, "latency_spread_ms": lat.spread,
                "low_metric": evaluator.evaluate(ws.model, limit=low, progress=False).value,
                "gbops": latency_mod.bops(ws.model) / 1e9, "eval_seconds": res.seconds}
        fp32_file.parent.mkdir(parents=True, exist_ok=True)
        fp32_file.write_text(json.dumps(fp32))
    metric_name = sens.metric_name

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat is "experimental"
    constraints = (lambda t: t.user_attrs.get("constraint", [0.0])) if settings.max_drop is not None else None
    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=10, constraints_func=constraints)
    name = settings.study_name or _study_name(ws, space, settings, evaluator)
    try:
        storage = optuna.storages.RDBStorage(settings.storage_url(), heartbeat_interval=30, grace_period=90) \
            if settings.storage_url().startswith(("sqlite", "postgresql", "mysql")) else settings.storage_url()
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=["maximize", "minimize"])
    except Exception as e:
        raise SensqError(f"cannot open Optuna storage {settings.storage_url()}: {str(e).splitlines()[0][:200]}",
                         "give a valid URL such as sqlite:///runs/study.db or postgresql://user:pw@host/db") from e
    if study.trials:  # resuming: continue the random stream instead of replaying the first run's samples
        study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials), multivariate=True,
                                                   n_startup_trials=10, constraints_func=constraints)
    if not study.trials:
        from .targets import get_target

        base = ws.base_plan
        defaults = {"method": base.method, "per_channel": base.per_channel, "target": base.target,
                    "activation_type": base.activation_type,
                    "overflow_fix": base.overflow_fix or get_target(base.target, base.activation_type).overflow_fix}
        for n_float in range(0, min(3, len(ranked)) + 1):  # seeds: all-INT8 and the top 1..3 groups float
            study.enqueue_trial(space.seed_params(ranked, n_float, defaults), user_attrs={"label": "all-INT8" if n_float == 0 else f"seed: top-{n_float} float"})
    (workdir / "search.json").write_text(json.dumps({
        "study_name": name, "storage": settings.storage_url(), "settings": asdict(settings),
        "quantize_config": ws.cfg.to_xquant(), "config_base_dir": ws.cfg.base_dir, "cache_dir": ws.cfg.cache_dir,
        "evaluator": evaluator_signature(evaluator), "evaluator_spec": getattr(evaluator, "spec", None),
        "metric_name": metric_name, "fp32": fp32, "groups": groups, "ranked_groups": ranked,
    }, indent=1, default=str))

    eval_seconds = {"low": [], "full": []}
    # Shared VMs drift in speed by tens of percent over seconds to minutes. Backends that can time two models
    # interleaved (ort) give each trial's latency as (trial / FP32 ratio, measured in alternating rounds) x the FP32
    # reference, so a trial measured in a slow phase is not penalised. The raw median is kept in the attributes.
    reference = latency_mod.Reference(backend, ws.model)

    def measure(qmodel):
        lat = latency_mod.measure_paired(backend, qmodel, reference)
        return lat.ratio * fp32["latency_ms"], lat

    def objective(trial: optuna.Trial):
        choice = space.suggest(trial, ranked)
        plan = plan_for(ws, groups, choice)
        earlier = _same_plan(study, plan.key(), trial.number)
        if earlier is not None:  # samplers revisit plans (e.g. no group float): reuse the result, spend no budget time
            for k, v in earlier.user_attrs.items():
                if k != "label":
                    trial.set_user_attr(k, v)
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == optuna.trial.TrialState.PRUNED:
                raise optuna.TrialPruned()
            return tuple(earlier.values)
        qmodel = ws.build(plan)
        latency_ms, lat = measure(qmodel)
        gbops = latency_mod.bops(qmodel) / 1e9
        attrs = {"plan": plan.to_dict(), "float_groups": choice["float_groups"], "method": plan.method,
                 "percentile": plan.percentile if plan.method == "percentile" else None, "per_channel": plan.per_channel,
                 "overflow_fix": plan.overflow_fix,
                 "latency_ms": latency_ms, "latency_raw_ms": lat.value, "latency_spread_ms": lat.value_iqr, "gbops": gbops,
                 "n_float_nodes": len(plan.float_nodes), "plan_key": plan.key()}
        qsession = make_session(qmodel)  # one session for both stages: evaluators reuse the first stage's outputs
        r_low = evaluator.evaluate(qsession, limit=low, progress=False)
        eval_seconds["low"].append(r_low.seconds)
        attrs["low_metric"] = r_low.value
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if low < n_all and _cannot_reach_front(study, r_low.value, latency_ms, fp32):
            trial.set_user_attr("pruned_at", low)
            raise optuna.TrialPruned()
        r_full = r_low if low >= n_all else evaluator.evaluate(qsession, progress=False)
        eval_seconds["full"].append(r_full.seconds)
        if settings.max_drop is not None:
            trial.set_user_attr("constraint", [fp32["metric"] - r_full.value - settings.max_drop])
        return r_full.value, latency_ms

    finished = len(_finished(study))
    bar = tqdm(total=settings.budget, initial=min(finished, settings.budget), desc="search", unit="trial", disable=not progress)
    latest: list = []
    try:
        while len(_finished(study)) < settings.budget:
            study.optimize(objective, n_trials=1, catch=(), callbacks=[lambda s, t: latest.append(t)])
            last = latest[-1]
            bar.update(1)
            front = _front_trials(study)
            best = max((t.values[0] for t in front), default=float("nan"))
            bar.set_postfix_str(f"front {len(front)}, best {metric_name} {best:.4f}")
            a = last.user_attrs
            state = "pruned" if last.state == optuna.trial.TrialState.PRUNED else "done"
            if "duplicate_of" in a:
                state += f" (same plan as trial {a['duplicate_of']})"
            value = last.values[0] if last.values else a.get("low_metric", float("nan"))
            log.info("trial %d %s: %s %.4f%s @ %.2f ms, float=[%s], method=%s%s", last.number, state, metric_name, value,
                     f" (first {low})" if state == "pruned" else "", a.get("latency_ms", float("nan")),
                     ",".join(a.get("float_groups", [])), a.get("method"),
                     f" p={a['percentile']}" if a.get("percentile") else "")
    finally:
        bar.close()
        result = write_outputs(study, workdir, fp32, sens, metric_name, low, n_all, eval_seconds)
        result.reports.update({f"sensitivity {k}": v for k, v in sens_paths.items()})
        result.seconds = time.perf_counter() - t_start
    return result


def _same_plan(study, key: str, number: int):
    for t in _finished(study):
        if t.number != number and t.user_attrs.get("plan_key") == key:
            return t
    return None


def _front_trials(study) -> list:
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    front = []
    for t in complete:
        m, l = t.values
        if not any((o.values[0] >= m and o.values[1] <= l) and (o.values[0] > m or o.values[1] < l) for o in complete):
            front.append(t)
    return front


def _cannot_reach_front(study, low_metric: float, latency_ms: float, fp32: dict) -> bool:
    """Dominated at low fidelity: slower than FP32 with a lower score, or a finished faster trial scored higher."""
    if latency_ms >= fp32["latency_ms"] * (1 - LATENCY_TOLERANCE) and low_metric <= fp32["low_metric"]:
        return True
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        other_low = t.user_attrs.get("low_metric")
        if other_low is None:
            continue
        if t.values[1] <= latency_ms * (1 + LATENCY_TOLERANCE) and other_low >= low_metric + PRUNE_MARGIN:
            return True
    return False


def write_outputs(study, workdir: Path, fp32: dict, sens: SensitivityResult, metric_name: str, low: int, n_all: int,
                  eval_seconds: dict) -> SearchResult:
    from .reports.pareto_report import format_front_summary, pareto_front, write_pareto_report

    df = trials_frame(study)
    if df.empty:
        return SearchResult(df, df, fp32, sens)
    fp32_row = {"trial": -1, "state": "COMPLETE", "metric": fp32["metric"], "latency_ms": fp32["latency_ms"],
                "float_groups": ["(all)"], "method": "-", "percentile": None, "bops": fp32.get("gbops"), "label": "FP32"}
    full = pd.concat([df, pd.DataFrame([fp32_row])], ignore_index=True)
    references = {"FP32": (fp32["metric"], fp32["latency_ms"])}  # listed in pareto.json/md even when dominated
    paths = write_pareto_report(full, workdir, metric_name=metric_name, latency_unit="ms", references=references)
    front = pareto_front(full)
    front_dir = workdir / "front"
    front_dir.mkdir(exist_ok=True)
    on_front = {int(n) for n in front["trial"] if n >= 0}
    for f in front_dir.glob("trial_*.json"):
        if f.stem.removeprefix("trial_").isdigit() and int(f.stem.removeprefix("trial_")) not in on_front:
            f.unlink()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number in set(front["trial"]):
            (front_dir / f"trial_{t.number}.json").write_text(json.dumps({
                "trial": t.number, "metric": t.values[0], "latency_ms": t.values[1], "plan": t.user_attrs["plan"]}, indent=1))
    pruned = int((df["state"] == "PRUNED").sum())
    mean_full = sum(eval_seconds["full"]) / len(eval_seconds["full"]) if eval_seconds["full"] else fp32.get("eval_seconds", 0.0)
    mean_low = sum(eval_seconds["low"]) / len(eval_seconds["low"]) if eval_seconds["low"] else 0.0
    saved = pruned * max(0.0, mean_full)
    print(format_front_summary(front, metric_name))
    print(f"multi-fidelity: {pruned} of {len(df)} trials stopped after the first {low} of {n_all} samples "
          f"(~{saved:.0f} s of full evaluation saved; a low-fidelity score costs ~{mean_low:.1f} s, a full one ~{mean_full:.1f} s)")
    print(f"outputs in {workdir}: pareto.png, pareto.md/.csv/.json, front/trial_N.json, sensitivity.md; "
          f"export with: sensq export --workdir {workdir} --trial N -o model.q.onnx")
    return SearchResult(df, front, fp32, sens, dict(paths), pruned=pruned, saved_seconds=saved)
