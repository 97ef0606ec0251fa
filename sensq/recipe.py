"""The default recipe guard: is the target's fused INT8 placement sound on this model?

ORT's fused placement quantizes every op's output, including a conv's pre-activation and the inside of SiLU. On
most models that costs little (yolov5n: output NSR 0.0011 fused vs 0.0007 inputs-only; EfficientNet-Lite0 0.013 vs
0.011); on YOLOX-Nano it costs most of the accuracy (0.087 vs 0.029; mAP 0.19 vs 0.28), because its depthwise
inputs and the pre-activations feeding them span 100x between channels. So the default measures both placements on
a few calibration samples and keeps the fused one unless it is far worse; the choice and both errors are logged and
written into the plan's notes. `--placement fused|inputs` decides without measuring.
"""
from __future__ import annotations

import logging

from .plan import PrecisionPlan

log = logging.getLogger("sensq")

GUARD_SAMPLES = 8
# Switch only when the fused error is both large (SQNR below 20 dB) and well above the inputs-only one: small
# differences are the price of fused kernels (speed), which the search, not the default, should trade.
SWITCH_RATIO = 2.5
SWITCH_MIN_NSR = 0.01


def choose_placement(ws) -> PrecisionPlan:
    """ws.base_plan, or the same plan with Q/DQ on compute inputs only (depthwise inputs per channel)."""
    from .evaluators.layer_error import RegionErrorProbe
    from .targets import get_target

    plan = ws.base_plan
    target = get_target(plan.target, plan.activation_type)
    if target.no_output_quantization or plan.placement is not None or ws.cfg.data_free or ws.data is None:
        return plan  # the target already places on inputs, the user chose, or no real data to judge on
    probe = RegionErrorProbe(ws.builder.model, ws.probe_float_nodes(plan), ws.samples(GUARD_SAMPLES))
    inputs = plan.with_float([], placement="inputs", depthwise_per_channel=True)
    fused_nsr, inputs_nsr = probe(ws.build(plan))["Output SNR"], probe(ws.build(inputs))["Output SNR"]
    detail = f"output NSR on {len(probe.feeds)} calibration samples: fused {fused_nsr:.4f}, inputs-only {inputs_nsr:.4f}"
    if fused_nsr >= SWITCH_MIN_NSR and fused_nsr >= SWITCH_RATIO * inputs_nsr:
        log.warning("%s's fused INT8 placement loses much more than Q/DQ on compute-layer inputs only (%s): using "
                    "inputs-only with per-channel depthwise inputs (%s then runs the convs in float: no faster than "
                    "FP32); --placement fused keeps the fused kernels", target.name, detail, target.runtime or target.name)
        inputs.notes.append(f"placement inputs (auto): {detail}")
        return inputs
    log.info("placement: %s's fused INT8 (%s)", target.name, detail)
    plan.notes.append(f"placement fused (auto): {detail}")
    return plan
