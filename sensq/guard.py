"""A plan never collapses silently: every built plan's output error on a few calibration samples is compared with
all-INT8's before it is scored. Keeping layers float can only remove quantization noise, so a plan far worse than
all-INT8 is a builder (or runtime) problem; it is rejected with its reason instead of being scored as mAP 0.002 and
left on the record as if that were a measurement."""
from __future__ import annotations

from .plan import PrecisionPlan

GUARD_SAMPLES = 4
GUARD_FACTOR = 3.0  # output NSR above 3x all-INT8's ...
GUARD_FLOOR = 0.02  # ... and above all-INT8's + 0.02 (tiny NSRs differ by large factors through noise)
# Knobs are screened near collapse: all-INT8 output NSR above 3x the default's and the default's + 0.1. YOLOX-Nano
# per-tensor weights: 0.17 against the default's 0.028 (measured after its float head layers), mAP 0.001; legitimate
# but worse methods stay below (yolov5n minmax 0.087, kl 0.081 against 0.021) and are scored.
KNOB_FLOOR = 0.1


class PlanGuard:
    """guard(qmodel, plan) -> None when the model is sound, else the one-line reason it is rejected.

    The reference is the plan's own all-INT8 counterpart: the same method, weights, placement and corrections with
    only the base plan's float nodes. A plan with a worse calibration method (minmax per-tensor on YOLOX-Nano) is
    legitimately worse than the default all-INT8; only keeping more layers float than its counterpart and ending far
    worse is a builder problem. Knobs under which all-INT8 itself is far worse than the default's are screened out
    (rejected, not scored): a search should not spend full evaluations on them, nor show them as measurements."""

    def __init__(self, ws, samples: int = GUARD_SAMPLES):
        from .evaluators.layer_error import RegionErrorProbe

        self.ws = ws
        self.probe = RegionErrorProbe(ws.builder.model, ws.probe_float_nodes(), ws.samples(samples))
        self._reference: dict[str, float] = {}  # counterpart plan key -> its output NSR
        self.base = self.reference(ws.base_plan)

    def counterpart(self, plan: PrecisionPlan) -> PrecisionPlan:
        d = plan.to_dict()
        d["float_nodes"], d["a16_nodes"], d["fp16_nodes"] = list(self.ws.base_plan.float_nodes), [], []
        return PrecisionPlan.from_dict(d)

    def reference(self, plan: PrecisionPlan) -> float:
        ref = self.counterpart(plan)
        key = ref.key()
        if key not in self._reference:
            self._reference[key] = self.probe(self.ws.build(ref))["Output SNR"]
        return self._reference[key]

    @staticmethod
    def limit(reference: float) -> float:
        return max(GUARD_FACTOR * reference, reference + GUARD_FLOOR)

    def __call__(self, qmodel, plan: PrecisionPlan | None = None) -> str | None:
        plan = plan or self.ws.base_plan
        base = self.reference(plan)
        screen = max(GUARD_FACTOR * self.base, self.base + KNOB_FLOOR)
        if base > screen:
            return (f"knob screen: with method={plan.method}, per_channel={plan.per_channel}, overflow_fix="
                    f"{plan.overflow_fix} all-INT8 itself has output NSR {base:.4f} on {len(self.probe.feeds)} "
                    f"calibration samples against the default's {self.base:.4f} (limit {screen:.4f}): "
                    f"not scored (on YOLOX-Nano minmax or per-tensor score mAP 0.002-0.008)")
        if plan is not self.ws.base_plan and plan.key() == self.counterpart(plan).key():
            return None  # all-INT8 under its own knobs: nothing it could be compared with
        limit = self.limit(base)
        nsr = self.probe(qmodel)["Output SNR"]
        if nsr <= limit:
            return None
        return (f"collapse guard: output NSR {nsr:.4f} on {len(self.probe.feeds)} calibration samples against "
                f"{base:.4f} for the same plan with no layer kept float (limit {limit:.4f}); keeping layers float "
                f"cannot add that much error, so this is a build problem, not a measurement")
