"""Preprocessed evaluation inputs on disk, with a bounded working set in memory.

An evaluator scores many models on the same images, so each image is decoded and resized once (uint8 CHW in the
model's colour order plus its letterbox geometry) and kept — on disk, not in memory: 5,000 letterboxed 640x640
COCO images are 6 GB of pixels, and two workers on one machine would hold two copies. One .npy file per image under

    <cache>/pixels/<preprocessing hash>/<file hash>.npy

keyed like the calibration cache: the image file's path (as given, so a symlink under a new name is a new image),
size and mtime, and the preprocessing (size, resize mode, colour order). Files are written atomically (rename), so
workers sharing the cache directory never read half an image. Reading is plain file I/O into fresh arrays (no
memory mapping: mapped pages would count in the process's RSS), one batch ahead of inference on a thread, so at most
a few batches are in memory whatever the size of the evaluation set.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

STORE_VERSION = 1
GEOMETRY = 6  # orig h, orig w, ratio w, ratio h, pad w, pad h (NaN: no geometry, e.g. a centre crop)
CHUNK = 64  # images preprocessed per round: bounds the pixels held while they are written


def default_root() -> Path:
    """Where preprocessed inputs go without an explicit folder: $SENSQ_CACHE/pixels (default ~/.cache/sensq/pixels)."""
    return Path(os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq")) / "pixels"


def _file_key(path: Path) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _encode_meta(meta: dict) -> np.ndarray:
    if not meta:
        return np.full(GEOMETRY, np.nan)
    (h0, w0), (rw, rh), (pw, ph) = meta["orig_shape"], meta["ratio"], meta["pad"]
    return np.array([h0, w0, rw, rh, pw, ph], np.float64)


def _decode_meta(g: np.ndarray) -> dict:
    if np.isnan(g[0]):
        return {}
    return {"orig_shape": (int(g[0]), int(g[1])), "ratio": (float(g[2]), float(g[3])), "pad": (float(g[4]), float(g[5]))}


class PixelStore:
    """uint8 CHW pixels and geometry of `files` under one preprocessing, on disk under `root`."""

    def __init__(self, root: str | Path | None, preprocessor, files: list[Path]):
        self.pre = preprocessor
        self.files = [Path(f) for f in files]
        tag = f"{STORE_VERSION}|{preprocessor.resize}:{preprocessor.height}x{preprocessor.width}:" \
              f"{preprocessor.color_format}:{preprocessor.pad_value}"  # mean/std are applied per batch, not stored
        self.dir = Path(root or default_root()) / hashlib.sha256(tag.encode()).hexdigest()[:16]
        self.shape = (3, preprocessor.height, preprocessor.width)
        self._keys: dict[int, str] = {}
        self._known: set[int] = set()  # indices whose file was seen on disk
        self._lock = threading.Lock()

    def path(self, i: int) -> Path:
        key = self._keys.get(i)
        if key is None:
            key = self._keys[i] = _file_key(self.files[i])
        return self.dir / f"{key}.npy"

    def missing(self, indices) -> list[int]:
        out = []
        for i in indices:
            if i in self._known:
                continue
            if self.path(i).is_file():
                self._known.add(i)
            else:
                out.append(i)
        return out

    # ------------------------------------------------------------------------------------------------ write
    def _put(self, i: int) -> None:
        pixels, meta = self.pre.pixels(self.files[i])
        record = np.empty(GEOMETRY * 8 + pixels.size, np.uint8)  # geometry (float64) then the pixels, one file
        record[:GEOMETRY * 8] = _encode_meta(meta).view(np.uint8)
        record[GEOMETRY * 8:] = pixels.reshape(-1)
        path = self.path(i)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
        np.save(tmp, record)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file

    def fill(self, indices, progress: bool = False, desc: str = "preprocess") -> int:
        """Preprocess the images of `indices` not on disk yet (threads; OpenCV and PIL release the GIL)."""
        todo = self.missing(indices)
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc=desc, disable=not progress, leave=False) as bar:
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                list(pool.map(self._put, chunk))  # nothing returned: pixels live only until written
                self._known.update(chunk)
                bar.update(len(chunk))
        return len(todo)

    # ------------------------------------------------------------------------------------------------ read
    def load(self, i: int) -> tuple[np.ndarray, dict]:
        record = np.load(self.path(i), allow_pickle=False)
        if record.size != GEOMETRY * 8 + int(np.prod(self.shape)):
            raise ValueError(f"preprocessed input {self.path(i)} has the wrong size")
        meta = _decode_meta(record[:GEOMETRY * 8].view(np.float64))
        return record[GEOMETRY * 8:].reshape(self.shape), meta

    def _load_batch(self, batch: list[int]) -> tuple[list[int], np.ndarray, list[dict]]:
        out = np.empty((len(batch), *self.shape), np.uint8)
        metas = []
        for k, i in enumerate(batch):
            try:
                out[k], meta = self.load(i)
            except (OSError, ValueError):  # removed or damaged since fill(): preprocess it again
                self._known.discard(i)
                self.fill([i])
                out[k], meta = self.load(i)
            metas.append(meta)
        return batch, out, metas

    def batches(self, indices, batch_size: int, ahead: int = 2) -> Iterator[tuple[list[int], np.ndarray, list[dict]]]:
        """(indices, uint8 [n, C, H, W], geometries) per batch, read `ahead` batches in advance on a thread."""
        idx = list(indices)
        starts = range(0, len(idx), batch_size)
        with ThreadPoolExecutor(1) as reader:
            pending = [reader.submit(self._load_batch, idx[s:s + batch_size]) for s in starts[:ahead]]
            for n in range(len(starts)):
                if n + ahead < len(starts):
                    s = starts[n + ahead]
                    pending.append(reader.submit(self._load_batch, idx[s:s + batch_size]))
                yield pending.pop(0).result()
