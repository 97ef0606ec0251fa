"""Label-free metrics: how closely a model agrees with the FP32 reference on any folder of images, per sample.

A search compares plans by their difference to FP32; when no annotations exist, that difference is measured
directly against FP32's own outputs. Every metric here keeps per-sample results (evaluators/samples.py), so
bootstrap intervals, pruning, the confirm split and the reports work exactly as with labels.

- detection (`DetectionAgreementEvaluator`): COCO mAP50-95 of the model's detections against FP32's detections
  with score >= `conf_gt` (0.25) taken as ground truth, through the same pycocotools-exact matching and per-image
  re-accumulation as the labeled COCO metric. FP32 against itself scores exactly 1.0.
- classification (`OutputAgreementEvaluator`, classifier outputs): top-1 agreement with FP32 (primary) and the
  mean KL divergence KL(softmax(FP32) || softmax(model)) in nats.
- any model (`OutputAgreementEvaluator`): output SNR in dB per sample, 10 log10(|ref|^2 / |out - ref|^2) over all
  outputs, capped at SNR_CAP_DB so that a bit-identical output has a finite score.

`GOALS` declares which way each metric is better; the search maximizes the primary, and every primary here is
higher-is-better. A plan that agrees with FP32 also agrees with FP32's mistakes: agreement measures the damage
quantization does, not accuracy.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Stopwatch, resolve_indices
from sensq.evaluators.samples import AGREEMENT, DetectionSamples, MeanSamples
from sensq.preprocess import IMAGE_SUFFIXES
from sensq.runtime import make_session

log = logging.getLogger("sensq")

PSEUDO_GT_CONF = 0.25  # FP32 boxes at or above this score are the pseudo ground truth (Ultralytics' predict default)
SNR_CAP_DB = 100.0
SNR = "output SNR dB vs FP32 (label-free)"
GOALS = {AGREEMENT: "maximize", "agreement50": "maximize", "top1_agreement": "maximize", "kl": "minimize",
         SNR: "maximize", "snr_db": "maximize"}


def image_files(folder) -> list[Path]:
    """The images directly in `folder` (symlinks followed), sorted by name."""
    p = Path(folder)
    if not p.is_dir():
        raise SensqError(f"image folder not found: {folder}", "pass an existing folder of images (--data / --unlabeled)")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise SensqError(f"no images in {folder}", f"put images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
    return files


def has_images(folder) -> bool:
    p = Path(folder)
    return p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())


def _model_key(model) -> str:
    from sensq.evaluators.scoring import model_hash

    try:
        return model_hash(model)
    except (TypeError, OSError):
        return type(model).__name__


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------

def _empty_gt(image_ids, nc: int = 0):
    from .coco.dataset import GroundTruth

    return GroundTruth({"images": [{"id": int(i)} for i in image_ids], "annotations": [],
                        "categories": [{"id": c} for c in range(1, nc + 1)]})


def pseudo_ground_truth(rows: dict[int, np.ndarray], image_ids, nc: int, conf: float):
    """A COCO GroundTruth from detection rows [image_id, x, y, w, h, score, category_id] with score >= conf."""
    from .coco.dataset import GroundTruth

    anns = []
    for i in sorted(rows):
        for r in rows[i][rows[i][:, 5] >= conf]:
            anns.append({"id": len(anns) + 1, "image_id": int(r[0]), "category_id": int(r[6]),
                         "bbox": [float(v) for v in r[1:5]], "area": float(r[3] * r[4]), "iscrowd": 0})
    return GroundTruth({"images": [{"id": int(i)} for i in image_ids], "annotations": anns,
                        "categories": [{"id": c} for c in range(1, nc + 1)]})


class _Unlabeled:
    """Stands in for a DetectionSet's category map: class index i is category i + 1, for any class count."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, nc: int) -> np.ndarray:
        self.owner.nc = nc
        return np.arange(1, nc + 1, dtype=np.int64)


class DetectionAgreementEvaluator:
    """mAP50-95 of a detector's boxes against FP32's boxes with score >= conf_gt (see the module docstring).

    The reference (FP32) runs once on every image on first use; its confident boxes become the ground truth of
    `self.data.gt`, so per-sample results are plain COCO DetectionSamples (primary AGREEMENT)."""

    name = "agreement"
    primary = AGREEMENT
    goals = GOALS

    def __init__(self, files, reference, conf_gt: float = PSEUDO_GT_CONF, source: str = "", **options):
        from .coco.dataset import DetectionSet
        from .coco.evaluator import DetectionEvaluator

        files = [Path(f) for f in files]
        ids = list(range(1, len(files) + 1))
        self.data = DetectionSet(files, ids, _empty_gt(ids), True, f"unlabeled:{source or (files[0].parent if files else '')}")
        self.data.category_map = _Unlabeled(self)
        self.inner = DetectionEvaluator(self.data, **options)
        self.reference, self.conf_gt = reference, float(conf_gt)
        self.nc: int | None = None
        self._ready = False
        self._ref_key = _model_key(reference)

    def __len__(self) -> int:
        return len(self.data)

    def signature(self) -> str:
        return f"{self.inner.signature()}:agreement:ref={self._ref_key}:conf_gt={self.conf_gt}"

    def ground_truth(self, progress: bool = False):
        """FP32's confident boxes on every image (computed once)."""
        if not self._ready:
            res = self.inner.evaluate(self.reference, progress=progress)
            self.data.gt = pseudo_ground_truth(res.samples.rows, self.data.image_ids, self.nc or 0, self.conf_gt)
            self._ready = True
            log.info("agreement: %d FP32 boxes with score >= %.2f on %d images are the pseudo ground truth",
                     len(self.data.gt.img), self.conf_gt, len(self.data))
        return self.data.gt

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        gt = self.ground_truth(progress)
        res = self.inner.evaluate(model, limit, progress, indices)
        samples = DetectionSamples(gt, np.asarray(self.data.image_ids, np.int64), res.samples.rows, AGREEMENT)
        extra = {k: v for k, v in res.extra.items() if k != "coco_stats"}
        extra.update(pseudo_gt_conf=self.conf_gt, pseudo_gt_boxes=int(len(gt.img)),
                     agreement="COCO mAP50-95 against FP32's boxes with score >= %.2f" % self.conf_gt)
        return EvalResult(metrics={AGREEMENT: res.metrics["mAP50-95"], "agreement50": res.metrics["mAP50"]},
                          primary=AGREEMENT, n_samples=res.n_samples, seconds=time.perf_counter() - t0,
                          inference_seconds=res.inference_seconds, samples=samples, extra=extra)


# ----------------------------------------------------------------------------------------------------------------
# Classification and any model: outputs compared with FP32's
# ----------------------------------------------------------------------------------------------------------------

def snr_db(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-row 10 log10(|ref|^2 / |out - ref|^2) in dB, capped at SNR_CAP_DB (rows: samples, all outputs flattened)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    sig = (ref ** 2).sum(axis=1)
    err = ((out - ref) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = 10.0 * np.log10(sig / err)
    return np.where(err == 0, SNR_CAP_DB, np.minimum(np.nan_to_num(v, nan=SNR_CAP_DB, neginf=-SNR_CAP_DB), SNR_CAP_DB))


def softmax_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(ref) || softmax(logits)) in nats."""
    from scipy.special import log_softmax

    lp, lq = log_softmax(np.asarray(ref_logits, np.float64), axis=1), log_softmax(np.asarray(logits, np.float64), axis=1)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)


REF_MEMORY = 1 << 16  # reference outputs up to this many floats per sample are kept in memory; larger ones re-run


class OutputAgreementEvaluator:
    """Top-1 agreement and softmax KL (classifiers) and output SNR (any model) against the FP32 reference.

    preprocess: the ImagePreprocess of the model's input (the calibration's, so both see the same pixels).
    classifier: score top-1 agreement (primary) and KL; else the output SNR is the primary."""

    name = "agreement"
    goals = GOALS

    def __init__(self, files, reference, preprocess, classifier: bool = True, batch_size: int = 1,
                 threads: int | None = None, pixel_cache=None, source: str = ""):
        from .pixel_store import PixelStore

        self.files = [Path(f) for f in files]
        self.reference, self.pre, self.classifier = reference, preprocess, classifier
        self.primary = AGREEMENT if classifier else SNR
        self.batch_size, self.threads, self.source = batch_size, threads, source
        self.store = PixelStore(pixel_cache, preprocess, self.files)
        self._ref_key = _model_key(reference)
        self._ref_session = None
        self._ref_out: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def signature(self) -> str:
        return (f"agreement-output:{self.source}:{len(self.files)}:{self.files[0].name}:{self.pre.key()}"
                f":classifier={self.classifier}:ref={self._ref_key}")

    def _run(self, session, px: np.ndarray) -> np.ndarray:
        inp = session.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        outs = session.run(None, {inp.name: self.pre.normalize(px).astype(dtype, copy=False)})
        return np.concatenate([np.asarray(o, np.float32).reshape(len(px), -1) for o in outs], axis=1)

    def _reference(self, batch: list[int], px: np.ndarray) -> np.ndarray:
        if all(i in self._ref_out for i in batch):
            return np.stack([self._ref_out[i] for i in batch])
        if self._ref_session is None:
            self._ref_session = make_session(self.reference, self.threads)
        out = self._run(self._ref_session, px)
        if out.shape[1] <= REF_MEMORY:
            self._ref_out.update(zip(batch, out))
        return out

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        idx = resolve_indices(len(self.files), limit, indices)
        self.store.fill(idx, progress, "agreement: preprocess")
        session = make_session(model, self.threads)
        static = session.get_inputs()[0].shape[0]
        bs = int(static) if isinstance(static, int) and static > 0 else max(1, int(self.batch_size))
        watch, snr, top1, kl = Stopwatch(), [], [], []
        for batch, px, _ in tqdm(self.store.batches(idx, bs), total=-(-len(idx) // bs), desc="agreement: evaluate",
                                 disable=not progress, leave=False):
            with watch:
                out = self._run(session, px)
            ref = self._reference(batch, px)
            if ref.shape != out.shape:
                raise SensqError(f"model outputs {out.shape[1]} values per sample, FP32 {ref.shape[1]}",
                                 "compare models with the same outputs")
            snr.append(snr_db(ref, out))
            if self.classifier:
                top1.append((ref.argmax(1) == out.argmax(1)).astype(np.float64))
                kl.append(softmax_kl(ref, out))
        scores = {SNR: np.concatenate(snr)}
        if self.classifier:
            scores.update({AGREEMENT: np.concatenate(top1), "kl": np.concatenate(kl)})
        samples = MeanSamples(np.asarray(idx, np.int64), scores, self.primary)
        return EvalResult(metrics={k: float(v.mean()) for k, v in scores.items()}, primary=self.primary,
                          n_samples=len(idx), seconds=time.perf_counter() - t0, inference_seconds=watch.total,
                          samples=samples, extra={"goals": {k: GOALS[k] for k in scores if k in GOALS}})


# ----------------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------------

def _is_classifier(model) -> bool:
    """One output of rank 2 ([N, classes]): a classifier."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    outs = proto.graph.output
    return len(outs) == 1 and len(outs[0].type.tensor_type.shape.dim) == 2


def _default_preprocess(model):
    from sensq.defaults import classifier_normalization
    from sensq.evaluators import model_info
    from sensq.preprocess import ImagePreprocess

    hw, _ = model_info(model)
    mean, std, _ = classifier_normalization(model)
    return ImagePreprocess(*(hw or (224, 224)), resize="imagenet", color_format="rgb", mean=mean, std=std)


def make_agreement_evaluator(data, model=None, reference=None, detector: bool | None = None, preprocess=None,
                             exclude=None, conf_gt: float = PSEUDO_GT_CONF, **options):
    """The label-free evaluator for `data` (a folder of images) and the model's task.

    reference: the FP32 model every plan is compared with (default `model`); detector: the model's task (default:
    found from its graph); preprocess: an ImagePreprocess for classifiers and other models (default: the ImageNet
    crop with the model's normalization) or a DetectorPreprocess for detectors (default: the export's);
    exclude: files left out (e.g. the calibration images), by resolved path."""
    from sensq.defaults import is_detector

    reference = reference if reference is not None else model
    if reference is None:
        raise SensqError("agreement needs the FP32 model", "pass --model (the FP32 model plans are compared with)")
    path_model = model if isinstance(model, (str, Path)) else None
    files = image_files(data)
    if exclude:
        drop = {Path(f).resolve() for f in exclude}
        kept = [f for f in files if f.resolve() not in drop]
        if len(kept) < len(files):
            log.info("agreement: left out %d calibration images of %s", len(files) - len(kept), data)
        if not kept:
            raise SensqError(f"every image in {data} is a calibration image", "pass a folder with other images (--data)")
        files = kept
    if detector is None:
        detector = is_detector(path_model if path_model is not None else reference)
    if detector:
        det_pre = preprocess if preprocess is not None and not hasattr(preprocess, "normalize") else None
        return DetectionAgreementEvaluator(files, reference, conf_gt, str(data), preprocess=det_pre, **options)
    if preprocess is None or not hasattr(preprocess, "normalize"):
        preprocess = _default_preprocess(path_model if path_model is not None else reference)
    keep = {k: v for k, v in options.items() if k in ("batch_size", "threads", "pixel_cache")}
    return OutputAgreementEvaluator(files, reference, preprocess, _is_classifier(reference), source=str(data), **keep)


def describe(evaluator) -> str:
    """One line saying what the label-free metric measures."""
    if isinstance(evaluator, DetectionAgreementEvaluator):
        return (f"{AGREEMENT}: COCO mAP50-95 of each plan's boxes against FP32's boxes with score >= "
                f"{evaluator.conf_gt:.2f}, on {len(evaluator)} unlabeled images")
    if evaluator.classifier:
        return f"{AGREEMENT}: top-1 agreement with FP32 (also mean softmax KL, output SNR) on {len(evaluator)} unlabeled images"
    return f"{SNR}: output SNR against FP32 (higher is better) on {len(evaluator)} unlabeled images"
