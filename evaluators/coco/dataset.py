"""COCO ground truth and datasets: the official layout (annotations/instances_<split>.json + <split>/ images) or an
Ultralytics YOLO layout (data.yaml + images/<split> + labels/<split>), converted to an in-memory COCO dict so both
are scored by the same code.

Crowd boxes: COCO-JSON annotations with iscrowd=1 are ignore regions, exactly as in pycocotools. The YOLO label
format cannot express crowd regions, so every YOLO label is a regular object; on images without crowd annotations
both paths give the same mAP. The size-bucketed stats use the annotation `area` (segmentation area for COCO JSON,
box w*h for YOLO labels), as pycocotools does; mAP50-95 and mAP50 do not depend on it.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.preprocess import IMAGE_SUFFIXES

# Ultralytics coco80_to_coco91_class(): class index of an 80-class COCO model -> official category id.
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
                59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89,
                90]


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
            # box metric only: polygons and crowd RLEs are most of a COCO JSON's memory (~100 MB for val2017)
            a.pop("segmentation", None)
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
              images: str | Path | None = None, exclude=None) -> DetectionSet:
    """A COCO-layout dataset: `data` folder (annotations/instances_<split>.json + <split>/) or explicit paths.

    exclude: image file names (or a list file of them) left out, e.g. the images a model was calibrated on."""
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
    if exclude is not None:
        names = _names(exclude)
        records = [r for r in records if Path(r["file_name"]).name not in names]
        kept = {int(r["id"]) for r in records}
        dataset = {**dataset, "images": records, "annotations": [a for a in dataset["annotations"] if a["image_id"] in kept]}
        gt = GroundTruth(dataset)
    if not records:
        raise SensqError(f"{ann} lists no images", "use an annotation file with an 'images' list")
    files = [img_dir / r["file_name"] for r in records]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SensqError(f"{len(missing)} of {len(files)} images listed in {ann.name} are missing, e.g. {missing[0]}",
                         "pass images=FOLDER holding the files named in the annotations' file_name")
    source = f"coco:{ann}" + (f":excluding {len(names)} images" if exclude is not None else "")
    return DetectionSet(files, [int(r["id"]) for r in records], gt, False, source)


def _names(exclude) -> set[str]:
    if isinstance(exclude, (str, Path)) and Path(exclude).is_file():
        exclude = [line.strip() for line in Path(exclude).read_text().splitlines() if line.strip()]
    return {Path(str(e)).name for e in exclude}


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
