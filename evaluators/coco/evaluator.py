"""The COCO/YOLO-layout detection evaluator: preprocessed inputs cached on disk across models (bounded memory),
decode on a worker thread."""
from __future__ import annotations

import ast
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Stopwatch, resolve_indices
from sensq.evaluators.pixel_store import PixelStore
from sensq.evaluators.samples import DetectionSamples
from sensq.preprocess import ImagePreprocess
from sensq.runtime import make_session

from .dataset import DetectionSet, load_coco, load_yolo
from .decode import LAYOUTS, detect_layout, model_names, num_classes, postprocess, to_coco_rows
from .metric import COCO_STAT_NAMES, coco_stats

POST_AHEAD = 4  # batches inference may run ahead of decoding


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
    """mAP50-95 (primary) / mAP50 of a YOLO detector on a DetectionSet; preprocessed pixels are cached on disk
    (evaluators/pixel_store.py, under `pixel_cache`, default $SENSQ_CACHE/pixels) and read a batch ahead.

    evaluate(model, indices=...) scores any subset of the images (dataset order = sorted by image id); the result
    carries the detections per image (EvalResult.samples), from which any subset or bootstrap resample is scored
    again without inference (evaluators/samples.py)."""

    primary = "mAP50-95"

    def __init__(self, dataset: DetectionSet, imgsz=None, conf: float = 0.001, iou: float | None = None,
                 max_det: int = 300, max_nms: int = 30000, layout: str = "auto", color_format: str = "rgb",
                 batch_size: int = 1, threads: int | None = None, metric: str = "fast",
                 pixel_cache=None):
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
        self.pixel_cache = pixel_cache
        self.store: PixelStore | None = None  # letterboxed uint8 pixels and geometry of the current size, on disk
        self.last_detections: np.ndarray | None = None  # rows of the last evaluate() (for inspection and tests)

    def __len__(self) -> int:
        return len(self.data)

    def signature(self) -> str:
        return (f"{self.name}:{self.data.source}:{len(self.data)}:conf={self.conf}:iou={self.iou}:max_det={self.max_det}"
                f":layout={self.layout}:imgsz={self.imgsz}:color={self.color_format}")

    def _preprocess(self, hw: tuple[int, int], indices: list[int], progress: bool):
        if self.preprocessor is None or (self.preprocessor.height, self.preprocessor.width) != hw:
            self.preprocessor = ImagePreprocess(hw[0], hw[1], resize="letterbox", color_format=self.color_format,
                                                mean=[0.0], std=[255.0])
            self.store = PixelStore(self.pixel_cache, self.preprocessor, self.data.files)
        self.store.fill(indices, progress, f"{self.name}: preprocess")
        return self.preprocessor

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        idx = resolve_indices(len(self.data), limit, indices)
        session = make_session(model, self.threads)
        inp, metadata = _session_io(session)
        hw = _static_hw(inp.shape) or self.imgsz or _parse_imgsz(metadata.get("imgsz")) or (640, 640)
        pre = self._preprocess(hw, idx, progress)
        bs = self.batch_size if not (isinstance(inp.shape[0], int) and inp.shape[0] > 0) else int(inp.shape[0])
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        names = model_names(metadata)
        state = {"layout": None if self.layout == "auto" else self.layout}
        out_name = session.get_outputs()[0].name
        watch = Stopwatch()

        def post(out: np.ndarray, batch: list[int], metas: list[dict]) -> list[np.ndarray]:
            rows = []
            for b, i in enumerate(batch):
                if state["layout"] is None:
                    state["layout"] = detect_layout(out.shape[1:], metadata)
                layout = state["layout"]
                if "nc" not in state:
                    state["nc"] = num_classes(layout, out.shape[1:], names)
                    state["cats"] = self.data.category_map(state["nc"])
                xyxy, scores, cls = postprocess(out[b], layout, self.conf, self.iou, self.max_det,
                                                metas[b], self.max_nms, state["nc"])
                rows.append(to_coco_rows(self.data.image_ids[i], xyxy, scores, state["cats"][cls]))
            return rows

        # Decode image i on a worker thread while the main thread runs inference on image i+1 (ORT releases the GIL).
        with ThreadPoolExecutor(1) as worker:
            futures = []
            bar = tqdm(total=len(idx), desc=f"{self.name}: evaluate", disable=not progress, leave=False)
            for batch, px, metas in self.store.batches(idx, bs):
                if len(batch) < bs and isinstance(inp.shape[0], int):  # static batch: pad, drop the padding's outputs
                    px = np.concatenate([px, np.repeat(px[-1:], bs - len(batch), axis=0)])
                x = pre.normalize(px).astype(dtype, copy=False)
                with watch:
                    out = session.run([out_name], {inp.name: x})[0]
                futures.append(worker.submit(post, out[:len(batch)], batch, metas))
                if len(futures) == 1:
                    futures[0].result()  # surface layout / class-count errors before running every image
                elif len(futures) > POST_AHEAD:
                    futures[-1 - POST_AHEAD].result()  # raw outputs waiting for decode stay bounded (8.6 MB each)
                bar.update(len(batch))
            bar.close()
            rows = [r for f in futures for r in f.result()]
        dets = np.concatenate(rows) if rows else np.zeros((0, 7))
        self.last_detections = dets
        stats = coco_stats(self.data.gt, dets, [self.data.image_ids[i] for i in idx], self.metric)
        named = {k: float(v) for k, v in zip(COCO_STAT_NAMES, stats)}
        samples = DetectionSamples(self.data.gt, np.asarray(self.data.image_ids, np.int64), dict(zip(idx, rows)))
        return EvalResult(metrics={"mAP50-95": named["AP"], "mAP50": named["AP50"]}, primary=self.primary,
                          n_samples=len(idx), seconds=time.perf_counter() - t0, inference_seconds=watch.total,
                          samples=samples,
                          extra={"coco_stats": named, "layout": state["layout"], "n_detections": int(len(dets)),
                                 "imgsz": list(hw), "metric_backend": self.metric})


def make_coco_evaluator(data=None, annotations=None, images=None, exclude=None, **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_coco(data, annotations, images, exclude), **options)


def make_yolo_evaluator(data, split: str = "val", **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_yolo(data, split, progress=options.pop("progress", True)), **options)
