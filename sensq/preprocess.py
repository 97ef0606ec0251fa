"""Image preprocessing shared by calibration and evaluation (one implementation, so both see the same pixels).

Preprocessing is split in two: a geometric step giving uint8 CHW pixels in the model's colour order (cheap to
cache: 4x smaller than float32), and a normalisation step (x - mean) / std applied just before inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from .errors import SensqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}

# Resize modes: "letterbox" (Ultralytics: keep aspect, centre, pad gray 114), "letterbox_topleft" (YOLOX's preproc:
# keep aspect, image in the top-left corner, pad 114 right and below), "resize" (plain stretch, xquant's default),
# "imagenet" (shorter side to 256/224 of the crop, centre crop; xquant's IMAGENET and PT_IMAGENET presets).
RESIZE_MODES = ("letterbox", "letterbox_topleft", "resize", "imagenet")


@dataclass
class ImagePreprocess:
    """How one image input is made from a file. Values are on the 0-255 scale, as in xquant configs."""

    height: int
    width: int
    resize: str = "resize"
    color_format: str = "rgb"
    mean: Sequence[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: Sequence[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    pad_value: int = 114

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise SensqError(f"unknown resize mode {self.resize!r}", f"use one of {', '.join(RESIZE_MODES)}")
        if self.color_format.lower() not in ("rgb", "bgr"):
            raise SensqError(f"color_format {self.color_format!r} not supported", "use 'rgb' or 'bgr'")
        self.color_format = self.color_format.lower()
        self.mean = [float(v) for v in (self.mean if len(self.mean) > 1 else list(self.mean) * 3)]
        self.std = [float(v) for v in (self.std if len(self.std) > 1 else list(self.std) * 3)]
        if any(s == 0 for s in self.std):
            raise SensqError("std_value contains 0", "give a non-zero std_value per channel (e.g. [255, 255, 255])")

    def key(self) -> str:
        """Stable description used in cache keys."""
        return f"{self.resize}:{self.height}x{self.width}:{self.color_format}:{self.mean}:{self.std}:{self.pad_value}"

    def pixels(self, path: str | Path) -> tuple[np.ndarray, dict]:
        """uint8 CHW pixels in the model's colour order, plus geometry metadata (for mapping boxes back)."""
        if self.resize == "imagenet":
            rgb = imagenet_crop(read_rgb_pil(path), self.height, self.width)
            img = rgb if self.color_format == "rgb" else rgb[:, :, ::-1]
            meta = {}
        else:
            bgr = read_bgr(path)
            h0, w0 = bgr.shape[:2]
            if self.resize == "letterbox":
                bgr, ratio, pad = letterbox(bgr, (self.height, self.width), self.pad_value)
            elif self.resize == "letterbox_topleft":
                bgr, ratio, pad = letterbox_topleft(bgr, (self.height, self.width), self.pad_value)
            else:
                bgr = cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
                ratio, pad = (self.width / w0, self.height / h0), (0.0, 0.0)
            img = bgr[:, :, ::-1] if self.color_format == "rgb" else bgr
            meta = {"orig_shape": (h0, w0), "ratio": ratio, "pad": pad}
        return np.ascontiguousarray(img.transpose(2, 0, 1)), meta

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N,]C,H,W -> float32 (x - mean) / std."""
        x = pixels.astype(np.float32)
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        inv_std = (1.0 / np.asarray(self.std, np.float32)).reshape(shape)
        if np.any(mean != 0):
            x -= mean  # in place: same float32 arithmetic as (x - mean) * inv_std, one array instead of three
        if np.any(inv_std != 1):
            x *= inv_std
        return x

    def tensor(self, path: str | Path) -> np.ndarray:
        """Float32 1xCxHxW input for one file."""
        return self.normalize(self.pixels(path)[0])[None]


def read_bgr(path: str | Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        raise SensqError(f"cannot read image {path}", "remove the file from the list or replace it with a valid JPEG/PNG")
    return img


def read_rgb_pil(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise SensqError(f"cannot read image {path}", "remove the file from the list or replace it with a valid JPEG/PNG") from e


def letterbox(img: np.ndarray, new_shape: tuple[int, int], pad_value: int = 114):
    """Ultralytics letterbox (auto=False, scaleup=True): resize keeping aspect, pad both sides with gray."""
    h0, w0 = img.shape[:2]
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    new_unpad = (int(round(w0 * r)), int(round(h0 * r)))
    dw, dh = (new_shape[1] - new_unpad[0]) / 2, (new_shape[0] - new_unpad[1]) / 2
    if (w0, h0) != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return img, (r, r), (dw, dh)


def letterbox_topleft(img: np.ndarray, new_shape: tuple[int, int], pad_value: int = 114):
    """YOLOX's preproc: resize keeping aspect (sizes truncated, as int(w * r)), image at the top-left, pad the rest."""
    h0, w0 = img.shape[:2]
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    w, h = int(w0 * r), int(h0 * r)
    out = np.full((new_shape[0], new_shape[1], img.shape[2]), pad_value, np.uint8)
    out[:h, :w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) if (w, h) != (w0, h0) else img
    return out, (r, r), (0.0, 0.0)


def imagenet_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """torchvision-style Resize(256/224 * size, bilinear) + CenterCrop(size); returns RGB uint8 HWC."""
    short = int(round(min(height, width) * 256 / 224))
    w0, h0 = img.size
    if w0 <= h0:
        nw, nh = short, int(short * h0 / w0)
    else:
        nw, nh = int(short * w0 / h0), short
    img = img.resize((nw, nh), Image.BILINEAR)
    left = int(round((nw - width) / 2.0))
    top = int(round((nh - height) / 2.0))
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)

