"""Export a search trial: as a QDQ model, as an xquant-style config that rebuilds it, or as an ORT exclude list."""
from __future__ import annotations

import json
from pathlib import Path

import optuna

from .config import CustomSetting, config_from_dict
from .errors import SensqError
from .plan import PrecisionPlan

FORMATS = ("onnx", "xquant", "ort-exclude")


def load_search(workdir: str | Path) -> dict:
    f = Path(workdir) / "search.json"
    if not f.is_file():
        raise SensqError(f"no search found in {workdir} (search.json missing)", "pass the --workdir of a `sensq search` run")
    return json.loads(f.read_text())


def trial_plan(info: dict, trial: int | None) -> tuple[int, PrecisionPlan, dict]:
    """The plan of a trial; without a trial number, the front trial with the best metric."""
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    if trial is None:
        if not study.best_trials:
            raise SensqError("the study has no finished trial yet", "run `sensq search` first (it resumes where it stopped)")
        best = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1]))
        trial = best.number
    if trial not in complete:
        numbers = sorted(complete)
        raise SensqError(f"trial {trial} is not a finished (complete) trial of this study",
                         f"choose one of {numbers[:20]}{' ...' if len(numbers) > 20 else ''} (see pareto.md)")
    t = complete[trial]
    return trial, PrecisionPlan.from_dict(t.user_attrs["plan"]), {"metric": t.values[0], "latency_ms": t.values[1]}


def workspace_for(info: dict, progress: bool = True):
    from .quantize import prepare

    cfg = config_from_dict(info["quantize_config"], base_dir=info.get("config_base_dir", "."))
    cfg.cache_dir = info.get("cache_dir")
    return prepare(cfg, progress=progress)


def xquant_config(ws, plan: PrecisionPlan) -> dict:
    """A config that `sensq quantize --config` turns into exactly this plan's model.

    Float groups beyond the base plan's regions become custom_setting entries with precision_level 2; each
    carries its boundary tensors (xquant's form) and the exact node list (sensq's extension, so the region is
    reproduced even where boundary tensors would enclose more)."""
    cfg = ws.cfg
    base_float = set(ws.base_plan.float_nodes)
    extra = [n for n in plan.float_nodes if n not in base_float]
    from .model import group_name

    by_group: dict[str, list[str]] = {}
    for n in extra:
        by_group.setdefault(group_name(n, 1), []).append(n)
    settings = [CustomSetting(**{k: v for k, v in c.__dict__.items()}) for c in cfg.custom_setting]
    for g, nodes in by_group.items():
        ins, outs = ws.graph.boundary(set(nodes))
        settings.append(CustomSetting(input_names=ins, output_names=outs, precision_level=2, node_names=sorted(nodes)))
    # Per-region calibration overrides (search group_method) as custom_setting with calibration_type.
    base_overrides = ws.base_plan.tensor_overrides
    producer = {o: n.name for n in ws.graph.model.graph.node for o in n.output}
    by_method: dict[str, list[str]] = {}
    for t, o in plan.tensor_overrides.items():
        if base_overrides.get(t) != o and t in producer:
            by_method.setdefault(o.get("method", plan.method), []).append(producer[t])
    for method, nodes in by_method.items():
        nodes = sorted(set(nodes))
        ins, outs = ws.graph.boundary(set(nodes))
        settings.append(CustomSetting(input_names=ins, output_names=outs, calibration_type=method, node_names=nodes))
    d = cfg.to_xquant()
    for ip, src in zip(d["calibration_parameters"]["input_parametres"], cfg.inputs):
        if src.data_list_path:  # absolute, so the config works from any working directory
            ip["data_list_path"] = str(cfg.resolve(src.data_list_path).resolve())
    d["calibration_parameters"]["calibration_type"] = plan.method
    qp = d["quantization_parameters"]
    qp["max_percentile"] = plan.percentile / 100.0
    qp["per_channel"] = plan.per_channel
    qp["target"] = plan.target
    qp["activation_type"] = plan.activation_type
    qp["overflow_fix"] = plan.overflow_fix
    qp["custom_setting"] = [{k: v for k, v in s.__dict__.items() if v not in (None, [], "")} for s in settings]
    return d


def export_trial(workdir: str | Path, trial: int | None, output: str | Path, fmt: str = "onnx", progress: bool = True) -> dict:
    """Python API of `sensq export`. Returns what was written and the trial's recorded scores."""
    if fmt not in FORMATS:
        raise SensqError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    info = load_search(workdir)
    number, plan, recorded = trial_plan(info, trial)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ort-exclude":
        out.write_text(json.dumps({
            "nodes_to_exclude": plan.float_nodes, "per_channel": plan.per_channel,
            "activation_type": plan.activation_type or ("QUInt8" if plan.target == "ort-cpu" else "QInt8"),
            "note": "pass nodes_to_exclude to onnxruntime.quantization.quantize_static; sensq's ranges "
                    f"(method {plan.method}) are not expressible there, so accuracy may differ from the study",
        }, indent=1))
        return {"trial": number, "output": out, **recorded}
    ws = workspace_for(info, progress=progress)
    if fmt == "onnx":
        ws.builder.build_to(plan, out)
    else:
        d = xquant_config(ws, plan)
        d["model_parameters"]["onnx_model"] = str(Path(ws.cfg.model_path).resolve())
        out.write_text(json.dumps(d, indent=2))
    return {"trial": number, "output": out, **recorded}
