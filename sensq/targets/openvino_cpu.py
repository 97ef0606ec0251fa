"""OpenVINO, CPU plugin: reads the QDQ ONNX model (Q/DQ pairs become FakeQuantize) and runs int8 where its low-precision
transformations can move the quantization into the kernels (oneDNN u8s8, like ORT's)."""
from __future__ import annotations

from .base import ACTIVATION_TYPES, Target, cpu_overflow_fix, register_target

# NNCF's CPU hardware config (nncf 3.4, common/hardware/setups/cpu.py) lists the OpenVINO ops that take quantized inputs;
# these are their ONNX names among the ops onnxruntime's quantizer writes Q/DQ for. Mul and Sigmoid are left out:
# x*sigmoid(x) (SiLU/Swish) is one fused activation pattern in OpenVINO and NNCF puts no FakeQuantize inside it.
OPENVINO_CPU_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Concat", "AveragePool", "GlobalAveragePool",
                    "MaxPool", "Resize", "Relu", "Clip", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split",
                    "Slice", "Flatten", "Pad")


@register_target("openvino-cpu", "openvino", "ov-cpu")
def openvino_cpu() -> Target:
    fix = cpu_overflow_fix()  # same vpmaddubsw saturation as ORT without VNNI (NNCF's own default: first layer)
    return Target(
        name="openvino-cpu",
        activation_type="uint8", activation_symmetric=False,  # u8 activations feed oneDNN's u8s8 kernels directly
        description="OpenVINO CPU: asymmetric uint8 activations, symmetric int8 per-channel weights, "
                    "NNCF's CPU op set" + (", 7-bit first-layer weights (no VNNI on this CPU)" if fix != "none" else ""),
        op_types=OPENVINO_CPU_OPS,
        overflow_fix=fix,
        no_output_quantization=("Conv", "ConvTranspose", "MatMul", "Gemm"),  # NNCF: no FakeQuantize inside Conv+act
        depthwise_per_channel=True,  # NNCF's default too; its int8 kernels take a scale per channel
        latency="openvino",
        activation_types=ACTIVATION_TYPES,
        runtime="OpenVINO CPU plugin (openvino package, ONNX frontend)",
        fp16=True,  # float16 ONNX islands load; the CPU plugin computes them at its inference precision (f32 here)
        fp16_note="OpenVINO CPU reads float16 islands and computes them at its inference precision (f32 unless "
                  "--latency openvino:precision=... says otherwise); measure what it buys with --space precision",
    )
