"""A deployment target states its quantization rules: activation type and symmetry, weight granularity, the overflow
fix its int8 kernels need, which op types it runs in INT8, and the latency backend that times it by default.

Targets register a factory by name (`register_target`); `get_target(name)` calls it, so facts that depend on the
machine (VNNI for the overflow fix) are read when the target is used, never assumed.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, replace
from typing import Callable

from ..errors import SensqError

OVERFLOW_FIXES = ("first_layer", "all", "none")
# Where Q/DQ go: "fused" = the target's own placement (ORT CPU: every op's inputs and outputs, so QLinear kernels
# fuse); "inputs" = only the inputs of compute layers and of ops that pass quantized values through (NNCF's and
# OpenVINO's placement): nothing quantizes a conv's pre-activation or the inside of SiLU, at the cost, on ORT, of
# running the convs in float after their DequantizeLinear.
PLACEMENTS = ("fused", "inputs")
INPUT_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Activation types sensq can write. 16-bit Q/DQ need ONNX opset 21 (build.py raises the model's opset to it).
ACTIVATION_TYPES = ("uint8", "int8", "uint16", "int16")


def ort_default_op_types() -> tuple[str, ...]:
    """The op set onnxruntime.quantize_static quantizes by default (QDQ + QLinear registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QDQRegistry) | set(QLinearOpsRegistry)))


def cpu_needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI, whose u8s8 kernels (vpmaddubsw) saturate int16 partial sums.

    Applies to ONNX Runtime's and OpenVINO's CPU int8 kernels alike; CPUs with AVX-512 VNNI or AVX-VNNI accumulate
    in int32 (vpdpbusd) and need no fix. Read from /proc/cpuinfo on every call through sensq.latency.machine."""
    from ..latency.machine import has_vnni

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not has_vnni()


def cpu_overflow_fix() -> str:
    # 7-bit weights for layers reading a model input (uint8 codes span 0-255 there); on yolov5n without VNNI:
    # none 0.266 mAP, all 0.292, first_layer 0.297; EfficientNet-Lite0 top-1: all 0.880, first_layer 0.870.
    return "first_layer" if cpu_needs_reduced_range() else "none"


@dataclass(frozen=True)
class Target:
    name: str
    activation_type: str  # one of ACTIVATION_TYPES
    activation_symmetric: bool
    description: str
    op_types: tuple[str, ...] | None = None  # op types quantized (run in INT8); None: ONNX Runtime's default set
    # 7-bit weights against int16 saturation: "first_layer", "all" or "none" (see cpu_overflow_fix)
    overflow_fix: str = "none"
    per_channel: bool = True  # the runtime supports per-channel (per output channel) weight scales
    weight_type: str = "int8"
    weight_symmetric: bool = True
    quantize_bias: bool = True  # int32 bias Q/DQ (onnxruntime's default); TensorRT takes float biases only
    # op types whose outputs get no Q/DQ of their own (onnxruntime's OpTypesToExcludeOutputQuantization): the next
    # quantized op quantizes its input instead. ORT CPU wants Conv outputs quantized (that makes QLinearConv);
    # OpenVINO and TensorRT fuse the activation that follows a Conv and quantize after it.
    no_output_quantization: tuple[str, ...] = ()
    # depthwise conv inputs quantized per channel by default (passes/depthwise_inputs.py): where the runtime runs
    # per-channel activation quantization in its int8 kernels
    depthwise_per_channel: bool = False
    latency: str = "ort"  # default latency backend spec (sensq.latency.make_latency_backend)
    runtime: str = ""  # who runs the model, in words
    # activation types the runtime takes; 16-bit ones (A16W8) run as fake-quant on ORT CPU (no 16-bit kernels)
    activation_types: tuple[str, ...] = ("uint8", "int8")
    # runs float16 islands (group precision "fp16"): layers kept float there may run in half precision
    fp16: bool = False
    fp16_note: str = ""  # why fp16 is (not) offered on this target, for the search's log and report

    def resolved_op_types(self) -> tuple[str, ...]:
        """Op types to quantize, restricted to those onnxruntime's quantizer (which writes the QDQ graph) knows."""
        known = ort_default_op_types()
        return known if self.op_types is None else tuple(op for op in self.op_types if op in known)

    def latency_spec(self, user_spec: str | None = None) -> str:
        """The latency backend to use: what the user asked for, else this target's default."""
        return user_spec or self.latency

    def with_placement(self, placement: str | None) -> "Target":
        """This target with Q/DQ on compute-layer inputs only (placement "inputs"); itself for None/"fused"."""
        if placement in (None, "fused") or self.no_output_quantization:
            return self
        from .openvino_cpu import OPENVINO_CPU_OPS

        return replace(self, op_types=OPENVINO_CPU_OPS, no_output_quantization=INPUT_COMPUTE_OPS,
                       description=self.description + "; Q/DQ on compute-layer inputs only")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["op_types"] = list(self.resolved_op_types())
        return d


_FACTORIES: dict[str, Callable[[], Target]] = {}
_ALIASES: dict[str, str] = {}


def register_target(name: str, *aliases: str) -> Callable[[Callable[[], Target]], Callable[[], Target]]:
    """Decorator on a zero-argument factory returning the Target (called at each get_target, so run-time facts are fresh)."""

    def deco(factory: Callable[[], Target]) -> Callable[[], Target]:
        _FACTORIES[name] = factory
        for a in aliases:
            _ALIASES[a] = name
        return factory

    return deco


def available_targets() -> list[str]:
    return sorted(_FACTORIES)


def get_target(name: str, activation_type: str | None = None) -> Target:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise SensqError(f"unknown target {name!r}", f"use one of: {', '.join(available_targets())}")
    t = _FACTORIES[key]()
    if activation_type and activation_type != t.activation_type:
        if activation_type not in ACTIVATION_TYPES:
            raise SensqError(f"activation type {activation_type!r} not supported", f"use one of: {', '.join(ACTIVATION_TYPES)}")
        if activation_type not in t.activation_types:
            raise SensqError(f"target {t.name} does not take {activation_type} activations",
                             f"use one of: {', '.join(t.activation_types)}, or another --target")
        # int8 means symmetric (TensorRT's convention); 16-bit grids stay asymmetric: no kernel needs a zero point of
        # 0 there, and an asymmetric grid keeps the extra bit for one-sided activations (ReLU, SiLU)
        t = replace(t, activation_type=activation_type, activation_symmetric=activation_type == "int8",
                    description=t.description + f" (activations overridden to {activation_type})")
    return t


def activation_bits(activation_type: str) -> int:
    return 16 if activation_type.endswith("16") else 8
