"""Tiny ONNX models (built with onnx.helper) and calibration-file writers shared by the quantizer-core tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(rng: np.random.Generator, name: str, shape: list[int], scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def conv_relu_conv(path: Path, seed: int = 0) -> Path:
    """x [1,3,8,8] -> conv1 (3->4, 3x3, pad 1) -> relu -> conv2 (4->2, 1x1) -> y [1,2,8,8].

    Tensors: x, c1 (conv1), r1 (relu), y (conv2, the graph output).
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "conv_relu_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [_init(rng, "w1", [4, 3, 3, 3]), _init(rng, "b1", [4], 0.1), _init(rng, "w2", [2, 4, 1, 1]), _init(rng, "b2", [2], 0.1)],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


# Shapes of the two inputs of two_input_model: deliberately different, so a source paired with the wrong input fails.
X1_SHAPE = [1, 3, 8, 8]
X2_SHAPE = [1, 1, 8, 8]


def two_input_model(path: Path, seed: int = 1) -> Path:
    """x1 [1,3,8,8] -> conv_a (3->4, 3x3) \\
                                         add -> relu -> y [1,4,8,8]
       x2 [1,1,8,8] -> conv_b (1->4, 3x3) /
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x1", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x2", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("x1", TensorProto.FLOAT, X1_SHAPE),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, X2_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [_init(rng, "wa", [4, 3, 3, 3]), _init(rng, "ba", [4], 0.1), _init(rng, "wb", [4, 1, 3, 3]), _init(rng, "bb", [4], 0.1)],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def write_pngs(folder: Path, n: int = 4, size: tuple[int, int] = (10, 12), seed: int = 0) -> list[Path]:
    """n random colour PNGs (h, w = size) written with cv2."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        assert cv2.imwrite(str(p), rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
        paths.append(p)
    return paths


def write_arrays(folder: Path, shape: list[int], n: int, kind: str = "npy", seed: int = 0, loc: float = 0.0,
                 scale: float = 1.0) -> list[Path]:
    """n float32 arrays N(loc, scale) of `shape` as .npy (numpy.save) or .raw (float32 tofile)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = (rng.standard_normal(shape) * scale + loc).astype(np.float32)
        p = folder / f"s_{i:03d}.{kind}"
        if kind == "npy":
            np.save(p, arr)
        else:
            arr.tofile(p)
        paths.append(p)
    return paths


def write_config(path: Path, model: Path, inputs: list[dict], **quant) -> Path:
    """An xquant-layout JSON config (input_parametres spelled as xquant does)."""
    cfg = {
        "model_parameters": {"onnx_model": str(model), "working_dir": str(Path(path).parent / "out"), "skip_onnxsim": False},
        "calibration_parameters": {"calibration_step": 8, "input_parametres": inputs},
        "quantization_parameters": {"analysis_enable": False, **quant},
    }
    Path(path).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return Path(path)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def run_model(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def qdq_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
