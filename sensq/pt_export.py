""".pt input: an Ultralytics checkpoint is exported to ONNX through the optional `ultralytics` extra and cached.

    resolve_model("yolov8n.pt") -> Path("yolov8n.<key>.onnx")   (next to the checkpoint, or in the sensq cache
                                                                 when that folder is not writable)

The export uses fixed settings (EXPORT_SETTINGS: opset 17, static 640x640 input, batch 1, onnxslim simplify, FP32);
the cache key is the checkpoint's SHA-256, those settings and the ultralytics version, so a changed checkpoint or
setting exports again. Before anything is imported, the checkpoint's pickle is read as data (pickletools, no code
runs) to tell an Ultralytics checkpoint from an original YOLOv5 one (module `models.yolo`, from the ultralytics/yolov5
repository), which the `ultralytics` package does not load. torch and ultralytics are imported only here, only for a
.pt, and only when the export is not cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickletools
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import SensqError

EXPORT_SETTINGS = {"format": "onnx", "opset": 17, "imgsz": 640, "batch": 1, "dynamic": False, "simplify": True,
                   "half": False}
INSTALL_FIX = 'pip install -e ".[ultralytics]" (or export the model to ONNX yourself and pass the .onnx)'
YOLOV5_FIX = ("export it with the YOLOv5 repository's own exporter (python export.py --weights model.pt --include onnx "
              "--opset 17 --imgsz 640 --simplify) and pass the .onnx")
_resolved: dict[tuple, Path] = {}


def checkpoint_modules(path: Path) -> set[str]:
    """Python modules the checkpoint's pickle refers to, read without unpickling (nothing is executed)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(pkl) if pkl else b""
    except zipfile.BadZipFile:
        data = path.read_bytes()  # legacy (pre-1.6) torch.save: a plain pickle stream
    modules: set[str] = set()
    pushed: list = []  # values pushed by string and memo-get opcodes (None for anything else)
    memo: dict = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                pushed.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(arg))
            elif op.name == "STACK_GLOBAL":
                if len(pushed) >= 2 and isinstance(pushed[-2], str):
                    modules.add(pushed[-2])
                pushed.append(None)
            elif op.name == "GLOBAL":
                modules.add(str(arg).split(" ", 1)[0])
                pushed.append(None)
            elif op.name not in ("PROTO", "FRAME", "STOP", "MARK"):
                pushed.append(None)
    except Exception:  # not a pickle we can read: let the loader decide
        pass
    return modules


def checkpoint_kind(path: Path) -> str:
    """"ultralytics", "yolov5" (original YOLOv5 repository) or "unknown"."""
    modules = checkpoint_modules(path)
    if any(m == "ultralytics" or m.startswith("ultralytics.") for m in modules):
        return "ultralytics"
    if "models.yolo" in modules:
        return "yolov5"
    return "unknown"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_dir(checkpoint: Path) -> Path:
    """Next to the checkpoint when that folder is writable, else $SENSQ_CACHE/pt (shared data is read-only)."""
    if os.access(checkpoint.parent, os.W_OK):
        return checkpoint.parent
    return Path(os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq")) / "pt"


def export_key(checkpoint: Path, ultralytics_version: str) -> str:
    raw = json.dumps([_file_hash(checkpoint), EXPORT_SETTINGS, ultralytics_version], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def _export(checkpoint: Path, target: Path) -> None:
    from ultralytics import YOLO  # the optional extra; imports torch

    with tempfile.TemporaryDirectory(prefix="sensq-pt-") as tmp:
        copy = Path(tmp) / checkpoint.name  # Ultralytics writes its .onnx beside the weights: never beside the user's
        shutil.copy2(checkpoint, copy)
        try:
            written = YOLO(str(copy)).export(**EXPORT_SETTINGS)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SensqError(f"Ultralytics could not export {checkpoint.name} to ONNX: {first[:300]}",
                             "check that the checkpoint loads with `yolo predict model=...`, or pass an exported .onnx") from e
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        shutil.copy2(written, partial)
        partial.replace(target)


def resolve_model(path: str | Path) -> Path:
    """The ONNX model to use for `path`: itself unless it is a .pt checkpoint, then its cached ONNX export."""
    path = Path(path)
    if path.suffix.lower() != ".pt":
        return path
    if not path.is_file():
        raise SensqError(f"model file not found: {path}", "check the path given to --model")
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if memo in _resolved and _resolved[memo].is_file():
        return _resolved[memo]
    kind = checkpoint_kind(path)
    if kind == "yolov5":
        raise SensqError(f"{path.name} is an original YOLOv5 checkpoint (ultralytics/yolov5 repository), which the "
                         "ultralytics package does not load", YOLOV5_FIX)
    if importlib.util.find_spec("ultralytics") is None:
        what = "an Ultralytics checkpoint" if kind == "ultralytics" else "a PyTorch checkpoint"
        raise SensqError(f"{path.name} is {what}; exporting it to ONNX needs the optional Ultralytics extra", INSTALL_FIX)
    import ultralytics

    target = _cache_dir(path) / f"{path.stem}.{export_key(path, ultralytics.__version__)}.onnx"
    if not target.is_file():
        _export(path, target)
    _resolved[memo] = target
    return target
