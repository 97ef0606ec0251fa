"""The COCO/YOLO-layout detection evaluator: preprocessed inputs cached across models, decode on a worker thread."""
from __future__ import annotations

import ast
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Stopwatch, preprocess_all
from sensq.preprocess import ImagePreprocess
from sensq.runtime import make_session

from .dataset import DetectionSet, load_coco, load_yolo
from .decode import LAYOUTS, detect_layout, model_names, num_classes, postprocess, to_coco_rows
from .metric import COCO_STAT_NAMES, coco_stats

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
                    state["nc"] = num_classes(layout, shape, names)
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
