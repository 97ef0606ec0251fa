"""xquant-style config: `sensq quantize --config` on it rebuilds the trial's model byte for byte.

Consumer: sensq 0.1 `quantize --config` (xquant's JSON layout plus sensq's extension keys: node_names in
custom_setting, target, activation_type, per_channel, overflow_fix). xquant itself reads the layout but not the
extension keys, so only sensq reproduces the exact region.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import CustomSetting
from ..plan import PrecisionPlan

CONSUMER = "sensq 0.1 `sensq quantize --config` (xquant JSON layout + sensq extension keys)"


def xquant_config(ws, plan: PrecisionPlan) -> dict:
    """A config that `sensq quantize --config` turns into exactly this plan's model.

    Float groups beyond the base plan's regions become custom_setting entries with precision_level 2; each
    carries its boundary tensors (xquant's form) and the exact node list (sensq's extension, so the region is
    reproduced even where boundary tensors would enclose more)."""
    cfg = ws.cfg
    base_float = set(ws.base_plan.float_nodes)
    extra = [n for n in plan.float_nodes if n not in base_float]
    from ..model import group_name

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


def write(ctx, out: Path) -> dict:
    ws = ctx.ws
    d = xquant_config(ws, ctx.choice.plan)
    d["model_parameters"]["onnx_model"] = str(Path(ws.cfg.model_path).resolve())
    out.write_text(json.dumps(d, indent=2))
    return {"files": [out]}
