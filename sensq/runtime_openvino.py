"""OpenVINO as a second runtime (optional extra `openvino`): compile a (QDQ) ONNX model for the CPU plugin, and a
session object with the subset of onnxruntime's InferenceSession interface the evaluators use, so a model can be
scored on OpenVINO.

Settings fixed for comparable numbers: `threads` inference threads, one stream, the LATENCY hint, CPU pinning off
(the machine is shared), and inference precision f32. OpenVINO's CPU default is bf16 on CPUs with AVX512_BF16 or
AMX (this machine has AVX512_BF16), which would time and score float layers in bf16; pass precision="bf16" to see
what a deployment with OpenVINO defaults runs. Q/DQ pairs become FakeQuantize; the low-precision transformations
run the quantized layers in int8.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

from .errors import RuntimeRejected, SensqError

INSTALL_FIX = 'pip install -e ".[openvino]" (or pip install openvino)'
PRECISIONS = ("f32", "bf16", "f16")

_ONNX_TYPE_NAMES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "i64": "tensor(int64)",
                    "i32": "tensor(int32)", "i16": "tensor(int16)", "i8": "tensor(int8)", "u8": "tensor(uint8)",
                    "boolean": "tensor(bool)"}


def require_openvino():
    try:
        import openvino
    except ImportError as e:
        raise SensqError("the openvino package is not installed (needed for --latency openvino / --target openvino-cpu)",
                         INSTALL_FIX) from e
    return openvino


@lru_cache(maxsize=1)
def core():
    return require_openvino().Core()


def openvino_version() -> str:
    return require_openvino().__version__


def device_name() -> str:
    return str(core().get_property("CPU", "FULL_DEVICE_NAME"))


def _onnx_bytes(model) -> bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise SensqError(f"model file not found: {path}", "check the path given to --model")
    return path.read_bytes()


def compile_model(model, threads: int, precision: str = "f32", streams: int = 1):
    """Compiled model for the CPU plugin from a path, ModelProto or serialized bytes (ONNX)."""
    if precision not in PRECISIONS:
        raise SensqError(f"OpenVINO precision {precision!r} not supported", f"use one of: {', '.join(PRECISIONS)}")
    ov_core = core()
    try:
        ov_model = ov_core.read_model(_onnx_bytes(model))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SensqError(f"OpenVINO cannot read the model: {first[:300]}", "check that the file is a complete ONNX model (opset >= 13)") from e
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": int(streams), "PERFORMANCE_HINT": "LATENCY",
              "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": precision}
    try:
        return ov_core.compile_model(ov_model, "CPU", config)
    except RuntimeError as e:  # e.g. a transformation pass that cannot handle one Q/DQ placement
        import openvino

        lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().startswith("Exception from")]
        detail = " ".join(lines)[:300] or type(e).__name__
        raise RuntimeRejected(f"OpenVINO {openvino.__version__.split('-')[0]} cannot compile this model for CPU: {detail}",
                              "keep other layers float, or measure with --latency ort") from e


def _port_info(port) -> SimpleNamespace:
    shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
    return SimpleNamespace(name=port.get_any_name(), shape=shape,
                           type=_ONNX_TYPE_NAMES.get(port.get_element_type().get_type_name(), "tensor(unknown)"))


class OpenVinoSession:
    """run / get_inputs / get_outputs / get_modelmeta like onnxruntime.InferenceSession, on OpenVINO's CPU plugin."""

    def __init__(self, model, threads: int, precision: str = "f32"):
        data = _onnx_bytes(model)
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(data)
        self.model_proto = proto  # what evaluators recognise the export from (evaluators/coco/layouts.py)
        self.compiled = compile_model(data, threads, precision)
        self.request = self.compiled.create_infer_request()
        self._meta = SimpleNamespace(custom_metadata_map={p.key: p.value for p in proto.metadata_props},
                                     producer_name=proto.producer_name, graph_name=proto.graph.name)
        self._inputs = [_port_info(p) for p in self.compiled.inputs]
        self._outputs = [_port_info(p) for p in self.compiled.outputs]

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    def get_modelmeta(self):
        return self._meta

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        results = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        names = output_names or [o.name for o in self._outputs]
        return [np.array(results[self.compiled.output(n)]) for n in names]


def openvino_session(model, threads: int | None = None, precision: str = "f32") -> OpenVinoSession:
    """An evaluation session on OpenVINO (threads default: sensq.runtime.DEFAULT_THREADS)."""
    from .runtime import DEFAULT_THREADS

    require_openvino()  # checked on every call: core() is cached, the package may have gone since
    return OpenVinoSession(model, threads or DEFAULT_THREADS, precision)
