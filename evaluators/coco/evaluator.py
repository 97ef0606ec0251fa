"""The COCO/YOLO-layout detection evaluator: preprocessed inputs cached on disk across models (bounded memory),
decode on a worker thread."""
from __future__ import annotations

import ast
import logging
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
from .layouts import ULTRALYTICS, DetectorExport, DetectorPreprocess, recognize
from .metric import COCO_STAT_NAMES, coco_stats

log = logging.getLogger("sensq")

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
                 max_det: int = 300, max_nms: int = 30000, layout: str = "auto", color_format: str | None = None,
                 batch_size: int = 1, threads: int | None = None, metric: str = "fast",
                 pixel_cache=None, preprocess: DetectorPreprocess | None = None):
        if layout not in ("auto", *LAYOUTS):
            raise SensqError(f"unknown detection layout {layout!r}", f"use auto, {', '.join(LAYOUTS)}")
        if metric not in ("fast", "pycocotools"):
            raise SensqError(f"unknown COCO metric backend {metric!r}", "use metric='fast' or metric='pycocotools'")
        self.data = dataset
        self.name = "yolo" if dataset.yolo_layout else "coco"
        self.imgsz = _parse_imgsz(imgsz)
        self.conf, self.iou, self.max_det, self.max_nms = conf, iou, max_det, max_nms
        self.layout, self.batch_size, self.threads, self.metric = layout, batch_size, threads, metric
        # preprocess None: the one the model's export was trained with (layouts.py), fixed by the first model scored
        # (the FP32 reference), so every later model of a search sees the same pixels.
        self.preprocess = preprocess
        if color_format is not None:
            self.preprocess = DetectorPreprocess(*_fields(preprocess or ULTRALYTICS, color=color_format.lower()))
        self.export: DetectorExport | None = None
        self.preprocessor: ImagePreprocess | None = None  # of the cached pixels
        self.pixel_cache = pixel_cache
        self.store: PixelStore | None = None  # letterboxed uint8 pixels and geometry of the current size, on disk
        self.last_detections: np.ndarray | None = None  # rows of the last evaluate() (for inspection and tests)

    def __len__(self) -> int:
        return len(self.data)

    def signature(self) -> str:
        return (f"{self.name}:{self.data.source}:{len(self.data)}:conf={self.conf}:iou={self.iou}:max_det={self.max_det}"
                f":layout={self.layout}:imgsz={self.imgsz}:pre={self.preprocess}")

    def _recognize(self, model) -> None:
        """Layout and preprocessing of the model's export, once (from the first model scored: the FP32 reference)."""
        if self.export is not None:
            return
        proto = _load_proto(model)
        self.export = recognize(proto) if proto is not None else DetectorExport(None, None, "model not readable as ONNX")
        if self.preprocess is None:
            self.preprocess = self.export.preprocess or ULTRALYTICS
            if self.export.preprocess is None:
                log.warning("detector preprocessing unknown (%s): assuming Ultralytics' (centred letterbox, RGB, x/255);"
                            " pass --preset yolo|yolox or --color/--mean/--std if that is wrong", self.export.reason)
            else:
                log.info("detector preprocessing: %s (%s)", self.preprocess.name, self.export.reason)
        if self.layout == "auto" and self.export.layout is not None:
            self.layout = self.export.layout

    def _preprocess(self, hw: tuple[int, int], indices: list[int], progress: bool):
        if self.preprocessor is None or (self.preprocessor.height, self.preprocessor.width) != hw:
            p = self.preprocess
            self.preprocessor = ImagePreprocess(hw[0], hw[1], resize=p.resize, color_format=p.color,
                                                mean=list(p.mean), std=list(p.std))
            self.store = PixelStore(self.pixel_cache, self.preprocessor, self.data.files)
        self.store.fill(indices, progress, f"{self.name}: preprocess")
        return self.preprocessor

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        idx = resolve_indices(len(self.data), limit, indices)
        self._recognize(model)
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
                                                metas[b], self.max_nms, state["nc"], hw)
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
                                 "imgsz": list(hw), "metric_backend": self.metric,
                                 "preprocess": self.preprocess.name, "export": self.export.reason})


def _fields(p: DetectorPreprocess, **changes) -> tuple:
    d = {"resize": p.resize, "color": p.color, "mean": p.mean, "std": p.std, "name": p.name, **changes}
    if changes:
        d["name"] = "custom"
    return d["resize"], d["color"], d["mean"], d["std"], d["name"]


def _load_proto(model):
    """The ModelProto behind a path / proto / bytes (None for a session object: recognition then uses defaults)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(getattr(model, "model_proto", None), onnx.ModelProto):  # a session that keeps its model
        return model.model_proto
    try:
        if isinstance(model, (bytes, bytearray)):
            return onnx.load_from_string(bytes(model))
        return onnx.load(str(model), load_external_data=False)
    except Exception:  # a session object or an unreadable path: make_session reports the real problem
        return None


def make_coco_evaluator(data=None, annotations=None, images=None, exclude=None, **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_coco(data, annotations, images, exclude), **options)


def make_yolo_evaluator(data, split: str = "val", **options) -> DetectionEvaluator:
    return DetectionEvaluator(load_yolo(data, split, progress=options.pop("progress", True)), **options)
