"""A precision plan is data: which nodes stay float, and which range method/percentile each tensor gets.

Search produces plans, the builder consumes them, export writes them. Nothing else travels between those steps.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .ranges import check_method


@dataclass
class PrecisionPlan:
    method: str = "default"
    percentile: float = 99.99
    per_channel: bool = True
    float_nodes: list[str] = field(default_factory=list)
    # nodes whose activations are 16-bit while the rest stay 8-bit (group precision "a16", sensq/precision.py);
    # a node both float and a16 is float
    a16_nodes: list[str] = field(default_factory=list)
    # nodes left float and converted to float16 (group precision "fp16"); a node both float and fp16 is float
    fp16_nodes: list[str] = field(default_factory=list)
    # tensor name -> {"method": ..., "percentile": ...}: per-region calibration (xquant custom_setting)
    tensor_overrides: dict[str, dict] = field(default_factory=dict)
    target: str = "ort-cpu"
    activation_type: str | None = None  # None: the target's
    overflow_fix: str | None = None  # 7-bit weights: first_layer | all | none; None: the target's default
    placement: str | None = None  # fused | inputs (targets/base.py PLACEMENTS); None: the target's own
    depthwise_per_channel: bool | None = None  # depthwise conv inputs per channel; None: the target's default
    bias_correction: str | None = None  # "fast": biases absorb the weight-rounding mean shift (passes/bias_correction.py)
    weight_range: str | None = None  # "mse": per-channel MSE clipping of conv weights (passes/weight_clipping.py)
    rounding: str | None = None  # "learned": conv weights and biases fitted to FP32 outputs (passes/learned_rounding.py)
    # provenance for humans (why nodes are float); not used by the builder
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_method(self.method)
        from .targets import OVERFLOW_FIXES

        if self.overflow_fix is not None and self.overflow_fix not in OVERFLOW_FIXES:
            from .errors import SensqError

            raise SensqError(f"overflow_fix {self.overflow_fix!r} not supported", f"use one of: {', '.join(OVERFLOW_FIXES)}")
        from .targets.base import PLACEMENTS

        if self.bias_correction not in (None, "fast"):
            from .errors import SensqError

            raise SensqError(f"bias_correction {self.bias_correction!r} not supported", "use fast, or leave it unset")
        if self.weight_range not in (None, "mse"):
            from .errors import SensqError

            raise SensqError(f"weight_range {self.weight_range!r} not supported", "use mse, or leave it unset (min/max)")
        if self.rounding == "nearest":
            self.rounding = None
        if self.rounding not in (None, "learned"):
            from .errors import SensqError

            raise SensqError(f"rounding {self.rounding!r} not supported", "use nearest or learned")
        if self.placement is not None and self.placement not in PLACEMENTS:
            from .errors import SensqError

            raise SensqError(f"placement {self.placement!r} not supported", f"use one of: {', '.join(PLACEMENTS)}")
        for o in self.tensor_overrides.values():
            check_method(o.get("method", self.method))
        self.float_nodes = sorted(set(self.float_nodes))
        self.fp16_nodes = sorted(set(self.fp16_nodes) - set(self.float_nodes))
        self.a16_nodes = sorted(set(self.a16_nodes) - set(self.float_nodes) - set(self.fp16_nodes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionPlan":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def key(self) -> str:
        d = self.to_dict()
        d.pop("notes")
        for k in ("placement", "depthwise_per_channel", "bias_correction", "weight_range", "rounding"):  # unset knobs keep the keys plans had before they existed
            if d[k] is None:
                d.pop(k)
        for k in ("a16_nodes", "fp16_nodes"):  # empty: the key plans had before these existed
            if not d[k]:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_float(self, extra_nodes, a16_nodes=(), fp16_nodes=(), **changes) -> "PrecisionPlan":
        d = self.to_dict()
        d["float_nodes"] = sorted(set(self.float_nodes) | set(extra_nodes))
        d["a16_nodes"] = sorted(set(self.a16_nodes) | set(a16_nodes))
        d["fp16_nodes"] = sorted(set(self.fp16_nodes) | set(fp16_nodes))
        d.update(changes)
        return PrecisionPlan.from_dict(d)
