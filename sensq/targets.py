"""Deployment targets: each states its quantization rules (activation type and symmetry, what gets quantized)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SensqError


def _ort_default_op_types() -> tuple[str, ...]:
    # The op set onnxruntime.quantize_static quantizes by default (QDQ + QLinear registries).
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))


@dataclass(frozen=True)
class Target:
    name: str
    activation_type: str  # "uint8" or "int8"
    activation_symmetric: bool
    description: str
    op_types: tuple[str, ...] | None = None  # None: ONNX Runtime's default set

    def resolved_op_types(self) -> tuple[str, ...]:
        return self.op_types or _ort_default_op_types()


TARGETS = {
    # On x86 without VNNI, ORT CPU runs uint8-activation QDQ fastest (yolov5n 26.5 ms vs 85 ms with int8).
    "ort-cpu": Target("ort-cpu", "uint8", False, "ONNX Runtime CPU (x86): asymmetric uint8 activations, int8 per-channel weights"),
    # TensorRT and most NPUs expect symmetric int8 activations (zero point 0).
    "tensorrt": Target("tensorrt", "int8", True, "TensorRT-style: symmetric int8 activations and weights"),
}
TARGETS["trt"] = TARGETS["tensorrt"]


def get_target(name: str, activation_type: str | None = None) -> Target:
    if name not in TARGETS:
        raise SensqError(f"unknown target {name!r}", f"use one of: {', '.join(sorted(TARGETS))}")
    t = TARGETS[name]
    if activation_type and activation_type != t.activation_type:
        if activation_type not in ("uint8", "int8"):
            raise SensqError(f"activation type {activation_type!r} not supported", "use uint8 or int8")
        t = Target(t.name, activation_type, activation_type == "int8", t.description + f" (activations overridden to {activation_type})", t.op_types)
    return t
