"""Deployment targets, one small object each (the PPQ "one quantizer per platform" idea):

    get_target("ort-cpu")       ONNX Runtime CPU (x86): uint8 asymmetric activations, overflow fix when no VNNI
    get_target("openvino-cpu")  OpenVINO CPU plugin: uint8 asymmetric activations, NNCF's CPU op set
    get_target("tensorrt")      TensorRT explicit quantization: symmetric int8, latency by bops unless cmd:/table:

Each target states activation type and symmetry, per-channel support, the overflow fix, the op types it runs in
INT8 and its default latency backend (`Target.latency`).
"""
from __future__ import annotations

from . import openvino_cpu as _openvino_cpu  # noqa: F401  (registers the targets)
from . import ort_cpu as _ort_cpu  # noqa: F401
from . import tensorrt as _tensorrt  # noqa: F401
from .base import (ACTIVATION_TYPES, OVERFLOW_FIXES, Target, available_targets, cpu_needs_reduced_range, cpu_overflow_fix, get_target,
                   ort_default_op_types, register_target)

__all__ = ["ACTIVATION_TYPES", "OVERFLOW_FIXES", "Target", "available_targets", "cpu_needs_reduced_range", "cpu_overflow_fix", "get_target",
           "ort_default_op_types", "register_target"]
