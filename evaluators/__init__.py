"""Task evaluators: `make_evaluator(data, kind)` picks COCO detection mAP, YOLO-layout detection mAP, ImageNet-style
top-1/top-5 or a user plugin, and returns an Evaluator (see base.py) that caches preprocessed inputs across models.

    ev = make_evaluator("/data/coco", model="yolov5n.onnx")      # kind auto-detected: coco
    ev.evaluate("yolov5n.int8.onnx", limit=50).value             # mAP50-95 on the first 50 images
"""
from __future__ import annotations

from pathlib import Path

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Evaluator, Stopwatch, topk_correct
from sensq.evaluators.coco import DetectionEvaluator, make_coco_evaluator, make_yolo_evaluator
from sensq.evaluators.imagenet import ClassificationEvaluator, find_label_file, make_imagenet_evaluator
from sensq.evaluators.plugins import installed_plugins, make_plugin_evaluator

BUILTIN_KINDS = ("coco", "yolo", "imagenet", "agreement")

__all__ = ["EvalResult", "Evaluator", "Stopwatch", "topk_correct", "make_evaluator", "detect_kind", "model_info",
           "BUILTIN_KINDS", "DetectionEvaluator", "ClassificationEvaluator", "installed_plugins"]


def detect_kind(data: str | Path) -> str:
    """coco (COCO annotations json), yolo (a data.yaml), imagenet (a label file or class sub-folders), or agreement
    (images and no annotations: scored against the FP32 model's own outputs, evaluators/agreement.py)."""
    from sensq.evaluators.agreement import has_images

    p = Path(data)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return "yolo"
    if not p.is_dir():
        raise SensqError(f"data folder not found: {data}", "pass an existing dataset folder (--data)")
    if (p / "annotations").is_dir() and any((p / "annotations").glob("*.json")):
        return "coco"
    if any(p.glob("*.yaml")) or any(p.glob("*.yml")):
        return "yolo"
    if find_label_file(p) is not None:
        return "imagenet"
    if any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
        return "imagenet"  # ImageFolder tree; load_imagenet reports it if the sub-folders hold no images
    if any(p.glob("*.json")):
        return "coco"
    if has_images(p):
        return "agreement"
    raise SensqError(f"cannot tell the dataset type of {data}",
                     "use a COCO folder (annotations/*.json), a YOLO data.yaml, a labels file or class sub-folders, or pass kind=")


def model_info(model) -> tuple[tuple[int, int] | None, dict[str, str]]:
    """(input height/width if static, metadata_props) of an ONNX path or ModelProto, without running it."""
    import onnx

    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise SensqError(f"model file not found: {model}", "check the path given to --model")
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception as e:
            raise SensqError(f"cannot read ONNX model {model}: {str(e)[:200]}", "pass a valid .onnx file") from e
    if not isinstance(model, onnx.ModelProto):
        return None, {}
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    hw = None
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[2:]):
            hw = (int(dims[2].dim_value), int(dims[3].dim_value))
    return hw, {p.key: p.value for p in model.metadata_props}


def make_evaluator(data, kind: str = "auto", model=None, labels=None, **options) -> Evaluator:
    """An Evaluator for `data`.

    kind: coco | yolo | imagenet | agreement | auto | path/to/file.py:function | module:function | entry-point name.
    model: optional ONNX path/ModelProto; its static input size sets the letterbox/crop size (unless imgsz= or
           input_size= is given) and, for classification, its metadata may give mean/std.
    labels: label file for imagenet (default: found in the data folder).
    options: passed to the evaluator, e.g. coco: annotations=, images=, conf=, iou=, max_det=, layout=, metric=;
             yolo: split=; imagenet: synsets=, skip=, mean=, std=, color_format=, batch_size=.
    """
    kind = kind or "auto"
    if kind not in ("auto", *BUILTIN_KINDS):
        if model is not None:
            options.setdefault("model", model)
        return make_plugin_evaluator(kind, data, **options)
    if kind == "auto":
        if data is None:
            raise SensqError("no data given", "pass the dataset folder (--data)")
        kind = detect_kind(data)
        if kind == "agreement" and labels is not None:  # a folder of images with a label file elsewhere
            kind = "imagenet"
    if kind == "agreement":
        from sensq.evaluators.agreement import make_agreement_evaluator

        if "preprocess" not in options and options.get("detector_preprocess") is not None:
            options["preprocess"] = options.pop("detector_preprocess")
        options.pop("detector_preprocess", None)
        return make_agreement_evaluator(data, model=model, **options)
    hw, _ = model_info(model) if model is not None else (None, {})
    detector_preprocess = options.pop("detector_preprocess", None)
    if kind in ("coco", "yolo"):
        if detector_preprocess is not None:
            options["preprocess"] = detector_preprocess
        if hw is not None:
            options.setdefault("imgsz", hw)
        if labels is not None:
            raise SensqError("labels= applies to imagenet data only", "for COCO pass annotations=JSON")
        if kind == "coco":
            return make_coco_evaluator(data, **options)
        if data is None:
            raise SensqError("no data given", "pass a data.yaml or the folder holding it")
        return make_yolo_evaluator(data, **options)
    if data is None:
        raise SensqError("no data given", "pass the folder holding the images and the label file")
    if hw is not None:
        options.setdefault("input_size", hw)
    return make_imagenet_evaluator(data, labels=labels, **options)
