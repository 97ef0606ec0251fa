"""Deployment targets: each states its quantization rules (activation type and symmetry, what gets quantized)."""
from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from functools import lru_cache

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
    # 7-bit weights against int16 saturation in ORT's u8s8 kernels on x86 without VNNI (vpmaddubsw): "first_layer"
    # (weights of layers reading a model input, whose uint8 codes span 0-255), "all", or "none". On yolov5n:
    # none 0.266 mAP, all 0.292, first_layer 0.297; EfficientNet-Lite0 top-1: all 0.880, first_layer 0.870.
    overflow_fix: str = "none"

    def resolved_op_types(self) -> tuple[str, ...]:
        return self.op_types or _ort_default_op_types()


@lru_cache(maxsize=1)
def cpu_needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI (AVX2/AVX512 without vpdpbusd), where ORT's int8 GEMM saturates."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return True
    return "vnni" not in flags


TARGETS = {
    # On x86 without VNNI, ORT CPU runs uint8-activation QDQ fastest (yolov5n 26.5 ms vs 85 ms with int8).
    "ort-cpu": Target("ort-cpu", "uint8", False, "ONNX Runtime CPU (x86): asymmetric uint8 activations, int8 per-channel weights "
                      "(7-bit on CPUs without VNNI)"),
    # TensorRT and most NPUs expect symmetric int8 activations (zero point 0).
    "tensorrt": Target("tensorrt", "int8", True, "TensorRT-style: symmetric int8 activations and weights"),
}
TARGETS["trt"] = TARGETS["tensorrt"]


OVERFLOW_FIXES = ("first_layer", "all", "none")


def get_target(name: str, activation_type: str | None = None) -> Target:
    if name not in TARGETS:
        raise SensqError(f"unknown target {name!r}", f"use one of: {', '.join(sorted(TARGETS))}")
    t = TARGETS[name]
    if t.name == "ort-cpu":
        t = replace(t, overflow_fix="first_layer" if cpu_needs_reduced_range() else "none")
    if activation_type and activation_type != t.activation_type:
        if activation_type not in ("uint8", "int8"):
            raise SensqError(f"activation type {activation_type!r} not supported", "use uint8 or int8")
        t = replace(t, activation_type=activation_type, activation_symmetric=activation_type == "int8",
                    description=t.description + f" (activations overridden to {activation_type})")
    return t
