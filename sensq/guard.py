"""A plan never collapses silently: every built plan's output error on a few calibration samples is compared with
all-INT8's before it is scored. Keeping layers float can only remove quantization noise, so a plan far worse than
all-INT8 is a builder (or runtime) problem; it is rejected with its reason instead of being scored as mAP 0.002 and
left on the record as if that were a measurement."""
from __future__ import annotations

GUARD_SAMPLES = 4
GUARD_FACTOR = 3.0  # output NSR above 3x all-INT8's ...
GUARD_FLOOR = 0.02  # ... and above all-INT8's + 0.02 (tiny NSRs differ by large factors through noise)


class PlanGuard:
    """guard(qmodel) -> None when the model is sound, else the one-line reason it is rejected."""

    def __init__(self, ws, samples: int = GUARD_SAMPLES):
        from .evaluators.layer_error import RegionErrorProbe

        self.probe = RegionErrorProbe(ws.builder.model, ws.base_plan.float_nodes, ws.samples(samples))
        self.base = self.probe(ws.build())["Output SNR"]
        self.limit = max(GUARD_FACTOR * self.base, self.base + GUARD_FLOOR)

    def __call__(self, qmodel) -> str | None:
        nsr = self.probe(qmodel)["Output SNR"]
        if nsr <= self.limit:
            return None
        return (f"collapse guard: output NSR {nsr:.4f} on {len(self.probe.feeds)} calibration samples against all-INT8's "
                f"{self.base:.4f} (limit {self.limit:.4f}); keeping layers float cannot add error, so this is a build "
                f"problem, not a measurement")
