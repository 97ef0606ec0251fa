"""What sensq does when the user does not say: presets, preprocessing chosen from the model, where calibration and
evaluation data come from, and how they are kept apart. The CLI and the Python API both go through here, so
`sensq search --model m.onnx` and `sensq.defaults.setup(model="m.onnx")` see the same data and preprocessing.

Data rules (never calibrate on the images that are scored, unless asked to with allow_calib_on_eval; setup checks
the files, by path and content, when the user gave both sets: sensq/disjoint.py):
- detectors: COCO train2017 calibrates, val2017 evaluates; when only val2017 exists, a fixed-seed random subset of
  `calib_step` val images calibrates and is left out of the evaluation (said in the log);
- classifiers: an ImageNet-style folder of images + label file: the first `calib_step` files by name calibrate,
  evaluation skips exactly those (skip = calib_step).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SensqError

log = logging.getLogger("sensq")

PRESETS = ("yolo", "yolox", "imagenet", "pt_imagenet", "resize")
SANITY_IMAGES = 4  # FP32 inferences that check a detector's preprocessing before any calibration
DEFAULT_CALIB_STEP = 100
SPLIT_SEED = 0


def apply_preset(ip, preset: str | None) -> None:
    """Image preprocessing presets: yolo = letterbox, RGB, x/255; yolox = top-left letterbox, BGR, 0-255; imagenet = resize 256 + centre crop, torchvision
    mean/std; pt_imagenet = the PT_IMAGENET preprocess file; resize = plain resize (xquant's default)."""
    from .data import TORCH_MEAN, TORCH_STD

    if preset == "yolo":
        ip.resize, ip.color_format = "letterbox", ip.color_format or "rgb"
        ip.mean_value = ip.mean_value or [0.0] * 3
        ip.std_value = ip.std_value or [255.0] * 3
    elif preset == "yolox":
        ip.resize, ip.color_format = "letterbox_topleft", ip.color_format or "bgr"
        ip.mean_value = ip.mean_value or [0.0] * 3
        ip.std_value = ip.std_value or [1.0] * 3
    elif preset == "imagenet":
        ip.preprocess_file, ip.color_format = "IMAGENET", ip.color_format or "rgb"
        ip.mean_value = ip.mean_value or TORCH_MEAN
        ip.std_value = ip.std_value or TORCH_STD
    elif preset == "pt_imagenet":
        ip.preprocess_file = "PT_IMAGENET"
    elif preset == "resize":
        ip.resize = "resize"
    elif preset is not None:
        raise SensqError(f"unknown preset {preset!r}", f"use one of: {', '.join(PRESETS)}")


def is_detector(model_path) -> bool:
    from .heads import detect_yolo_head
    from .model import Graph, load_model

    return detect_yolo_head(Graph(load_model(model_path))) is not None


def classifier_normalization(model_path) -> tuple[list[float], list[float], str]:
    """(mean, std) on 0-255 pixels for a classifier: the model's metadata when it states them, else torchvision's.
    The ImageNet evaluator applies the same rule, so calibration and evaluation see the same inputs."""
    from .data import TORCH_MEAN, TORCH_STD
    from .evaluators.imagenet import metadata_normalization
    from .model import load_model

    meta = {p.key: p.value for p in load_model(model_path).metadata_props}
    found = metadata_normalization(meta)
    return (list(found[0]), list(found[1]), "model metadata") if found else (TORCH_MEAN, TORCH_STD, "torchvision default")


def detector_preprocess(model_path, calib_source=None, input_name: str = "input"):
    """The preprocessing a detector export was trained with: recognised from the model (evaluators/coco/layouts.py),
    else the candidate under which FP32 finds the most confident boxes on a few calibration images (said in one
    line, with the flags that override it). A recognised choice is checked the same way."""
    from .data import list_files
    from .evaluators.coco.layouts import CANDIDATES, ULTRALYTICS, plausible_images, recognize
    from .model import load_model

    model = load_model(model_path)
    export = recognize(model)
    files = list_files(Path(calib_source), "img", input_name)[:SANITY_IMAGES] if calib_source else []
    if export.preprocess is not None:
        log.info("detector preprocessing: %s (%s)", export.preprocess.name, export.reason)
        if files and plausible_images(model, files, export.preprocess, export.layout) == 0:
            log.warning("FP32 finds no plausible set of confident boxes (1-100 of score >= 0.25) on %d calibration "
                        "images with the %s preprocessing: if the weights are trained, the preprocessing is wrong "
                        "(--preset, --color, --mean, --std)", len(files), export.preprocess.name)
        return export.preprocess
    if not files:
        log.warning("detector preprocessing unknown (%s): assuming Ultralytics' (%s); pass --preset yolo|yolox or "
                    "--color/--mean/--std if that is wrong", export.reason, ULTRALYTICS.flags())
        return ULTRALYTICS
    counts = {p.name: plausible_images(model, files, p, export.layout) for p in CANDIDATES}
    best = max(CANDIDATES, key=lambda p: counts[p.name])  # ties keep the first: Ultralytics'
    log.warning("detector preprocessing unknown (%s): chose %s, under which FP32 finds a plausible set of confident "
                "boxes on the most of %d calibration images (%s); pass %s or --color/--mean/--std to set it",
                export.reason, best.name, len(files), ", ".join(f"{k} {v}" for k, v in counts.items()), best.flags())
    return best


def apply_default_preprocessing(cfg) -> None:
    """When neither the config nor a preset chose a preprocessing, pick one from the model (detector or classifier)."""
    from .config import InputParams

    yolo = is_detector(cfg.model_path)
    if cfg.data_free and not cfg.inputs:
        cfg.inputs = [InputParams()]
    for ip in cfg.inputs:
        explicit = ip.preprocess_file or ip.resize or ip.mean_value is not None or ip.std_value is not None
        if explicit or ip.file_type != "img":
            continue
        if yolo:
            pre = detector_preprocess(cfg.model_path, None if cfg.data_free else ip.data_list_path)
            ip.resize, ip.color_format = pre.resize, ip.color_format or pre.color
            ip.mean_value, ip.std_value = list(pre.mean), list(pre.std)
            continue
        # A classifier without preprocessing settings: the ImageNet crop with the model's own normalization.
        mean, std, origin = classifier_normalization(cfg.model_path)
        ip.preprocess_file, ip.color_format = "IMAGENET", ip.color_format or "rgb"
        ip.mean_value, ip.std_value = mean, std
        log.info("classifier preprocessing: resize 256, centre crop, mean %s std %s (%s)", mean, std, origin)


def build_config(config=None, model=None, calib=None, calib_step=None, file_type=None, preset=None, mean=None,
                 std=None, color=None, data_free=False, skip_simplify=False, cache_dir=None, method=None,
                 percentile=None, target=None, activation_type=None, per_tensor=False, overflow_fix=None, placement=None,
                 bias_correction=None, equalize=None, weight_range=None, head_layers=None, rounding=None,
                 rounding_budget=None,
                 truncate=None, float_nodes=None, float_op_types=None, no_auto_head=False, seed=None, **_ignored):
    """A QuantizeConfig from an xquant-style JSON (optional) overridden by the given options (the CLI's names)."""
    from .config import InputParams, config_from_dict, load_config

    cfg = load_config(config) if config else config_from_dict({})
    if model:
        cfg.onnx_model = str(model)
    if calib:
        if cfg.inputs and len(cfg.inputs) == len(calib):
            for ip, c in zip(cfg.inputs, calib):
                ip.data_list_path = str(c)
        else:
            cfg.inputs = [InputParams(data_list_path=str(c)) for c in calib]
    for ip in cfg.inputs or []:
        ip.file_type = file_type or ip.file_type
        apply_preset(ip, preset)
        ip.mean_value = mean or ip.mean_value
        ip.std_value = std or ip.std_value
        ip.color_format = color or ip.color_format
    simple = {"calibration_step": calib_step, "calibration_type": method, "target": target,
              "activation_type": activation_type, "cache_dir": cache_dir, "seed": seed, "overflow_fix": overflow_fix,
              "placement": placement, "bias_correction": None if bias_correction == "none" else bias_correction,
              "equalize": equalize, "weight_range": None if weight_range == "minmax" else weight_range,
              "head_layers": head_layers, "rounding": rounding, "rounding_budget": rounding_budget}
    for name, value in simple.items():
        if value is not None:
            setattr(cfg, name, value)
    if percentile is not None:
        from .ranges import normalize_percentile

        cfg.max_percentile = normalize_percentile(percentile)
        if method is None and not config:
            cfg.calibration_type = "percentile"
    cfg.per_channel = cfg.per_channel and not per_tensor
    cfg.truncate_var_names = truncate or cfg.truncate_var_names
    cfg.float_nodes = float_nodes or cfg.float_nodes
    cfg.float_op_types = float_op_types or cfg.float_op_types
    cfg.auto_float_head = cfg.auto_float_head and not no_auto_head
    cfg.data_free = cfg.data_free or data_free
    cfg.skip_onnxsim = cfg.skip_onnxsim or skip_simplify
    cfg.__post_init__()  # re-validate after the overrides
    if not cfg.inputs and not cfg.data_free:
        raise SensqError("no calibration data given",
                         "pass --calib <image folder or list file>, a config with data_list_path, or --data-free")
    apply_default_preprocessing(cfg)
    return cfg


@dataclass
class DataChoice:
    """Where calibration and evaluation data come from, and what keeps them apart."""

    calib: list[str] | None
    data: str | None
    labels: str | None = None
    skip: int | None = None  # classification: evaluation skips the first `skip` files by name
    exclude: list[str] | None = None  # detection: evaluation leaves out these image files
    notes: list[str] = field(default_factory=list)


def choose_data(model=None, config=None, calib=None, data=None, labels=None, skip=None, calib_step=None,
                data_free=False, allow_calib_on_eval=False) -> DataChoice:
    """Fill in calibration/evaluation data the user did not give (see the module docstring)."""
    from .datasets import default_data

    choice = DataChoice(list(calib) if calib else None, data, labels, skip)
    if data and (calib or config or data_free):
        return choice
    if not model and not config:
        raise SensqError("no model given", "pass --model model.onnx or --config cfg.json")
    if model is None:
        from .config import load_config

        model = load_config(config).model_path
    kind = "detection" if is_detector(model) else "classification"
    found_calib, found_data = default_data(kind)
    step = int(calib_step or DEFAULT_CALIB_STEP)
    if kind == "detection" and found_calib is None and not (calib or config or data_free):
        choice.calib, choice.exclude = _split_val(Path(found_data), step, allow_calib_on_eval, choice.notes)
    elif not (calib or config or data_free):
        choice.calib = [str(found_calib)]
    choice.data = choice.data or str(found_data)
    if kind == "classification" and not choice.labels:
        tsv = Path(found_data) / "images_labels.tsv"
        if tsv.is_file():
            choice.labels = str(tsv)
            if choice.skip is None and not allow_calib_on_eval:
                choice.skip = step  # the first `step` files by name calibrated the model
    for n in choice.notes:
        log.info(n)
    log.info("calibration data: %s; evaluation data: %s (defaults)", choice.calib, choice.data)
    return choice


def _split_val(coco: Path, step: int, allow: bool, notes: list[str]) -> tuple[list[str], list[str] | None]:
    """Only val2017 exists: calibrate on a fixed-seed random subset of it and leave that subset out of evaluation."""
    from .datasets import calibration_list_dir

    images = sorted(p for p in (coco / "val2017").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if allow:
        notes.append(f"calibrating on {min(step, len(images))} of the evaluation images (allow_calib_on_eval)")
        return [str(coco / "val2017")], None
    if len(images) <= step:
        raise SensqError(f"only {len(images)} images in {coco / 'val2017'} and no train2017 to calibrate on",
                         "add a train2017 folder, pass --calib, or --allow-calib-on-eval to calibrate on the evaluation images")
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = sorted(images[i] for i in rng.choice(len(images), step, replace=False))
    path = calibration_list_dir() / f"coco-val-calib-{len(images)}-{step}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(str(p) for p in chosen) + "\n")
    notes.append(f"no train2017: calibrating on {step} val2017 images (seed {SPLIT_SEED}, listed in {path}) and "
                 f"evaluating on the other {len(images) - step}")
    return [str(path)], [p.name for p in chosen]


def _detector_preprocess_of(ip):
    """The DetectorPreprocess an InputParams describes (None when it leaves the resize to the model)."""
    from .evaluators.coco.layouts import DetectorPreprocess

    if ip is None or ip.resize not in ("letterbox", "letterbox_topleft", "resize"):
        return None
    return DetectorPreprocess(ip.resize, ip.color_format or "rgb", _three(ip.mean_value, 0.0),
                              _three(ip.std_value, 1.0), "calibration")


def _three(values, default: float) -> tuple[float, float, float]:
    v = [float(x) for x in values] if values else [default]
    return tuple(v * 3 if len(v) == 1 else v)


def evaluator_for(data, task: str = "auto", model=None, labels=None, skip=None, mean=None, std=None, exclude=None,
                  cache_dir=None, preset=None, color=None, detector_preprocess=None, reference=None,
                  image_preprocess=None, calib_files=None, **_ignored):
    """The evaluator for `data` with the options the model's preprocessing implies.

    detector_preprocess: what calibration used (setup passes it, so both see the same pixels); else --preset /
    --color / --mean / --std when given, else the model's export decides (evaluators/coco/layouts.py).
    A folder of images without annotations (or task="agreement") gives the label-free evaluator, which compares
    every model with `reference` (the FP32 model; default `model`) on those images minus `calib_files`."""
    from .config import InputParams
    from .evaluators import make_evaluator

    if detector_preprocess is None and (preset in ("yolo", "yolox", "resize") or color):
        ip = InputParams(mean_value=mean, std_value=std, color_format=color)
        apply_preset(ip, preset or "yolo")
        detector_preprocess = _detector_preprocess_of(ip)

    if not data:
        raise SensqError("no evaluation data given", "pass --data <COCO folder | data.yaml folder | image folder>")
    if _kind(data, task, labels) == "agreement":
        return _agreement(data, task, model, reference, image_preprocess or detector_preprocess, calib_files, cache_dir)
    options = {}
    if skip is not None:
        options["skip"] = skip
    if exclude:
        options["exclude"] = exclude
    if cache_dir and task in ("auto", "coco", "yolo", "imagenet"):
        options["pixel_cache"] = str(Path(cache_dir) / "pixels")  # preprocessed images beside the other caches
    if detector_preprocess is not None:
        options["detector_preprocess"] = detector_preprocess
    if task in ("auto", "imagenet"):
        if mean:
            options["mean"] = mean
        if std:
            options["std"] = std
    return make_evaluator(data, kind=task, model=str(model) if model else None, labels=labels, **options)


def _kind(data, task: str, labels=None) -> str:
    if task != "auto" or labels:  # a label file given: the images are labeled
        return task
    from .evaluators import detect_kind

    try:
        return detect_kind(data)
    except SensqError:
        return task  # make_evaluator reports it


def _agreement(data, task, model, reference, preprocess, calib_files, cache_dir):
    from .evaluators.agreement import describe, make_agreement_evaluator

    pixel_cache = str(Path(cache_dir) / "pixels") if cache_dir else None
    ev = make_agreement_evaluator(data, model=str(model) if model else None, reference=reference,
                                  preprocess=preprocess, exclude=calib_files, pixel_cache=pixel_cache)
    why = f"--data {data} holds images and no annotations" if task == "auto" else "--task agreement"
    log.info("%s: scoring %s", why, describe(ev))
    if reference is None:  # sensq eval: no separate FP32 model, so the model is compared with itself
        log.warning("agreement compares with --model itself here (1.0 by construction); search and sensitivity "
                    "compare every plan with the FP32 model")
    return ev


def setup(progress: bool = True, **options):
    """What sensitivity and search start from: data found, config built, statistics ready, evaluator made.

    options: the CLI's option names (model, config, calib, data, labels, skip, task, calib_step, preset, mean, ...).
    Returns (config, workspace, evaluator)."""
    from .disjoint import refuse_overlap
    from .quantize import prepare

    choice = choose_data(options.get("model"), options.get("config"), options.get("calib"), options.get("data"),
                         options.get("labels"), options.get("skip"), options.get("calib_step"),
                         options.get("data_free", False), options.get("allow_calib_on_eval", False))
    opts = {**options, "calib": choice.calib, "data": choice.data, "labels": choice.labels, "skip": choice.skip,
            "exclude": choice.exclude}
    cfg = build_config(**opts)
    if not opts.get("mean") and cfg.inputs and cfg.inputs[0].preprocess_file == "IMAGENET":
        # evaluate with the normalization the model was calibrated with
        opts["mean"], opts["std"] = cfg.inputs[0].mean_value, cfg.inputs[0].std_value
    if cfg.inputs and is_detector(cfg.model_path):
        opts["detector_preprocess"] = _detector_preprocess_of(cfg.inputs[0])
    task, ws = opts.get("task") or "auto", None
    if opts.get("data") and _kind(opts["data"], task, opts.get("labels")) == "agreement":
        # label-free scoring compares with the FP32 model the search scores, on the calibration's pixels, and
        # leaves the calibration images out itself: calibrate first
        ws = prepare(cfg, progress=progress)
        sources = getattr(ws.data, "sources", None) or []
        opts["reference"] = ws.model
        opts["image_preprocess"] = sources[0].image if sources and not opts.get("detector_preprocess") else None
        opts["calib_files"] = list(sources[0].files[:len(ws.data)]) if sources else None
    rest = {k: v for k, v in opts.items() if k not in ("task", "model")}
    evaluator = evaluator_for(task=task, model=cfg.model_path, **rest)
    if ws is None:
        # before calibration: given --calib and --data, nothing above checked that they are apart
        refuse_overlap(cfg, evaluator, bool(options.get("allow_calib_on_eval")))
        ws = prepare(cfg, progress=progress)
    return cfg, ws, evaluator


def ranking_evaluator(ws, labeled, unlabeled, cache_dir=None):
    """--rank-by agreement: the label-free evaluator the search ranks plans with, on the images of `unlabeled`
    minus the calibration images and the labeled evaluation images (those confirm the front: nothing may be
    selected on them). The same pixels as the labeled evaluator (its preprocessing) or as calibration."""
    from .evaluators.agreement import GOALS, describe, make_agreement_evaluator

    if unlabeled is None:
        raise SensqError("--rank-by agreement needs images to rank plans on",
                         "pass --unlabeled DIR (e.g. the calibration pool: its calibration images are left out)")
    if getattr(labeled, "primary", None) in GOALS:  # --data is an image folder: the search is label-free already
        raise SensqError("--rank-by agreement needs labeled --data to confirm the front on",
                         "pass a COCO / YOLO / ImageNet --data, or drop --rank-by (an image folder is label-free already)")
    sources = getattr(ws.data, "sources", None) or []
    calib = list(sources[0].files[:len(ws.data)]) if sources else []
    scored = list(getattr(getattr(labeled, "data", None), "files", None) or [])
    detector = is_detector(ws.cfg.model_path)
    preprocess = getattr(labeled, "preprocess", None) if detector else None
    if preprocess is None and sources and not detector:
        preprocess = sources[0].image  # a classifier's: the calibration's crop and normalization
    pixel_cache = str(Path(cache_dir) / "pixels") if cache_dir else None
    ev = make_agreement_evaluator(unlabeled, model=str(ws.cfg.model_path), reference=ws.model, preprocess=preprocess,
                                  exclude=calib + scored, pixel_cache=pixel_cache)
    log.info("--rank-by agreement: trials ranked by %s; the front is confirmed on the %d labeled samples of --data "
             "(calibration and labeled images left out of --unlabeled)", describe(ev), len(labeled))
    return ev
