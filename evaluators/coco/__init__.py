"""COCO detection mAP for YOLO ONNX exports: datasets (COCO JSON or YOLO layout), decode + NMS, the pycocotools-exact
metric and the evaluator that ties them together.

Metric: the COCO protocol of pycocotools (see metric.py); `metric="pycocotools"` runs stock COCOeval end to end.
"""
from .dataset import COCO80_TO_91, DetectionSet, GroundTruth, find_coco_annotations, load_coco, load_yolo, quiet
from .decode import DEFAULT_IOU, LAYOUTS, candidates, detect_layout, model_names, nms_per_class, postprocess, to_coco_rows
from .evaluator import DetectionEvaluator, make_coco_evaluator, make_yolo_evaluator
from .metric import COCO_STAT_NAMES, coco_eval_arrays, coco_stats, pycocotools_eval, summarize

__all__ = ["COCO80_TO_91", "COCO_STAT_NAMES", "DetectionSet", "GroundTruth", "find_coco_annotations", "load_coco",
           "load_yolo", "quiet", "DEFAULT_IOU", "LAYOUTS", "candidates", "detect_layout", "model_names",
           "nms_per_class", "postprocess", "to_coco_rows", "DetectionEvaluator", "make_coco_evaluator",
           "make_yolo_evaluator", "coco_eval_arrays", "coco_stats", "pycocotools_eval", "summarize"]
