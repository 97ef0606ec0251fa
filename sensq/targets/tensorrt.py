"""TensorRT (explicit quantization from Q/DQ): symmetric int8 only (zero points must be 0), float biases; int32
accumulation, so no overflow fix. No TensorRT on this machine: its default latency is the analytic `bops`; give `cmd:` (e.g. trtexec on
the device) or `table:` (per-layer costs measured there) for a real one."""
from __future__ import annotations

from .base import Target, register_target

# The INT8 op list of NVIDIA's TensorRT Model Optimizer (modelopt.onnx.quantization.int8), which writes the Q/DQ
# graphs TensorRT is tuned for.
TENSORRT_OPS = ("Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "ConvTranspose", "Gemm",
                "GlobalAveragePool", "MatMul", "MaxPool", "Mul")


@register_target("tensorrt", "trt")
def tensorrt() -> Target:
    return Target(
        name="tensorrt",
        activation_type="int8", activation_symmetric=True,
        description="TensorRT-style: symmetric int8 activations and per-channel weights, TensorRT Model Optimizer's op set",
        op_types=TENSORRT_OPS,
        overflow_fix="none",
        quantize_bias=False,  # TensorRT dequantizes int8/fp8/int4 only; Model Optimizer passes QuantizeBias=False
        no_output_quantization=TENSORRT_OPS,  # Q/DQ on inputs only, as Model Optimizer places them
        latency="bops",
        runtime="TensorRT 10 (explicit quantization)",
        fp16=True,  # fp16 layers are TensorRT's own precision; the trtexec export pins each group's
    )
