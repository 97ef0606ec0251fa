"""ONNX Runtime, CPU execution provider on x86: the QDQ graph sensq builds is what this runtime fuses into QLinear kernels."""
from __future__ import annotations

from .base import ACTIVATION_TYPES, Target, cpu_overflow_fix, register_target


@register_target("ort-cpu", "ort", "onnxruntime")
def ort_cpu() -> Target:
    fix = cpu_overflow_fix()
    return Target(
        name="ort-cpu",
        # ORT's x86 kernels are u8s8: uint8 activations run fastest (yolov5n without VNNI: 26.5 ms vs 85 ms with int8)
        activation_type="uint8", activation_symmetric=False,
        description="ONNX Runtime CPU (x86): asymmetric uint8 activations, symmetric int8 per-channel weights"
                    + (", 7-bit first-layer weights (no VNNI on this CPU)" if fix != "none" else " (VNNI: full 8-bit weights)"),
        op_types=None,  # everything onnxruntime's quantizer handles
        overflow_fix=fix,
        latency="ort",
        activation_types=ACTIVATION_TYPES,
        runtime="onnxruntime CPUExecutionProvider",
        fp16_note="ONNX Runtime's CPU provider runs float16 models no faster than float32 on x86 (all-fp16 / FP32: "
                  "yolov5n 1.005x, YOLOX-Nano 0.951x [0.908, 1.013], EfficientNet-Lite0 1.385x; bench/bench_ptq.py), "
                  "so fp16 is not offered for ort-cpu",
    )
