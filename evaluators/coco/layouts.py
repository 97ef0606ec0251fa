"""Which detector export a model is, and the preprocessing that export was trained with.

A detector's decode layout and its input preprocessing travel together: an Ultralytics export wants a centred
letterbox, RGB, x/255; a raw YOLOX export wants a top-left letterbox, BGR, 0-255. Getting the preprocessing wrong
does not fail, it silently costs most of the mAP, so recognition says why it decided, and `None` means "cannot
tell" (the caller then asks the user, or checks candidates on data: defaults.py).

Recognised:
  ultralytics  the model carries Ultralytics metadata (names / stride / task / imgsz)
  yolox        1 x N x (5 + C) with N = sum over strides 8/16/32 of (H/s)(W/s) (one anchor point per cell; YOLOv5's
               grid has three) and no Exp in the graph: YOLOX's raw export (the default of its export_onnx.py),
               whose boxes are decoded here: (xy + grid) * stride, exp(wh) * stride
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

YOLOX_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class DetectorPreprocess:
    """Input preprocessing of a detector export; mean/std on the 0-255 scale, as in xquant configs."""

    resize: str
    color: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str

    def flags(self) -> str:
        """The CLI flags that select this preprocessing explicitly."""
        return f"--preset {self.name}"


ULTRALYTICS = DetectorPreprocess("letterbox", "rgb", (0.0,) * 3, (255.0,) * 3, "yolo")
YOLOX = DetectorPreprocess("letterbox_topleft", "bgr", (0.0,) * 3, (1.0,) * 3, "yolox")
CANDIDATES = (ULTRALYTICS, YOLOX)


@dataclass(frozen=True)
class DetectorExport:
    """What recognition found: decode layout (None: from the output shape), preprocessing (None: unknown), why."""

    layout: str | None
    preprocess: DetectorPreprocess | None
    reason: str


ULTRALYTICS_KEYS = ("names", "stride", "task", "imgsz")


def grid_cells(hw: tuple[int, int], strides=YOLOX_STRIDES) -> int:
    return sum((hw[0] // s) * (hw[1] // s) for s in strides)


def recognize(model) -> DetectorExport:
    """The export of a detector ModelProto (FP32 or QDQ: the output shape and op types are what count)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if any(k in meta for k in ULTRALYTICS_KEYS):
        return DetectorExport(None, ULTRALYTICS, "Ultralytics metadata in the model")
    hw, out = _input_hw(model), _output_shape(model)
    if hw and out and len(out) >= 2 and out[-1] > 5 and out[-2] == grid_cells(hw):
        if not any(n.op_type == "Exp" for n in model.graph.node):
            return DetectorExport("yolox", YOLOX, f"raw YOLOX grid: output {out[-2]}x{out[-1]} = one row per cell of "
                                                  f"strides 8/16/32 at {hw[0]}x{hw[1]}, no Exp in the graph")
        return DetectorExport("yolov5", YOLOX, "decoded YOLOX grid (one row per cell of strides 8/16/32, Exp in the graph)")
    return DetectorExport(None, None, "no Ultralytics metadata and no known raw-grid output")


def _dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else 0 for d in value_info.type.tensor_type.shape.dim]


def _input_hw(model) -> tuple[int, int] | None:
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            d = _dims(vi)
            return (d[2], d[3]) if len(d) == 4 and d[2] > 0 and d[3] > 0 else None
    return None


def _output_shape(model) -> list[int] | None:
    return _dims(model.graph.output[0]) if model.graph.output else None


@lru_cache(maxsize=8)
def _grid(hw: tuple[int, int], n: int):
    grids, strides = [], []
    for s in YOLOX_STRIDES:
        h, w = hw[0] // s, hw[1] // s
        yv, xv = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # row-major per level, as YOLOX's export
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((h * w, 1), s))
    grid, stride = np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)
    if len(grid) != n:
        from sensq.errors import SensqError

        raise SensqError(f"YOLOX output has {n} rows, the {hw[0]}x{hw[1]} grid of strides 8/16/32 has {len(grid)}",
                         "pass the model's input size (imgsz) or layout='yolov5' for a decoded export")
    return grid, stride


def decode_yolox(out: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Raw YOLOX rows -> YOLOv5-style rows (cx, cy, w, h in input pixels, objectness, class scores)."""
    grid, stride = _grid(tuple(hw), len(out))
    rows = np.array(out, np.float32, copy=True)
    rows[:, :2] = (rows[:, :2] + grid) * stride
    rows[:, 2:4] = np.exp(rows[:, 2:4]) * stride
    return rows


PLAUSIBLE_BOXES = (1, 100)  # confident detections on a real photo; a wrong input scale gives none or max_det junk


def plausible_images(model, files, pre: DetectorPreprocess, layout: str | None = None, conf: float = 0.25) -> int:
    """On how many of `files` the model finds a plausible number of confident boxes (score >= conf, after NMS)
    under `pre`: a few FP32 inferences that tell a right preprocessing (a trained detector finds a handful of
    objects on a real photo) from a wrong one (none, or the max_det limit of junk from a saturated input)."""
    from sensq.preprocess import ImagePreprocess
    from sensq.runtime import make_session

    from .decode import detect_layout, postprocess

    hw = _input_hw(model)
    if hw is None:
        return -1
    session = make_session(model)
    name = session.get_inputs()[0].name
    meta = {p.key: p.value for p in model.metadata_props}
    ip = ImagePreprocess(hw[0], hw[1], resize=pre.resize, color_format=pre.color, mean=list(pre.mean), std=list(pre.std))
    lo, hi = PLAUSIBLE_BOXES
    found = 0
    for f in files:
        out = session.run(None, {name: ip.tensor(f)})[0][0]
        n = len(postprocess(out, layout or detect_layout(out.shape, meta), conf, hw=hw)[1])
        found += lo <= n <= hi
    return found
