"""Precision per layer group: int8 (the target's 8-bit activations), a16 (16-bit activations, int8 weights) or fp32.

A plan lists the nodes of its a16 groups (`PrecisionPlan.a16_nodes`); the builder turns them into onnxruntime
TensorQuantOverrides: each such node's outputs get the 16-bit type, and onnxruntime's own mixed-precision fixer
(MixedPrecisionTensorQuantOverridesFixer, written for its QNN provider, generic over QDQ graphs) adds the type
conversions at the boundaries (an 8-bit tensor read by a 16-bit node is re-quantized to 16 bits, and back).
"""
from __future__ import annotations

import onnx
from onnxruntime.quantization.quant_utils import QuantType

from .errors import SensqError

PRECISIONS = ("int8", "a16", "fp32")
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16, "int16": QuantType.QInt16}
WIDE = {"uint8": "uint16", "int8": "int16", "uint16": "uint16", "int16": "int16"}


def target_precisions(target) -> tuple[str, ...]:
    """The group precisions a target runs: a16 only where it takes the 16-bit counterpart of its activation type."""
    a16 = WIDE[target.activation_type] in target.activation_types
    return tuple(p for p in PRECISIONS if p != "a16" or a16)


def wide_type(activation_type: str) -> str:
    return WIDE[activation_type]


def a16_overrides(model: onnx.ModelProto, a16_nodes: list[str], quantized: set[str], activation_type: str,
                  symmetric: bool) -> dict[str, list[dict]]:
    """TensorQuantOverrides putting the activations of `a16_nodes` on the 16-bit grid (`quantized`: the tensors
    that get Q/DQ at all). `model` must be shape-inferred; the result holds ORT QuantType values."""
    from onnxruntime.quantization.execution_providers.qnn.mixed_precision_overrides_utils import \
        MixedPrecisionTensorQuantOverridesFixer
    from onnxruntime.quantization.tensor_quant_overrides import TensorQuantOverridesHelper

    default, wide = QUANT_TYPES[activation_type], QUANT_TYPES[WIDE[activation_type]]
    if default == wide:
        return {}
    nodes = {n.name: n for n in model.graph.node}
    missing = [n for n in a16_nodes if n not in nodes]
    if missing:
        raise SensqError(f"a16 node {missing[0]!r} not in graph", "regenerate the plan for this model")
    initial = {t: [{"quant_type": wide}] for n in a16_nodes for t in nodes[n].output if t in quantized}
    if not initial:
        return {}
    helper = TensorQuantOverridesHelper(initial)
    try:
        fixer = MixedPrecisionTensorQuantOverridesFixer.create_from_model(helper, model, default)
        fixer.apply(default, symmetric)
    except ValueError as e:
        raise SensqError(f"cannot mix 8- and 16-bit activations here: {e}", "keep these groups int8 or fp32") from e
    return helper.get_dict()


def wide_tensors(overrides: dict[str, list[dict]]) -> set[str]:
    """Tensors quantized on the 16-bit grid (their own type, not a conversion of an 8-bit one)."""
    wide = (QuantType.QInt16, QuantType.QUInt16)
    return {t for t, o in overrides.items() if o and o[0].get("quant_type") in wide}
