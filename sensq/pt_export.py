""".pt input: an Ultralytics checkpoint is exported to ONNX through the optional `ultralytics` extra and cached.

    resolve_model("yolov8n.pt") -> Path("yolov8n.<key>.onnx")   (next to the checkpoint, or in the sensq cache
                                                                 when that folder is not writable)

The export uses fixed settings (EXPORT_SETTINGS: opset 17, static 640x640 input, batch 1, onnxslim simplify; FP32 is
Ultralytics' default, and its old `half` flag is deprecated since 8.4). The cache key is the checkpoint's SHA-256,
those settings and the versions of the packages that write the graph (ultralytics, torch, onnx, onnxslim, read from
their metadata without importing them), so a changed checkpoint, setting or exporter exports again. Checked against
the real package (ultralytics 8.4.190, torch 2.13.0+cpu) by bench/bench_pt.py: same graph as Ultralytics' own export.

Before anything is imported, the checkpoint's pickle is read as data (pickletools, no code runs) to tell an Ultralytics
checkpoint from an original YOLOv5 one (module `models.yolo`, from the ultralytics/yolov5 repository), which the
`ultralytics` package does not load (by the name yolov5n.pt it would swap in a different, downloaded yolov5nu.pt).
torch and ultralytics are imported only here, only for a .pt, and only when the export is not cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pickletools
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from .errors import SensqError
from .locks import file_lock

log = logging.getLogger("sensq")

EXPORT_SETTINGS = {"format": "onnx", "opset": 17, "imgsz": 640, "batch": 1, "dynamic": False, "simplify": True}
EXPORTER_PACKAGES = ("ultralytics", "torch", "onnx", "onnxslim")  # their versions are part of the cache key
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


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB chunks (checkpoints here, calibration and evaluation images in disjoint.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sensq_cache() -> Path:
    return Path(os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq")) / "pt"


def _writable(folder: Path) -> bool:
    """os.access says yes to root for any folder; a folder whose mode has no write bit at all (as ../shared/data) is
    read-only by intent, and exports do not go there even when root could write them."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _cache_dir(checkpoint: Path) -> Path:
    """Next to the checkpoint when that folder is writable, else $SENSQ_CACHE/pt (shared data is read-only)."""
    return checkpoint.parent if _writable(checkpoint.parent) else _sensq_cache()


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def exporter_versions() -> dict[str, str]:
    return {name: _package_version(name) for name in EXPORTER_PACKAGES}


def export_key(checkpoint: Path, versions: dict[str, str]) -> str:
    raw = json.dumps([file_sha256(checkpoint), EXPORT_SETTINGS, versions], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _import_yolo():
    try:
        from ultralytics import YOLO  # the optional extra; imports torch
    except Exception as e:  # installed but broken (torch missing, a dependency's metadata missing, ...)
        raise SensqError(f"the Ultralytics extra is installed but does not import ({type(e).__name__}: {_first_line(e)})",
                         f'reinstall it with {INSTALL_FIX}') from e
    return YOLO


@contextlib.contextmanager
def _quiet_ultralytics():
    """Ultralytics logs a page per export (and points at the temporary copy): keep its warnings and errors only."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _export(checkpoint: Path, target: Path) -> None:
    YOLO = _import_yolo()
    with tempfile.TemporaryDirectory(prefix="sensq-pt-") as tmp:
        copy = Path(tmp) / checkpoint.name  # Ultralytics writes its .onnx beside the weights: never beside the user's
        shutil.copyfile(checkpoint, copy)
        try:
            with _quiet_ultralytics():
                written = YOLO(str(copy)).export(**EXPORT_SETTINGS)
        except Exception as e:
            raise SensqError(f"Ultralytics could not export {checkpoint.name} to ONNX: {_first_line(e)}",
                             "check that the checkpoint loads with `yolo predict model=...`, or pass an exported .onnx") from e
        written = Path(tmp) / Path(written).name if written else copy.with_suffix(".onnx")  # may be relative
        if not written.is_file():
            raise SensqError(f"Ultralytics reported exporting {checkpoint.name} but wrote no ONNX file ({written.name})",
                             "export it yourself with `yolo export model=... format=onnx` and pass the .onnx")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # unique: workers may export at once
        shutil.copyfile(written, partial)
        partial.replace(target)


@contextlib.contextmanager
def _export_lock(target: Path):
    """One process exports a given checkpoint at a time (search workers start together); the others then find it."""
    lock = contextlib.ExitStack()
    try:
        _sensq_cache().mkdir(parents=True, exist_ok=True)
        lock.enter_context(file_lock(_sensq_cache() / f"{target.name}.lock"))
    except OSError as e:  # no writable sensq cache: export without the lock (the final rename is atomic anyway)
        log.warning("could not lock %s (%s): exporting without a lock", _sensq_cache(), e)
    with lock:
        yield


def resolve_model(path: str | Path) -> Path:
    """The ONNX model to use for `path`: itself unless it is a .pt checkpoint, then its cached ONNX export."""
    path = Path(path)
    if path.suffix.lower() != ".pt":
        return path
    if not path.is_file():
        raise SensqError(f"model file not found: {path}", "check the path given to --model")
    st = path.stat()
    memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if memo in _resolved and _resolved[memo].is_file():
        return _resolved[memo]
    kind = checkpoint_kind(path)
    if kind == "yolov5":
        raise SensqError(f"{path.name} is an original YOLOv5 checkpoint (ultralytics/yolov5 repository), which the "
                         "ultralytics package does not load", YOLOV5_FIX)
    if importlib.util.find_spec("ultralytics") is None:
        what = "an Ultralytics checkpoint" if kind == "ultralytics" else "a PyTorch checkpoint"
        raise SensqError(f"{path.name} is {what}; exporting it to ONNX needs the optional Ultralytics extra", INSTALL_FIX)
    target = _cache_dir(path) / f"{path.stem}.{export_key(path, exporter_versions())}.onnx"
    if not target.is_file():
        with _export_lock(target):
            if not target.is_file():  # exported by another process while this one waited
                log.info("exporting %s to ONNX with Ultralytics %s (opset %d, static %dx%d input, simplified) -> %s",
                         path.name, _package_version("ultralytics"), EXPORT_SETTINGS["opset"], EXPORT_SETTINGS["imgsz"],
                         EXPORT_SETTINGS["imgsz"], target)
                _export(path, target)
    _resolved[memo] = target
    return target
