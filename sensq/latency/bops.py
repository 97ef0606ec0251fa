"""Analytic cost in GBOPs (MACs x weight bits x activation bits, read from the QDQ graph): exact, instant."""
from __future__ import annotations

from typing import Any

from .base import LatencyResult, ModelLike, construct, parse_kv, register_latency_backend
from .graph import layer_costs


@register_latency_backend("bops")
class BopsLatency:
    """Analytic cost in GBOPs: deterministic, instant, hardware-agnostic (spread is 0)."""

    name = "bops"
    unit = "GBOPs"
    deterministic = True

    def __init__(self, input_shapes: dict[str, list[int]] | None = None):
        self.input_shapes = input_shapes

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "BopsLatency":
        return construct(cls, **{**parse_kv(arg, cls.name), **opts})

    def measure(self, model: ModelLike) -> LatencyResult:
        costs = layer_costs(model, self.input_shapes)
        gbops = sum(c.bops for c in costs) / 1e9
        details = {
            "gbops": gbops,
            "gmacs": sum(c.macs for c in costs) / 1e9,
            "n_layers": len(costs),
            "n_quantized_layers": sum(c.quantized for c in costs),
            "unknown_shape_nodes": [c.node for c in costs if not c.shape_known],
        }
        return LatencyResult.exact(gbops, self.unit, self.name, **details)

    def timer(self, model: ModelLike):
        raise TypeError("bops is deterministic: use measure()")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "unit": self.unit, "input_shapes": self.input_shapes}


