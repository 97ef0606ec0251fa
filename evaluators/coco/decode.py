"""Decode + NMS of YOLO detection outputs (Ultralytics non_max_suppression with multi_label=True, vectorised).

Layouts (one image's output, batch dimension removed):
  yolov5   N x (5 + C): cx, cy, w, h (input pixels), objectness, C class probabilities; score = obj * class
  yolov8   (4 + C) x N, or N x (4 + C) when transposed: cx, cy, w, h, C class probabilities (YOLOv8/11, YOLO26
           default export)
  yolox    N x (5 + C) raw grid (YOLOX's default export): box offsets per cell of strides 8/16/32, objectness, C
           class scores; decoded to the yolov5 rows first (layouts.py), then the same multi-label NMS
  end2end  K x 6: x1, y1, x2, y2 (input pixels), score, class index, best first, after an in-graph top-k (YOLO26
           with nms=False, YOLOv10); already final, so no NMS
"""
from __future__ import annotations

import cv2
import numpy as np

from sensq.errors import SensqError

from .dataset import _parse_names
from .layouts import decode_yolox

LAYOUTS = ("yolov5", "yolov8", "yolox", "end2end")
# Upstream validators' NMS IoU: yolov5 val.py uses 0.6, ultralytics (v8/11) DetectionValidator 0.7; end-to-end
# outputs are not suppressed again; YOLOX's COCO evaluation uses 0.65.
DEFAULT_IOU = {"yolov5": 0.6, "yolov8": 0.7, "yolox": 0.65, "end2end": None}
END2END_COLUMNS = 6
COCO_CLASSES = 80


def model_names(metadata: dict[str, str]) -> list[str] | None:
    try:
        return _parse_names(metadata["names"]) if "names" in metadata else None
    except (ValueError, SyntaxError):
        return None


def num_classes(layout: str, shape: tuple[int, ...], names: list[str] | None) -> int:
    """Class count of a detection output of `shape` (one image) in `layout`; the model's names win when present.

    An end-to-end output carries class indices, not one column per class, so without names its class count is
    not in the shape: COCO's 80 is assumed (Ultralytics exports always carry names)."""
    if names:
        return len(names)
    shape = tuple(int(s) for s in shape[-2:])
    if layout in ("yolov5", "yolox"):
        return shape[1] - 5
    if layout == "yolov8":
        return min(shape) - 4
    if layout == "end2end":
        return COCO_CLASSES
    raise SensqError(f"unknown detection layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def detect_layout(shape: tuple[int, ...], metadata: dict[str, str] | None = None) -> str:
    """'yolov5' (N x (5+C) rows with objectness), 'yolov8' ((4+C) x N, YOLOv8/11/26) or 'end2end' (K x 6 after an
    in-graph top-k: YOLO26 nms=False, YOLOv10) from the output shape and the Ultralytics metadata."""
    metadata = metadata or {}
    shape = tuple(int(s) for s in shape[-2:])
    rows, cols = shape
    names = model_names(metadata)
    nc = len(names) if names else None
    major = str(metadata.get("version", "")).split(".")[0]
    # K x 6 (x1, y1, x2, y2, score, class); not a (4 + 2)-class yolov8 row layout, not a 1-class yolov5 one.
    six = cols == END2END_COLUMNS and rows > cols and nc not in (1, 2)
    if "end2end" in metadata and _truthy(metadata["end2end"]):
        if cols != END2END_COLUMNS:
            raise SensqError(f"end-to-end model output {shape} is not K x 6 (x1, y1, x2, y2, score, class)",
                             "export with Ultralytics' own exporter (nms=False) or pass layout='yolov8'")
        return "end2end"
    if "task" in metadata or ("stride" in metadata and major.isdigit() and int(major) >= 8):  # ultralytics >= 8
        if metadata.get("task", "detect") != "detect":
            raise SensqError(f"model task is '{metadata['task']}', not detection", "evaluate a detect model (YOLOv8/11 *-det export)")
        return "end2end" if six and "end2end" not in metadata else "yolov8"
    if nc is not None:
        if cols == nc + 5:
            return "yolov5"
        if six:
            return "end2end"
        if rows >= nc + 4 and rows < cols:
            return "yolov8"
        if cols == nc + 4:
            return "yolov8"
    if rows < cols:
        return "yolov8"  # channels first: (4+C) x N
    if cols == END2END_COLUMNS and rows <= 1000:
        return "end2end"  # a max_det-sized list; yolov5's one-class grid has thousands of rows
    if cols > 5:
        return "yolov5"
    raise SensqError(f"output shape {shape} is not a YOLO detection head",
                     "export the model with Ultralytics (no NMS in the graph) or pass layout='yolov5'/'yolov8'/'end2end'")


def candidates(output: np.ndarray, layout: str, conf: float, nc: int | None = None, hw=None):
    """Every (box, class) whose score exceeds conf: boxes cx,cy,w,h (input pixels), float32 scores, int classes.
    hw: the model's input height, width (needed to decode a raw YOLOX grid)."""
    out = np.asarray(output)
    if out.ndim == 3:
        out = out[0]
    if layout == "yolox":
        if hw is None:
            raise SensqError("decoding a raw YOLOX grid needs the model's input size", "pass imgsz=(H, W)")
        out, layout = decode_yolox(out, hw), "yolov5"
    if layout == "yolov5":
        nc = nc or out.shape[1] - 5
        x = out[out[:, 4] > conf]  # objectness gate first, as yolov5's NMS
        cls = x[:, 5:5 + nc] * x[:, 4:5]
        i, j = np.nonzero(cls > conf)
        return x[i, :4], cls[i, j], j
    if layout == "yolov8":
        if out.shape[0] > out.shape[1]:  # N x (4+C) (transposed export)
            out = out.T
        nc = nc or out.shape[0] - 4
        cls = out[4:4 + nc]
        j, i = np.nonzero(cls > conf)
        return out[:4, i].T, cls[j, i], j
    if layout == "end2end":
        cls = np.rint(out[:, 5])
        x = out[(out[:, 4] > conf) & (cls >= 0) & (cls < (nc or np.inf))]  # an index past the classes is no class
        xyxy = x[:, :4].astype(np.float64)
        cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        return cxcywh, x[:, 4], np.rint(x[:, 5]).astype(np.int64)
    raise SensqError(f"unknown detection layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")


def nms_per_class(boxes_xywh: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Class-aware greedy NMS (cv2.dnn.NMSBoxes per class present); kept indices sorted by score, descending.

    Per class rather than cv2.dnn.NMSBoxesBatched: the batched form compares every box with every kept box of any
    class and is ~3x slower here.
    """
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(classes, kind="stable")
    c = classes[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    ends = np.r_[starts[1:], len(c)]
    keep = []
    for s, e in zip(starts, ends):
        idx = order[s:e]
        if e - s > 1:
            idx = idx[np.asarray(cv2.dnn.NMSBoxes(boxes_xywh[idx], scores[idx], 0.0, iou), np.int64).reshape(-1)]
        keep.append(idx)
    keep = np.concatenate(keep)
    return keep[np.argsort(-scores[keep], kind="stable")]


def _nms_keep(boxes, scores, classes, iou, max_det, max_nms) -> np.ndarray:
    # Candidates are ranked by score; only the top max_nms go to NMS (as Ultralytics). NMS is greedy in score order,
    # so a prefix of the ranking decides its own boxes exactly: grow the prefix until it yields max_det boxes.
    order = np.argsort(-scores, kind="stable")[:max_nms]
    prefix = 3072 if len(order) > 6144 else len(order)  # measured on yolov5n/COCO: ~3k candidates hold 300 boxes
    while True:
        idx = order[:prefix]
        keep = idx[nms_per_class(boxes[idx], scores[idx], classes[idx], iou)]
        if len(keep) >= max_det or prefix >= len(order):
            return keep[:max_det]
        prefix *= 4


def postprocess(output: np.ndarray, layout: str, conf: float = 0.001, iou: float | None = None, max_det: int = 300,
                meta: dict | None = None, max_nms: int = 30000, nc: int | None = None, hw=None):
    """Decode one image's raw YOLO output -> (boxes xyxy, scores, class indices), at most max_det, best first.

    Boxes are in original-image pixels when `meta` (from ImagePreprocess.pixels with letterbox) is given: padding
    removed, divided by the ratio, clipped to the image; otherwise in model-input pixels.
    """
    cxcywh, scores, classes = candidates(output, layout, conf, nc, hw)
    boxes = np.empty((len(scores), 4), np.float64)
    boxes[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
    boxes[:, 2:] = cxcywh[:, 2:]
    if layout == "end2end":  # already selected in the graph: best first, at most max_det, no NMS
        keep = np.argsort(-scores, kind="stable")[:max_det]
    else:
        keep = _nms_keep(boxes, scores, classes, DEFAULT_IOU[layout] if iou is None else iou, max_det, max_nms)
    xyxy = boxes[keep]
    xyxy[:, 2:] += xyxy[:, :2]
    if meta is not None and "ratio" in meta:
        (rw, rh), (pw, ph) = meta["ratio"], meta["pad"]
        h0, w0 = meta["orig_shape"]
        xyxy -= (pw, ph, pw, ph)
        xyxy /= (rw, rh, rw, rh)
        np.clip(xyxy[:, 0::2], 0, w0, out=xyxy[:, 0::2])
        np.clip(xyxy[:, 1::2], 0, h0, out=xyxy[:, 1::2])
    return xyxy, scores[keep], classes[keep].astype(np.int64)


def to_coco_rows(image_id: int, xyxy: np.ndarray, scores: np.ndarray, category_ids: np.ndarray) -> np.ndarray:
    """Detections as rows [image_id, x, y, w, h, score, category_id] (the layout COCO.loadRes accepts)."""
    rows = np.empty((len(scores), 7), np.float64)
    rows[:, 0] = image_id
    rows[:, 1:3] = xyxy[:, :2]
    rows[:, 3:5] = xyxy[:, 2:] - xyxy[:, :2]
    rows[:, 5] = scores
    rows[:, 6] = category_ids
    return rows
