"""ONNX Runtime sessions made one way everywhere, so latency and results are comparable and deterministic."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import SensqError

DEFAULT_THREADS = int(os.environ.get("SENSQ_THREADS", "0")) or min(os.cpu_count() or 1, 4)


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or DEFAULT_THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # ORT prints warnings for every unfused QDQ pair otherwise
    # Spin-waiting threads fight the evaluator's post-processing thread (and any other load) for 2 cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def make_session(model, threads: int | None = None, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """Session on the CPU provider from a path, a ModelProto or serialized bytes; sessions (and objects with the
    session interface, e.g. a lazily created or an OpenVINO-backed one) are returned as they are."""
    if isinstance(model, ort.InferenceSession) or (hasattr(model, "run") and hasattr(model, "get_inputs")):
        return model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise SensqError(f"model file not found: {model}", "check the path given to --model")
        model = str(model)
    try:
        return ort.InferenceSession(model, sess_options=options or session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SensqError(f"ONNX Runtime cannot load the model: {first[:300]}", "export the model again (opset >= 13) or check that the file is a complete .onnx") from e


def scoring_runtime(target_name: str, threads: int | None = None):
    """The runtime a target deploys on, for scoring accuracy: (one-line description, session factory or None for
    ONNX Runtime's CPU provider). OpenVINO scores in f32 (INFERENCE_PRECISION_HINT), not its bf16 CPU default: an
    FP32 reference must be FP32 (YOLOX-Nano moves from 0.2903 to 0.2920 under bf16)."""
    if target_name == "openvino-cpu":
        from .runtime_openvino import openvino_session, openvino_version

        def factory(model):
            if hasattr(model, "run") and hasattr(model, "get_inputs"):
                return model
            return openvino_session(model, threads)

        return f"OpenVINO {openvino_version()} CPU, INFERENCE_PRECISION_HINT f32", factory
    return f"onnxruntime {ort.__version__} CPUExecutionProvider", None

