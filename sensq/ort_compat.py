"""sensq builds QDQ graphs with onnxruntime.quantization internals (QDQQuantizer, TensorData/TensorsData, the op
registries, qdq_quantizer.find_by_name): checked once at import, so an onnxruntime that moved them fails with one
line naming the supported range instead of an AttributeError deep in a build."""
from __future__ import annotations

import importlib

SUPPORTED = (">=1.20", "<1.33")  # the full test suite passes on 1.20.1 (oldest) and 1.32.0 (newest, CI); pyproject.toml says the same
INTERNALS = {
    "onnxruntime.quantization.qdq_quantizer": ("QDQQuantizer", "find_by_name"),
    "onnxruntime.quantization.calibrate": ("CalibrationMethod", "TensorData", "TensorsData"),
    "onnxruntime.quantization.quant_utils": ("QuantType",),
    "onnxruntime.quantization.registry": ("QDQRegistry", "QLinearOpsRegistry"),
    # a16 groups (sensq/precision.py): the 8/16-bit boundary conversions
    "onnxruntime.quantization.tensor_quant_overrides": ("TensorQuantOverridesHelper",),
    "onnxruntime.quantization.execution_providers.qnn.mixed_precision_overrides_utils":
        ("MixedPrecisionTensorQuantOverridesFixer",),
}


def missing_internals() -> list[str]:
    """Names sensq needs that this onnxruntime lacks (module.attr)."""
    out = []
    for module, names in INTERNALS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            out.append(module)
            continue
        out += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
    return out


def requantizes_float_weights() -> bool:
    """onnxruntime >= 1.21 (graph optimizer WeightBiasQuantization) quantizes the float weights of a Conv/Gemm that
    reads a DequantizeLinear output, so a float node needs sensq's shield (passes/float_shield.py); 1.20 runs it float."""
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) >= (1, 21)


def check_onnxruntime() -> None:
    import onnxruntime

    from .errors import SensqError

    missing = missing_internals()
    if missing:
        raise SensqError(f"onnxruntime {onnxruntime.__version__} lacks {', '.join(missing)}, which sensq builds with",
                         f"install a supported onnxruntime: pip install 'onnxruntime{','.join(SUPPORTED)}'")


check_onnxruntime()
