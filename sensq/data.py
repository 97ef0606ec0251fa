"""Calibration inputs: files (images, .npy, raw float32) per model input, preprocessed into feed dicts.

Input names, shapes and dtypes come from the model unless the config gives them; a symbolic batch dimension is 1.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from .config import InputParams, QuantizeConfig
from .errors import SensqError
from .preprocess import IMAGE_SUFFIXES, ImagePreprocess

log = logging.getLogger("sensq")

SUFFIXES = {"img": IMAGE_SUFFIXES, "npy": {".npy"}, "raw": {".raw", ".bin"}}
# torchvision's ImageNet normalisation on 0-255 values (PT_IMAGENET preset)
TORCH_MEAN = [123.675, 116.28, 103.53]
TORCH_STD = [58.395, 57.12, 57.375]


@dataclass
class ModelInput:
    name: str
    shape: list[int]


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        elem = vi.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise SensqError(f"model input {vi.name} has type {onnx.TensorProto.DataType.Name(elem)}", "only float32 model inputs are supported")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in vi.type.tensor_type.shape.dim]
        if dims and dims[0] == -1:
            dims[0] = 1  # symbolic batch -> 1
        out.append(ModelInput(vi.name, dims))
    return out


def list_files(source: Path, file_type: str, input_name: str) -> list[Path]:
    """A list file (one path per line, relative to the list file, as xquant) or a folder of files."""
    if source is None:
        raise SensqError(f"Calibration input {input_name} has no data_list_path", "pass --calib <folder or list file> or set data_list_path")
    if not source.exists():
        raise SensqError(f"Calibration input {input_name} finds 0 items: {source} does not exist", "check the --calib / data_list_path path")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES[file_type])
    else:
        base = source.parent
        files = []
        for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else base / p)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise SensqError(f"calibration list {source} names {len(missing)} missing file(s), e.g. {missing[0]}",
                             "paths in a list file are relative to the list file's folder; fix or remove those lines")
    if not files:
        kinds = ", ".join(sorted(SUFFIXES[file_type]))
        raise SensqError(f"Calibration input {input_name} finds 0 items in {source}", f"put {kinds} files there or point data_list_path at a list file")
    return files


def load_custom_preprocess(spec: str, base_dir: Path) -> Callable:
    file_part, _, func = spec.rpartition(":")
    path = Path(file_part)
    if not path.is_absolute() and not path.exists():
        path = base_dir / path
    if not path.is_file():
        raise SensqError(f"preprocess_file {file_part} not found", "give 'path/to/file.py:function' relative to the working directory or the config")
    mod_spec = importlib.util.spec_from_file_location(f"sensq_user_preprocess_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise SensqError(f"preprocess_file {path} failed to import: {type(e).__name__}: {e}", "fix the error in that file") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SensqError(f"preprocess_file {path} has no function {func!r}", "check the name after ':'")
    return fn


@dataclass
class InputSource:
    """Everything needed to produce one model input from one file."""

    name: str
    shape: list[int]
    params: InputParams
    files: list[Path]
    image: ImagePreprocess | None
    custom: Callable | None

    def load(self, i: int) -> np.ndarray:
        path = self.files[i]
        if self.custom is not None:
            arr = self.custom([str(path)], {**self.params.__dict__, "input_shape": self.shape})
            arr = arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)
        elif self.params.file_type == "img":
            arr = self.image.tensor(path)
        elif self.params.file_type == "npy":
            try:
                arr = np.load(path)
            except Exception as e:
                raise SensqError(f"cannot read {path} as .npy", "save calibration arrays with numpy.save") from e
        else:
            arr = np.fromfile(path, dtype=np.float32)
        arr = np.asarray(arr, dtype=np.float32)
        want = int(np.prod([d for d in self.shape if d > 0]))
        if arr.size != want and -1 not in self.shape:
            raise SensqError(f"{path} holds {arr.size} values but input {self.name} needs shape {self.shape}",
                             "fix input_shape in the config or regenerate the file")
        return arr.reshape(self.shape) if -1 not in self.shape else arr

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(f"{self.shape}|{self.params}|{self.image.key() if self.image else ''}".encode())
        return h.hexdigest()[:16]


def image_preprocess_for(params: InputParams, shape: list[int], yolo: bool) -> ImagePreprocess:
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise SensqError(f"input shape {shape} is not an NCHW image", "use file_type npy/raw for non-image inputs, or give input_shape")
    h, w = shape[2], shape[3]
    if h <= 0 or w <= 0:
        raise SensqError(f"input has symbolic height/width {shape}", "give input_shape, e.g. [1, 3, 640, 640]")
    if params.preprocess_file == "IMAGENET":
        return ImagePreprocess(h, w, "imagenet", params.color_format or "bgr",
                               params.mean_value or [0.0] * 3, params.std_value or [1.0] * 3)
    if params.preprocess_file == "PT_IMAGENET":
        return ImagePreprocess(h, w, "imagenet", "rgb", TORCH_MEAN, TORCH_STD)
    resize = params.resize or ("letterbox" if yolo else "resize")
    color = params.color_format or ("rgb" if yolo else "bgr")
    mean = params.mean_value if params.mean_value is not None else [0.0] * 3
    std = params.std_value if params.std_value is not None else ([255.0] * 3 if yolo else [1.0] * 3)
    return ImagePreprocess(h, w, resize, color, mean, std)


KEEP_SAMPLES = 8  # the placement probe's and the plan guard's samples (a YOLO input: 4.9 MB each)


class CalibrationData:
    """Iterates feed dicts over the calibration set (at most calibration_step samples)."""

    def __init__(self, sources: list[InputSource], limit: int):
        self.sources = sources
        counts = {s.name: len(s.files) for s in sources}
        if len(set(counts.values())) > 1:
            raise SensqError(f"calibration lists differ in length {counts}", "give every input the same number of files, in matching order")
        self.n = min(limit, min(counts.values()))
        self._head: list[dict[str, np.ndarray]] = []  # analysis re-reads the first samples: load (and preprocess) once

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n):
            if i < len(self._head):
                yield self._head[i]
                continue
            feed = {s.name: s.load(i) for s in self.sources}
            if i == len(self._head) and i < KEEP_SAMPLES:
                self._head.append(feed)
            yield feed

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.n}|{'|'.join(s.fingerprint() for s in self.sources)}".encode()).hexdigest()[:16]


def build_calibration_data(cfg: QuantizeConfig, model: onnx.ModelProto, yolo: bool) -> CalibrationData:
    inputs = model_inputs(model)
    params = cfg.inputs or [InputParams()]
    if len(params) != len(inputs):
        raise SensqError(
            f"Calibration input_parametres size should equal to model inputs size: config has {len(params)}, "
            f"model has {len(inputs)} ({', '.join(i.name for i in inputs)})",
            "give one input_parametres entry (one --calib) per model input, in the model's input order")
    sources = []
    by_name = {i.name: i for i in inputs}
    for mi, p in zip(inputs, params):
        if p.input_name:  # a named entry describes that input, whatever its position in the config
            if p.input_name not in by_name:
                raise SensqError(f"input_name {p.input_name!r} is not a model input", f"model inputs are: {', '.join(by_name)}")
            mi = by_name[p.input_name]
        shape = list(p.input_shape) if p.input_shape else mi.shape
        if shape and shape[0] in (-1, 0):
            shape[0] = 1
        name = p.input_name or mi.name
        files = list_files(cfg.resolve(p.data_list_path), p.file_type, name)
        custom = None
        if p.preprocess_file and p.preprocess_file not in ("IMAGENET", "PT_IMAGENET"):
            custom = load_custom_preprocess(p.preprocess_file, Path(cfg.base_dir))
        image = image_preprocess_for(p, shape, yolo) if p.file_type == "img" and custom is None else None
        sources.append(InputSource(name, shape, p, files, image, custom))
    # Order the sources as the model's inputs (configs may name them in another order).
    order = {mi.name: i for i, mi in enumerate(inputs)}
    sources.sort(key=lambda s: order.get(s.name, 0))
    return CalibrationData(sources, cfg.calibration_step)


class SyntheticData:
    """Data-free mode (msModelSlim): smooth random images matched to the preprocessing, or N(0,1) for other inputs."""

    def __init__(self, cfg: QuantizeConfig, model: onnx.ModelProto, yolo: bool, n: int = 32):
        self.seed = cfg.seed
        params = cfg.inputs or [InputParams() for _ in model_inputs(model)]
        self.inputs = []
        by_name = {i.name: i for i in model_inputs(model)}
        for mi, p in zip(model_inputs(model), params):
            mi = by_name.get(p.input_name, mi) if p.input_name else mi
            shape = list(p.input_shape) if p.input_shape else mi.shape
            pre = image_preprocess_for(p, shape, yolo) if p.file_type == "img" and len(shape) == 4 else None
            self.inputs.append((mi.name, shape, pre))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import cv2

        rng = np.random.default_rng(self.seed)  # same seed, same synthetic set
        for _ in range(self.n):
            feed = {}
            for name, shape, pre in self.inputs:
                if pre is not None:
                    c, h, w = shape[1:]
                    low = rng.uniform(0, 255, size=(max(2, h // 32), max(2, w // 32), c)).astype(np.float32)
                    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)
                    img += rng.normal(0, 12, size=img.shape).astype(np.float32)  # texture, so edges/gradients exist
                    pixels = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
                    feed[name] = pre.normalize(pixels)[None]
                else:
                    feed[name] = rng.standard_normal([d if d > 0 else 1 for d in shape]).astype(np.float32)
            yield feed

    def fingerprint(self) -> str:
        return f"synthetic-{self.seed}-{self.n}-{[(n, s, p.key() if p else None) for n, s, p in self.inputs]}"
