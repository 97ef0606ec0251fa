"""COCO detection mAP for Ultralytics YOLO ONNX exports (YOLOv5 and YOLOv8/11 heads).

Data: an official COCO layout (annotations/instances_<split>.json + <split>/ images) or an Ultralytics YOLO layout
(data.yaml + images/<split> + labels/<split>); the latter is converted to an in-memory COCO dict so both are
scored by the same code.

Metric: the COCO protocol of pycocotools. pycocotools' own evaluate()+accumulate() are pure Python and take
longer than the inference they score (~8 s for 206 images), so by default `coco_eval_arrays` re-implements those
two steps with numpy, bit-identical to pycocotools (tests compare the full precision/recall arrays against
pycocotools on real detections and on synthetic edge cases); the 12 summary numbers always come from
pycocotools' own COCOeval.summarize(). `metric="pycocotools"` runs stock COCOeval end to end.

Crowd boxes: COCO-JSON annotations with iscrowd=1 are ignore regions, exactly as in pycocotools (a detection
matched to one is neither a true nor a false positive). The YOLO label format cannot express crowd regions, so
every YOLO label is a regular object; on images without crowd annotations both paths give the same mAP.
The size-bucketed stats (APs/APm/APl, ARs/ARm/ARl) use the annotation `area` (the segmentation area for COCO
JSON, box w*h for YOLO labels), as pycocotools does; mAP50-95 and mAP50 do not depend on it.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Stopwatch
from sensq.preprocess import IMAGE_SUFFIXES, ImagePreprocess
from sensq.runtime import make_session

# Ultralytics coco80_to_coco91_class(): class index of an 80-class COCO model -> official category id.
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
                59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89,
                90]
COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
LAYOUTS = ("yolov5", "yolov8")
# Upstream validators' NMS IoU: yolov5 val.py uses 0.6, ultralytics (v8/11) DetectionValidator 0.7.
DEFAULT_IOU = {"yolov5": 0.6, "yolov8": 0.7}


@contextlib.contextmanager
def quiet():
    """pycocotools prints progress on stdout; keep a search's output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------------

class GroundTruth:
    """COCO ground truth held both as the dataset dict (for pycocotools) and as arrays (for the fast metric)."""

    def __init__(self, dataset: dict):
        for key in ("images", "annotations", "categories"):
            if key not in dataset:
                raise SensqError(f"annotation file has no '{key}' list", "use a COCO instances_*.json (keys images, annotations, categories)")
        anns = dataset["annotations"]
        for a in anns:
            a.setdefault("iscrowd", 0)  # pycocotools requires the key
            if "area" not in a and "bbox" in a:
                a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        if any("bbox" not in a for a in anns):
            raise SensqError("an annotation has no 'bbox'", "use COCO instances annotations with bbox [x, y, w, h] on every object")
        self.dataset = dataset
        self.cat_ids = sorted(int(c["id"]) for c in dataset["categories"])
        self.img = np.array([a["image_id"] for a in anns], np.int64)
        self.cat = np.array([a["category_id"] for a in anns], np.int64)
        self.box = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        self.area = np.array([a["area"] for a in anns], np.float64)
        self.crowd = np.array([bool(a["iscrowd"]) for a in anns], bool)
        self._coco = None

    def coco(self):
        """pycocotools COCO object over the same dict (built once, on demand)."""
        if self._coco is None:
            from pycocotools.coco import COCO
            with quiet():
                c = COCO()
                c.dataset = self.dataset
                c.createIndex()
            self._coco = c
        return self._coco


@dataclass
class DetectionSet:
    """Images in evaluation order (sorted by image id) and their ground truth."""

    files: list[Path]
    image_ids: list[int]
    gt: GroundTruth
    yolo_layout: bool  # True: class index i is category id i + 1; False: COCO category mapping (see category_map)
    source: str

    def __len__(self) -> int:
        return len(self.files)

    def category_map(self, nc: int) -> np.ndarray:
        """Class index of an nc-class model -> category id of this dataset."""
        cats = self.gt.cat_ids
        if self.yolo_layout:
            if nc != len(cats):
                raise SensqError(f"model predicts {nc} classes but data.yaml names {len(cats)}",
                                 "evaluate with the data.yaml the model was trained on")
            return np.arange(1, nc + 1, dtype=np.int64)
        if len(cats) == nc:  # includes the official 80 COCO categories (sorted ids == the 80->91 map)
            return np.asarray(cats, np.int64)
        if nc == 80 and set(cats) <= set(COCO80_TO_91):
            return np.asarray(COCO80_TO_91, np.int64)
        raise SensqError(f"model predicts {nc} classes but the annotations have {len(cats)} categories",
                         "use annotations whose sorted category ids correspond to the model's classes")


def find_coco_annotations(data: Path) -> Path:
    """annotations/instances_val2017.json preferred, then other instances_*.json (val first), then any json."""
    ann_dir = data / "annotations"
    preferred = ann_dir / "instances_val2017.json"
    if preferred.is_file():
        return preferred
    for pattern_dir, pattern in ((ann_dir, "instances_*.json"), (ann_dir, "*.json"), (data, "*.json")):
        found = sorted(pattern_dir.glob(pattern), key=lambda p: ("val" not in p.name, p.name)) if pattern_dir.is_dir() else []
        if found:
            return found[0]
    raise SensqError(f"no COCO annotations found in {data}",
                     f"put instances_val2017.json under {data}/annotations/ or pass annotations=PATH")


def _find_image_dir(data: Path | None, ann: Path) -> Path:
    split = ann.stem[len("instances_"):] if ann.stem.startswith("instances_") else ann.stem
    roots = [r for r in (data, ann.parent.parent) if r is not None]
    for root in roots:
        for cand in (root / split, root / "images" / split, root / "images", root / "val2017"):
            if cand.is_dir():
                return cand
    raise SensqError(f"no image folder found for {ann.name} (looked for {split}/ and images/{split}/)",
                     "pass images=FOLDER with the JPEGs named as in the annotations' file_name")


def load_coco(data: str | Path | None = None, annotations: str | Path | None = None,
              images: str | Path | None = None) -> DetectionSet:
    """A COCO-layout dataset: `data` folder (annotations/instances_<split>.json + <split>/) or explicit paths."""
    data = Path(data) if data is not None else None
    if data is not None and not data.is_dir():
        raise SensqError(f"data folder not found: {data}", "pass the folder holding annotations/ and the image folder")
    if annotations is not None:
        ann = Path(annotations)
        if not ann.is_file():
            raise SensqError(f"annotations file not found: {ann}", "pass the path of a COCO instances_*.json")
    elif data is not None:
        ann = find_coco_annotations(data)
    else:
        raise SensqError("no COCO data given", "pass data=FOLDER or annotations=JSON and images=FOLDER")
    img_dir = Path(images) if images is not None else _find_image_dir(data, ann)
    if not img_dir.is_dir():
        raise SensqError(f"image folder not found: {img_dir}", "pass images=FOLDER with the images of the annotation file")
    try:
        dataset = json.loads(ann.read_text())
    except (OSError, ValueError) as e:
        raise SensqError(f"cannot parse {ann}: {str(e)[:200]}", "pass a valid COCO instances JSON file") from e
    gt = GroundTruth(dataset)
    records = sorted(dataset["images"], key=lambda r: int(r["id"]))
    if not records:
        raise SensqError(f"{ann} lists no images", "use an annotation file with an 'images' list")
    files = [img_dir / r["file_name"] for r in records]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SensqError(f"{len(missing)} of {len(files)} images listed in {ann.name} are missing, e.g. {missing[0]}",
                         "pass images=FOLDER holding the files named in the annotations' file_name")
    return DetectionSet(files, [int(r["id"]) for r in records], gt, False, f"coco:{ann}")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as decoded by OpenCV, which applies the EXIF orientation (as Ultralytics' exif_size)."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h


def _parse_names(names) -> list[str]:
    if isinstance(names, str):
        names = ast.literal_eval(names)
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names]


def _yolo_image_files(root: Path, entry) -> list[Path]:
    files: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(item) if Path(item).is_absolute() else root / item
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
        elif p.is_file() and p.suffix == ".txt":  # a list of image paths, relative to the dataset root
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else root / f)
        else:
            raise SensqError(f"image folder not found: {p}", "fix the split entry in data.yaml (a folder or a .txt list of images)")
    return sorted(set(files), key=lambda f: (f.name, str(f)))


def _label_path(img: Path) -> Path:
    """Ultralytics img2label_paths: the last /images/ in the path becomes /labels/, suffix .txt."""
    parts = list(img.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yolo_labels(path: Path, nc: int) -> np.ndarray:
    """rows (cls, cx, cy, w, h) normalised; polygon rows (cls x1 y1 x2 y2 ...) become their bounding box."""
    rows = []
    if not path.is_file():
        return np.zeros((0, 5))  # no label file: a background image (Ultralytics does the same)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        v = line.split()
        if not v:
            continue
        try:
            vals = [float(x) for x in v]
        except ValueError:
            raise SensqError(f"{path}:{n}: not numbers", "write one object per line: class cx cy w h (normalised)") from None
        if len(vals) == 5:
            rows.append(vals)
        elif len(vals) > 6 and len(vals) % 2 == 1:
            xy = np.asarray(vals[1:]).reshape(-1, 2)
            (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
            rows.append([vals[0], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        else:
            raise SensqError(f"{path}:{n}: {len(vals)} values", "write one object per line: class cx cy w h (normalised)")
        if not 0 <= rows[-1][0] < nc or rows[-1][0] != int(rows[-1][0]):
            raise SensqError(f"{path}:{n}: class {v[0]} outside 0..{nc - 1}", "fix the label or the names in data.yaml")
    return np.asarray(rows, np.float64).reshape(-1, 5)


def find_data_yaml(data: Path) -> Path:
    if data.is_file():
        return data
    if not data.is_dir():
        raise SensqError(f"data not found: {data}", "pass a data.yaml file or the folder holding it")
    for cand in [data / "data.yaml", data / "data.yml", *sorted(data.glob("*.yaml")), *sorted(data.glob("*.yml"))]:
        if cand.is_file():
            return cand
    raise SensqError(f"no data.yaml in {data}", "add a data.yaml with keys path, val and names (Ultralytics layout)")


def load_yolo(data: str | Path, split: str = "val", progress: bool = True) -> DetectionSet:
    """An Ultralytics YOLO-layout dataset, converted to an in-memory COCO dict (category id = class index + 1)."""
    cfg_path = find_data_yaml(Path(data))
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SensqError(f"cannot parse {cfg_path}: {str(e).splitlines()[0]}", "fix the YAML syntax") from e
    if "names" not in cfg:
        raise SensqError(f"{cfg_path} has no 'names'", "add names: [class0, class1, ...] to data.yaml")
    if split not in cfg:
        raise SensqError(f"{cfg_path} has no '{split}' entry", f"add {split}: images/{split} to data.yaml")
    names = _parse_names(cfg["names"])
    root = Path(cfg.get("path") or cfg_path.parent)
    if not root.is_absolute():  # relative to the yaml's folder if that exists (Ultralytics would use its datasets dir)
        root = cfg_path.parent / root if (cfg_path.parent / root).exists() else root.resolve()
    files = _yolo_image_files(root, cfg[split])
    if not files:
        raise SensqError(f"no images found for split '{split}' of {cfg_path}", f"put images in {root / str(cfg[split])}")
    images, anns = [], []
    for image_id, f in enumerate(tqdm(files, desc="yolo: labels", disable=not progress, leave=False), 1):
        w, h = _image_size(f)
        images.append({"id": image_id, "file_name": str(f), "width": w, "height": h})
        for cls, cx, cy, bw, bh in _read_yolo_labels(_label_path(f), len(names)):
            bw, bh = bw * w, bh * h
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                         "bbox": [cx * w - bw / 2, cy * h - bh / 2, bw, bh], "area": bw * bh, "iscrowd": 0})
    dataset = {"images": images, "annotations": anns,
               "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    return DetectionSet(files, list(range(1, len(files) + 1)), GroundTruth(dataset), True, f"yolo:{cfg_path}:{split}")


# ----------------------------------------------------------------------------------------------------------------
# Decode + NMS (Ultralytics non_max_suppression with multi_label=True, vectorised)
# ----------------------------------------------------------------------------------------------------------------

def model_names(metadata: dict[str, str]) -> list[str] | None:
    try:
        return _parse_names(metadata["names"]) if "names" in metadata else None
    except (ValueError, SyntaxError):
        return None


def detect_layout(shape: tuple[int, ...], metadata: dict[str, str] | None = None) -> str:
    """'yolov5' (N x (5+C) rows with objectness) or 'yolov8' ((4+C) x N, YOLOv8/11) from shape and metadata."""
    metadata = metadata or {}
    shape = tuple(int(s) for s in shape[-2:])
    rows, cols = shape
    names = model_names(metadata)
    nc = len(names) if names else None
    major = str(metadata.get("version", "")).split(".")[0]
    if "task" in metadata or ("stride" in metadata and major.isdigit() and int(major) >= 8):  # ultralytics >= 8
        if metadata.get("task", "detect") != "detect":
            raise SensqError(f"model task is '{metadata['task']}', not detection", "evaluate a detect model (YOLOv8/11 *-det export)")
        return "yolov8"
    if nc is not None:
        if cols == nc + 5:
            return "yolov5"
        if rows >= nc + 4 and rows < cols:
            return "yolov8"
        if cols == nc + 4:
            return "yolov8"
    if rows < cols:
        return "yolov8"  # channels first: (4+C) x N
    if cols > 5:
        return "yolov5"
    raise SensqError(f"output shape {shape} is not a YOLO detection head",
                     "export the model with Ultralytics (no NMS in the graph) or pass layout='yolov5'/'yolov8'")


def candidates(output: np.ndarray, layout: str, conf: float, nc: int | None = None):
    """Every (box, class) whose score exceeds conf: boxes cx,cy,w,h (input pixels), float32 scores, int classes."""
    out = np.asarray(output)
    if out.ndim == 3:
        out = out[0]
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


def postprocess(output: np.ndarray, layout: str, conf: float = 0.001, iou: float | None = None, max_det: int = 300,
                meta: dict | None = None, max_nms: int = 30000, nc: int | None = None):
    """Decode one image's raw YOLO output -> (boxes xyxy, scores, class indices), at most max_det, best first.

    Boxes are in original-image pixels when `meta` (from ImagePreprocess.pixels with letterbox) is given: padding
    removed, divided by the ratio, clipped to the image; otherwise in model-input pixels.
    """
    iou = DEFAULT_IOU[layout] if iou is None else iou
    cxcywh, scores, classes = candidates(output, layout, conf, nc)
    boxes = np.empty((len(scores), 4), np.float64)
    boxes[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
    boxes[:, 2:] = cxcywh[:, 2:]
    # Candidates are ranked by score; only the top max_nms go to NMS (as Ultralytics). NMS is greedy in score order,
    # so a prefix of the ranking decides its own boxes exactly: grow the prefix until it yields max_det boxes.
    order = np.argsort(-scores, kind="stable")[:max_nms]
    prefix = 3072 if len(order) > 6144 else len(order)  # measured on yolov5n/COCO: ~3k candidates hold 300 boxes
    while True:
        idx = order[:prefix]
        keep = idx[nms_per_class(boxes[idx], scores[idx], classes[idx], iou)]
        if len(keep) >= max_det or prefix >= len(order):
            break
        prefix *= 4
    keep = keep[:max_det]
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


# ----------------------------------------------------------------------------------------------------------------
# Metric: pycocotools COCOeval.evaluate() + accumulate() as array code (same numbers), summarize() from pycocotools
# ----------------------------------------------------------------------------------------------------------------

def _bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Pairwise rows of maskApi.c bbIou (xywh boxes; a crowd gt's union is the detection's area)."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = inter / union
    return np.where((w > 0) & (h > 0), out, 0.0)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)


def coco_eval_arrays(gt: GroundTruth, dets: np.ndarray, img_ids) -> tuple[np.ndarray, np.ndarray]:
    """precision [T,R,K,A,M] and recall [T,K,A,M] exactly as COCOeval(iouType='bbox') evaluate()+accumulate().

    dets: rows [image_id, x, y, w, h, score, category_id]; their order breaks score ties, as in COCO.loadRes.
    """
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    img_ids = np.unique(np.asarray(img_ids, np.int64))
    cat_ids = np.asarray(gt.cat_ids, np.int64)
    K, A, T, R, M = len(cat_ids), len(p.areaRng), len(p.iouThrs), len(p.recThrs), len(p.maxDets)
    lo = np.array([r[0] for r in p.areaRng], np.float64)[:, None]
    hi = np.array([r[1] for r in p.areaRng], np.float64)[:, None]
    thr = np.minimum(p.iouThrs, 1 - 1e-10)

    # Ground truth of the evaluated images, in annotation order (pycocotools' order within an image).
    gsel = np.isin(gt.img, img_ids) & np.isin(gt.cat, cat_ids)
    g_img, g_cat = np.searchsorted(img_ids, gt.img[gsel]), np.searchsorted(cat_ids, gt.cat[gsel])
    g_box, g_area, g_crowd = gt.box[gsel], gt.area[gsel], gt.crowd[gsel]
    g_ign = g_crowd[None] | (g_area[None] < lo) | (g_area[None] > hi)  # [A, G]: pycocotools' _ignore per area range

    # Detections: per (image, category) sorted by score (stable), truncated to maxDets[-1].
    dets = np.asarray(dets, np.float64).reshape(-1, 7)
    dsel = np.isin(dets[:, 0].astype(np.int64), img_ids) & np.isin(dets[:, 6].astype(np.int64), cat_ids)
    dets = dets[dsel]
    d_img = np.searchsorted(img_ids, dets[:, 0].astype(np.int64))
    d_cat = np.searchsorted(cat_ids, dets[:, 6].astype(np.int64))
    order = np.lexsort((-dets[:, 5], d_cat, d_img))  # stable: ties keep insertion order
    key = (d_img * K + d_cat)[order]
    starts = _group_starts(key)
    rank = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    order, key, rank = order[rank < p.maxDets[-1]], key[rank < p.maxDets[-1]], rank[rank < p.maxDets[-1]]
    d_img, d_cat, d_box, d_score = d_img[order], d_cat[order], dets[order, 1:5], dets[order, 5]
    D, G = len(order), len(g_box)
    d_out = ((d_box[:, 2] * d_box[:, 3])[None] < lo) | ((d_box[:, 2] * d_box[:, 3])[None] > hi)  # [A, D]

    # Candidate (det, gt) pairs: same image and category, IoU >= the lowest threshold.
    g_key = g_img * K + g_cat
    g_order = np.argsort(g_key, kind="stable")
    g_sorted = g_key[g_order]
    first, last = np.searchsorted(g_sorted, key, "left"), np.searchsorted(g_sorted, key, "right")
    cnt = last - first
    pair_d = np.repeat(np.arange(D), cnt)
    pair_g = g_order[np.repeat(first, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    pair_iou = _bbox_iou(d_box[pair_d], g_box[pair_g], g_crowd[pair_g])
    ok = pair_iou >= thr.min()
    pair_d, pair_g, pair_iou = pair_d[ok], pair_g[ok], pair_iou[ok]

    # Greedy matching, in detection rank order, for every (image, category) problem at once: at rank r each problem
    # has at most one detection, and problems share no gt, so one vector step per rank is exact.
    # A detection takes, among gts not yet matched (crowd gts always available) with IoU >= t: the non-ignored gt
    # of highest IoU if any, else the ignored one of highest IoU; equal IoU -> the later gt (pycocotools' scan).
    d_rank = rank
    perms = [np.lexsort((pair_g, pair_iou, ~g_ign[a][pair_g], pair_d, d_rank[pair_d])) for a in range(A)]
    PG = np.stack([pair_g[pm] for pm in perms]) if len(pair_g) else np.zeros((A, 0), np.int64)
    PI = np.stack([pair_iou[pm] for pm in perms]) if len(pair_g) else np.zeros((A, 0))
    PD = pair_d[perms[0]] if len(pair_g) else np.zeros(0, np.int64)
    g_matched = np.zeros((A, T, G), bool)
    dt_m = np.zeros((A, T, D), bool)
    dt_ig = np.zeros((A, T, D), bool)
    ai_, ti_ = np.arange(A)[:, None, None], np.arange(T)[None, :, None]
    step_starts = _group_starts(d_rank[PD])
    for s, e in zip(step_starts, np.r_[step_starts[1:], len(PD)]):
        g, iou, dd = PG[:, s:e], PI[:, s:e], PD[s:e]
        seg = _group_starts(dd)
        elig = (iou[:, None, :] >= thr[None, :, None]) & (g_crowd[g][:, None, :] | ~g_matched[ai_, ti_, g[:, None, :]])
        best = np.maximum.reduceat(np.where(elig, np.arange(1, e - s + 1), 0), seg, axis=2)  # last eligible + 1
        a, t, k = np.nonzero(best)
        gm = g[a, best[a, t, k] - 1]
        g_matched[a, t, gm] = True
        dt_m[a, t, dd[seg[k]]] = True
        dt_ig[a, t, dd[seg[k]]] = g_ign[a, gm]
    dt_ig |= ~dt_m & d_out[:, None, :]  # unmatched detections outside the area range are ignored

    # accumulate(): per category and maxDets, detections of all images (image order, then rank) sorted by score.
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    npig = np.stack([np.bincount(g_cat[~g_ign[a]], minlength=K) for a in range(A)], 1)  # [K, A]
    corder = np.lexsort((d_rank, d_img, d_cat))
    cstart = np.searchsorted(d_cat[corder], np.arange(K + 1))
    for k in range(K):
        if not npig[k].any():
            continue
        idx_k = corder[cstart[k]:cstart[k + 1]]
        for m, max_det in enumerate(p.maxDets):
            idx = idx_k[d_rank[idx_k] < max_det]
            idx = idx[np.argsort(-d_score[idx], kind="mergesort")]
            nd = len(idx)
            m_, ig = dt_m[:, :, idx], dt_ig[:, :, idx]
            tp = np.cumsum(m_ & ~ig, axis=2).astype(float)
            fp = np.cumsum(~m_ & ~ig, axis=2).astype(float)
            for a in range(A):
                if npig[k, a] == 0:
                    continue
                rc = tp[a] / npig[k, a]
                pr = tp[a] / (fp[a] + tp[a] + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
                q = np.zeros((T, R))
                for t in range(T):
                    ri = np.searchsorted(rc[t], p.recThrs, side="left")
                    valid = ri < nd
                    q[t, valid] = pr[t, ri[valid]]
                precision[:, :, k, a, m] = q
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The 12 standard stats, computed by pycocotools' own COCOeval.summarize()."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(iouType="bbox")
    ev.eval = {"precision": precision, "recall": recall}
    with quiet():
        ev.summarize()
    return np.asarray(ev.stats, np.float64)


def pycocotools_eval(gt: GroundTruth, dets: np.ndarray, img_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stock pycocotools COCOeval on the given image ids -> (stats[12], precision, recall)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = gt.coco()
    dets = np.asarray(dets, np.float64).reshape(-1, 7)
    with quiet():
        if len(dets):
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64), ev.eval["precision"], ev.eval["recall"]


def coco_stats(gt: GroundTruth, dets: np.ndarray, img_ids, metric: str = "fast") -> np.ndarray:
    """The 12 COCO bbox stats of `dets` over `img_ids` ('fast' array code or stock 'pycocotools')."""
    if metric == "pycocotools":
        return pycocotools_eval(gt, dets, img_ids)[0]
    if metric != "fast":
        raise SensqError(f"unknown COCO metric backend {metric!r}", "use metric='fast' or metric='pycocotools'")
    return summarize(*coco_eval_arrays(gt, dets, img_ids))


# ----------------------------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------------------------

def _session_io(session):
    inp = session.get_inputs()[0]
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return inp, metadata


def _static_hw(shape) -> tuple[int, int] | None:
    if len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def _parse_imgsz(v) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = ast.literal_eval(v)
    if isinstance(v, (int, float)):
        return int(v), int(v)
    v = list(v)
    return (int(v[0]), int(v[-1])) if v else None


def preprocess_all(pre: ImagePreprocess, files: list[Path], progress: bool, desc: str) -> list:
    """pixels() of every file, in order; threads overlap decoding and resizing (OpenCV and PIL release the GIL)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(pre.pixels, files), total=len(files), desc=desc, disable=not progress, leave=False))


class DetectionEvaluator:
    """mAP50-95 (primary) / mAP50 of a YOLO detector on a DetectionSet; preprocessed pixels are cached."""

    primary = "mAP50-95"

    def __init__(self, dataset: DetectionSet, imgsz=None, conf: float = 0.001, iou: float | None = None,
                 max_det: int = 300, max_nms: int = 30000, layout: str = "auto", color_format: str = "rgb",
                 batch_size: int = 1, threads: int | None = None, metric: str = "fast"):
        if layout not in ("auto", *LAYOUTS):
            raise SensqError(f"unknown detection layout {layout!r}", f"use auto, {', '.join(LAYOUTS)}")
        if metric not in ("fast", "pycocotools"):
            raise SensqError(f"unknown COCO metric backend {metric!r}", "use metric='fast' or metric='pycocotools'")
        self.data = dataset
        self.name = "yolo" if dataset.yolo_layout else "coco"
        self.imgsz = _parse_imgsz(imgsz)
        self.conf, self.iou, self.max_det, self.max_nms = conf, iou, max_det, max_nms
        self.layout, self.color_format, self.batch_size, self.threads, self.metric = layout, color_format, batch_size, threads, metric
        self.preprocessor: ImagePreprocess | None = None  # of the cached pixels
        self.pixels: list = []  # cache: (uint8 CHW letterboxed pixels, geometry) per image, in order
        self.last_detections: np.ndarray | None = None  # rows of the last evaluate() (for inspection and tests)
        # Detections per image of the last InferenceSession evaluated: scoring the same session on more images
        # (a search's low-fidelity then full pass) only runs the images not seen yet.
        self._memo_session = None
        self._memo_rows: list[np.ndarray] = []
        self._memo_state: dict = {}

    def __len__(self) -> int:
        return len(self.data)

    def _preprocess(self, hw: tuple[int, int], n: int, progress: bool):
        if self.preprocessor is None or (self.preprocessor.height, self.preprocessor.width) != hw:
            self.preprocessor = ImagePreprocess(hw[0], hw[1], resize="letterbox", color_format=self.color_format,
                                                mean=[0.0], std=[255.0])
            self.pixels = []
        if len(self.pixels) < n:
            self.pixels += preprocess_all(self.preprocessor, self.data.files[len(self.pixels):n], progress, f"{self.name}: preprocess")
        return self.preprocessor

    def evaluate(self, model, limit: int | None = None, progress: bool = True) -> EvalResult:
        t0 = time.perf_counter()
        session = make_session(model, self.threads)
        inp, metadata = _session_io(session)
        hw = _static_hw(inp.shape) or self.imgsz or _parse_imgsz(metadata.get("imgsz")) or (640, 640)
        n = len(self.data) if limit is None else max(0, min(int(limit), len(self.data)))
        if n == 0:
            raise SensqError("nothing to evaluate (limit=0 or empty dataset)", "use limit >= 1")
        pre = self._preprocess(hw, n, progress)
        bs = self.batch_size if not (isinstance(inp.shape[0], int) and inp.shape[0] > 0) else int(inp.shape[0])
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        names = model_names(metadata)
        state = {"layout": None if self.layout == "auto" else self.layout}
        out_name = session.get_outputs()[0].name
        watch = Stopwatch()

        def post(out: np.ndarray, first: int) -> list[np.ndarray]:
            rows = []
            for b in range(out.shape[0]):
                i = first + b
                if state["layout"] is None:
                    state["layout"] = detect_layout(out.shape[1:], metadata)
                layout = state["layout"]
                if "nc" not in state:
                    shape = out.shape[1:]
                    state["nc"] = len(names) if names else (shape[1] - 5 if layout == "yolov5" else min(shape) - 4)
                    state["cats"] = self.data.category_map(state["nc"])
                xyxy, scores, cls = postprocess(out[b], layout, self.conf, self.iou, self.max_det,
                                                self.pixels[i][1], self.max_nms, state["nc"])
                rows.append(to_coco_rows(self.data.image_ids[i], xyxy, scores, state["cats"][cls]))
            return rows

        if not (model is session and self._memo_session is session):  # only a session passed in twice is reused
            self._memo_session, self._memo_rows, self._memo_state = (session if model is session else None), [], {}
        done = min(len(self._memo_rows), n) // bs * bs  # whole batches already decoded for this session
        if done:
            state.update(self._memo_state)
        # Decode image i on a worker thread while the main thread runs inference on image i+1 (ORT releases the GIL).
        with ThreadPoolExecutor(1) as worker:
            futures = []
            for first in tqdm(range(done, n, bs), desc=f"{self.name}: evaluate", disable=not progress, leave=False):
                px = [p for p, _ in self.pixels[first:first + bs]]
                real = len(px)
                if real < bs and isinstance(inp.shape[0], int):
                    px += [px[-1]] * (bs - real)  # static batch: pad the last batch, drop the padding's outputs
                x = pre.normalize(np.stack(px)).astype(dtype, copy=False)
                with watch:
                    out = session.run([out_name], {inp.name: x})[0]
                futures.append(worker.submit(post, out[:real], first))
                if first == done:
                    futures[0].result()  # surface layout / class-count errors before running every image
            rows = self._memo_rows[:done] + [r for f in futures for r in f.result()]
        if self._memo_session is not None and len(rows) > len(self._memo_rows):
            self._memo_rows, self._memo_state = rows, dict(state)
        dets = np.concatenate(rows) if rows else np.zeros((0, 7))
        self.last_detections = dets
        stats = coco_stats(self.data.gt, dets, self.data.image_ids[:n], self.metric)
        named = {k: float(v) for k, v in zip(COCO_STAT_NAMES, stats)}
        return EvalResult(metrics={"mAP50-95": named["AP"], "mAP50": named["AP50"]}, primary=self.primary,
                          n_samples=n, seconds=time.perf_counter() - t0, inference_seconds=watch.total,
                          extra={"coco_stats": named, "layout": state["layout"], "n_detections": int(len(dets)),
                                 "imgsz": list(hw), "metric_backend": self.metric})


def make_coco_evaluator(data=None, annotations=None, images=None, **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_coco(data, annotations, images), **options)


def make_yolo_evaluator(data, split: str = "val", **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_yolo(data, split, progress=options.pop("progress", True)), **options)
