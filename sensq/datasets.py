"""Where data comes from when the command line does not say: $SENSQ_DATA, then ./datasets, then ../shared/data.

`sensq search --model yolov8n.onnx --budget 50` finds COCO (calibration: train2017, evaluation: val2017 +
instances json) for detectors and the ImageNet folder for classifiers. `download_coco_val()` fetches the official
val2017 images and annotations for users who have none (never used by the tests: this machine has no internet).
"""
from __future__ import annotations

import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from .errors import SensqError

COCO_URLS = {
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("SENSQ_DATA"):
        roots.append(Path(os.environ["SENSQ_DATA"]))
    roots += [Path("datasets"), Path("data"), Path("../shared/data"), Path.home() / "datasets"]
    return roots


def default_data(kind: str) -> tuple[Path | None, Path]:
    """(calibration folder, evaluation data) for 'detection' or 'classification'.

    Detection: train2017 calibrates; None when there is none (sensq.defaults then splits val2017, never calibrating
    on the images it scores). Classification: the image folder of an ImageNet-style layout (imagenet/images/ when
    it exists: the label file lives one level up)."""
    for root in data_roots():
        if kind == "detection":
            coco = root / "coco"
            if (coco / "annotations").is_dir() and (coco / "val2017").is_dir():
                return (coco / "train2017" if (coco / "train2017").is_dir() else None), coco
        else:
            imnet = root / "imagenet"
            if imnet.is_dir():
                return (imnet / "images" if (imnet / "images").is_dir() else imnet), imnet
    where = ", ".join(str(r) for r in data_roots())
    if kind == "detection":
        raise SensqError(f"no COCO data found (looked in {where})",
                         "pass --calib and --data, set SENSQ_DATA, or run `python -c \"from sensq.datasets import download_coco_val; download_coco_val('datasets/coco')\"`")
    raise SensqError(f"no ImageNet-style data found (looked in {where})", "pass --calib <images> and --data <folder> --labels <file>")


def calibration_list_dir() -> Path:
    """Where sensq writes calibration list files it derives (e.g. a split of val2017)."""
    return Path(os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq")) / "calib_lists"


def _download(url: str, dest: Path) -> Path:
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:  # noqa: S310 (fixed official URLs)
        total = int(r.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    tmp.replace(dest)
    return dest


def download_coco_val(root: str | Path = "datasets/coco") -> Path:
    """Official COCO val2017 (5000 images, 1 GB) + annotations into root, in the layout sensq expects."""
    root = Path(root)
    for key, url in COCO_URLS.items():
        z = _download(url, root / Path(url).name)
        with zipfile.ZipFile(z) as zf:
            zf.extractall(root)
        z.unlink()
    for extra in root.glob("annotations/*.json"):
        if extra.name not in ("instances_val2017.json", "instances_train2017.json"):
            extra.unlink()
    shutil.rmtree(root / "__MACOSX", ignore_errors=True)
    return root
