"""`sensq VERB ...`: a thin layer over the Python API (one verb per job, defaults that work on the shared data).

Every user-input problem ends as one line `sensq: error: <problem> -- <fix>` and exit code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SensqError

log = logging.getLogger("sensq")


# ---------------------------------------------------------------------------------------------- shared arguments
def add_model_args(p: argparse.ArgumentParser, calib_required: bool = False) -> None:
    g = p.add_argument_group("model and calibration")
    g.add_argument("-c", "--config", help="xquant-style JSON config (CLI options override its values)")
    g.add_argument("-m", "-i", "--model", help="float ONNX model (overrides model_parameters.onnx_model)")
    g.add_argument("--calib", nargs="+", metavar="PATH",
                   help="calibration data per model input: a folder of images/.npy/.raw files or a list file (one path per line)")
    g.add_argument("--calib-step", type=int, help="number of calibration samples (xquant calibration_step; default 100)")
    g.add_argument("--file-type", choices=["img", "npy", "raw"], help="calibration file type (default img)")
    g.add_argument("--preset", choices=["yolo", "imagenet", "pt_imagenet", "resize"],
                   help="image preprocessing: yolo = letterbox, RGB, x/255; imagenet = resize 256 + centre crop with --mean/--std; "
                        "pt_imagenet = the same with torchvision mean/std; resize = plain resize (xquant default). "
                        "Default: yolo for recognised Ultralytics exports, else imagenet")
    g.add_argument("--mean", type=float, nargs="+", help="mean_value on 0-255 pixels, one or three values")
    g.add_argument("--std", type=float, nargs="+", help="std_value on 0-255 pixels, one or three values")
    g.add_argument("--color", choices=["rgb", "bgr"], help="color_format")
    g.add_argument("--data-free", action="store_true", help="no calibration images: ranges from synthetic inputs (lower accuracy)")
    g.add_argument("--skip-simplify", action="store_true", help="do not run onnxslim first (xquant skip_onnxsim)")
    g.add_argument("--cache-dir", help="where calibration statistics are cached (default $SENSQ_CACHE or ~/.cache/sensq)")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", help="range method: default, minmax, percentile, kl, mse (xquant calibration_type)")
    q.add_argument("--percentile", type=float, help="percentile for --method percentile, e.g. 99.99 (0.9999 also accepted)")
    q.add_argument("--target", help="ort-cpu (uint8 activations, default) or tensorrt (symmetric int8)")
    q.add_argument("--activation-type", choices=["uint8", "int8"], help="override the target's activation type")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    q.add_argument("--overflow-fix", choices=["first_layer", "all", "none"],
                   help="7-bit weights against int16 saturation in ORT's x86 kernels without VNNI (default first_layer there, else none)")
    q.add_argument("--truncate", nargs="+", metavar="TENSOR", help="truncate_var_names: everything after these tensors stays float")
    q.add_argument("--float-nodes", nargs="+", metavar="NODE", help="node names kept float")
    q.add_argument("--float-op-types", nargs="+", metavar="OP", help="op types kept float (e.g. Sigmoid Mul)")
    q.add_argument("--no-auto-head", action="store_true", help="do not keep a recognised YOLO decode head float")
    q.add_argument("--seed", type=int, help="seed for data-free inputs and search (default 0)")


def build_config(args) -> "QuantizeConfig":
    from .config import InputParams, config_from_dict, load_config
    from .data import TORCH_MEAN, TORCH_STD

    cfg = load_config(args.config) if getattr(args, "config", None) else config_from_dict({})
    if getattr(args, "model", None):
        cfg.onnx_model = args.model
    calib = getattr(args, "calib", None)
    if calib:
        if cfg.inputs and len(cfg.inputs) == len(calib):
            for ip, c in zip(cfg.inputs, calib):
                ip.data_list_path = c
        else:
            cfg.inputs = [InputParams(data_list_path=c) for c in calib]
    for ip in cfg.inputs or []:
        if getattr(args, "file_type", None):
            ip.file_type = args.file_type
        preset = getattr(args, "preset", None)
        if preset == "yolo":
            ip.resize, ip.color_format = "letterbox", ip.color_format or "rgb"
            ip.mean_value = ip.mean_value or [0.0] * 3
            ip.std_value = ip.std_value or [255.0] * 3
        elif preset == "imagenet":
            ip.preprocess_file, ip.color_format = "IMAGENET", ip.color_format or "rgb"
            ip.mean_value = ip.mean_value or TORCH_MEAN
            ip.std_value = ip.std_value or TORCH_STD
        elif preset == "pt_imagenet":
            ip.preprocess_file = "PT_IMAGENET"
        elif preset == "resize":
            ip.resize = "resize"
        if getattr(args, "mean", None):
            ip.mean_value = args.mean
        if getattr(args, "std", None):
            ip.std_value = args.std
        if getattr(args, "color", None):
            ip.color_format = args.color
    simple = {"calib_step": "calibration_step", "method": "calibration_type", "target": "target",
              "activation_type": "activation_type", "cache_dir": "cache_dir", "seed": "seed", "overflow_fix": "overflow_fix"}
    for arg, field_name in simple.items():
        v = getattr(args, arg, None)
        if v is not None:
            setattr(cfg, field_name, v)
    if getattr(args, "percentile", None) is not None:
        from .ranges import normalize_percentile

        cfg.max_percentile = normalize_percentile(args.percentile)
        if getattr(args, "method", None) is None and not getattr(args, "config", None):
            cfg.calibration_type = "percentile"
    if getattr(args, "per_tensor", False):
        cfg.per_channel = False
    if getattr(args, "truncate", None):
        cfg.truncate_var_names = args.truncate
    if getattr(args, "float_nodes", None):
        cfg.float_nodes = args.float_nodes
    if getattr(args, "float_op_types", None):
        cfg.float_op_types = args.float_op_types
    if getattr(args, "no_auto_head", False):
        cfg.auto_float_head = False
    if getattr(args, "data_free", False):
        cfg.data_free = True
    if getattr(args, "skip_simplify", False):
        cfg.skip_onnxsim = True
    cfg.__post_init__()  # re-validate after CLI overrides
    if not cfg.inputs and not cfg.data_free:
        raise SensqError("no calibration data given", "pass --calib <image folder or list file>, a config with data_list_path, or --data-free")
    return cfg


def apply_default_preprocessing(cfg, model_path: Path) -> None:
    """When neither the config nor --preset chose a preprocessing, pick one from the model (YOLO or classifier)."""
    from .config import InputParams
    from .data import TORCH_MEAN, TORCH_STD
    from .model import Graph, detect_yolo_head, load_model

    model = load_model(model_path)
    yolo = detect_yolo_head(Graph(model)) is not None
    if cfg.data_free and not cfg.inputs:
        cfg.inputs = [InputParams()]
    for ip in cfg.inputs:
        explicit = ip.preprocess_file or ip.resize or ip.mean_value is not None or ip.std_value is not None
        if explicit or ip.file_type != "img" or yolo:
            continue
        # A classifier without preprocessing settings: the ImageNet crop with torchvision statistics.
        ip.preprocess_file, ip.color_format = "IMAGENET", ip.color_format or "rgb"
        ip.mean_value, ip.std_value = TORCH_MEAN, TORCH_STD


# ---------------------------------------------------------------------------------------------------- commands
def cmd_quantize(args) -> int:
    from .quantize import quantize

    cfg = build_config(args)
    if args.no_analysis:
        cfg.analysis_enable = False
    apply_default_preprocessing(cfg, cfg.model_path)
    result = quantize(cfg, output=args.output, progress=not args.quiet)
    print(f"wrote {result.output}")
    for reason, nodes in result.float_reasons.items():
        print(f"  kept float ({len(nodes)} nodes): {reason}")
    cal = "from cache" if result.stats_cached else f"{result.calibration_seconds:.1f} s"
    print(f"  calibration statistics: {cal}; QDQ build {result.build_seconds:.2f} s")
    for kind, path in result.reports.items():
        print(f"  report ({kind}): {path}")
    return 0


def cmd_analyze(args) -> int:
    from .analysis import cumulative_report, isolated_report
    from .quantize import prepare

    cfg = build_config(args)
    apply_default_preprocessing(cfg, cfg.model_path)
    ws = prepare(cfg, progress=not args.quiet)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / cfg.prefix
    paths = {}
    if args.view in ("cumulative", "both"):
        paths.update({f"cumulative {k}": v for k, v in cumulative_report(ws, prefix, n_samples=args.samples, progress=not args.quiet).items()})
    if args.view in ("isolated", "both"):
        iso, seconds = isolated_report(ws, prefix, n_samples=args.samples, by=args.unit, depth=args.depth, progress=not args.quiet)
        paths.update({f"isolated {k}": v for k, v in iso.items()})
        print(f"isolated analysis: {seconds:.1f} s")
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", help="evaluation data: a COCO folder (annotations/ + val2017/), a YOLO data.yaml folder, "
                                  "or an image folder for classification")
    g.add_argument("--labels", help="classification label file (file -> class index or synset); relative to --data")
    g.add_argument("--task", default="auto", help="evaluator: auto, coco, yolo, imagenet, path/to/file.py:function, or an entry-point name")
    g.add_argument("--skip", type=int, help="classification: skip the first N files by name (e.g. the calibration images)")
    g.add_argument("--limit", type=int, help="evaluate only the first N samples (fixed order)")


def make_evaluator_from_args(args, model_path):
    from .evaluators import make_evaluator

    options = {}
    if getattr(args, "skip", None) is not None:
        options["skip"] = args.skip
    if getattr(args, "mean", None) and args.task in ("auto", "imagenet"):
        options["mean"] = args.mean
    if getattr(args, "std", None) and args.task in ("auto", "imagenet"):
        options["std"] = args.std
    return make_evaluator(args.data, kind=args.task, model=str(model_path), labels=args.labels, **options)


def fill_defaults(args) -> None:
    """`sensq search --model m.onnx`: find calibration and evaluation data from defaults (see sensq.datasets)."""
    if args.data and (args.calib or args.config or args.data_free):
        return
    from .datasets import default_data
    from .model import Graph, detect_yolo_head, load_model

    if not args.model and not args.config:
        raise SensqError("no model given", "pass --model model.onnx or --config cfg.json")
    model_path = args.model or None
    if model_path is None:
        from .config import load_config

        model_path = load_config(args.config).model_path
    kind = "detection" if detect_yolo_head(Graph(load_model(model_path))) else "classification"
    calib, data = default_data(kind)
    if not args.calib and not args.config and not args.data_free:
        args.calib = [str(calib)]
        log.info("calibration data: %s (default)", calib)
    if not args.data:
        args.data = str(data)
        log.info("evaluation data: %s (default)", data)
    if kind == "classification" and not args.labels:
        tsv = Path(data) / "images_labels.tsv"
        if tsv.is_file():
            args.labels = str(tsv)
            if args.skip is None and not args.calib_step:
                args.skip = 100


def cmd_eval(args) -> int:

    from .model import load_model

    load_model(args.model)  # clear error for a missing/corrupt model before any data work
    if not args.data:
        raise SensqError("no evaluation data given", "pass --data <COCO folder | data.yaml folder | image folder>")
    evaluator = make_evaluator_from_args(args, args.model)
    res = evaluator.evaluate(args.model, limit=args.limit, progress=not args.quiet)
    for k, v in res.metrics.items():
        print(f"{k}: {v:.4f}")
    print(f"samples: {res.n_samples}; {res.seconds:.1f} s ({res.inference_seconds:.1f} s inference)")
    if args.json:
        json_dump(res.to_dict(), Path(args.json))
        print(f"wrote {args.json}")
    return 0


def workspace_and_evaluator(args):
    """What sensitivity and search both start from: data found, config built, statistics ready, evaluator made."""
    from .quantize import prepare

    fill_defaults(args)
    cfg = build_config(args)
    apply_default_preprocessing(cfg, cfg.model_path)
    ws = prepare(cfg, progress=not args.quiet)
    return cfg, ws, make_evaluator_from_args(args, cfg.model_path)


def cmd_sensitivity(args) -> int:
    from .sensitivity import run_sensitivity, summary, write_report

    cfg, ws, evaluator = workspace_and_evaluator(args)
    out = Path(args.output)
    res = run_sensitivity(ws, evaluator, limit=args.limit, depth=args.depth, by=args.unit,
                          progress=not args.quiet, cache=out / "cache")
    print(summary(res, args.top_k))
    for k, v in write_report(res, out, args.top_k).items():
        print(f"{k}: {v}")
    return 0


def cmd_search(args) -> int:
    from .search import SearchSettings, run_search

    if args.budget < 1:
        raise SensqError(f"--budget {args.budget} must be >= 1", "give the number of trials, e.g. --budget 50")
    cfg, ws, evaluator = workspace_and_evaluator(args)
    workdir = Path(args.workdir or f"runs/{cfg.prefix}")
    settings = SearchSettings(budget=args.budget, workdir=str(workdir), storage=args.storage, study_name=args.study_name,
                              seed=cfg.seed, space=args.space, latency=args.latency, low_fidelity=args.low_fidelity,
                              sensitivity_limit=args.sensitivity_limit, max_drop=args.max_drop, depth=args.depth,
                              group_by=args.unit, top_k=args.top_k)
    res = run_search(ws, evaluator, settings, progress=not args.quiet)
    print(f"search finished in {res.seconds / 60:.1f} min")
    return 0


def cmd_export(args) -> int:
    from .export import export_trial

    out = args.output or f"{Path(args.workdir).name}.trial{args.trial if args.trial is not None else 'best'}." + \
        {"onnx": "q.onnx", "xquant": "xquant.json", "ort-exclude": "ort_exclude.json"}[args.format]
    info = export_trial(args.workdir, args.trial, out, args.format, progress=not args.quiet)
    print(f"wrote {info['output']} (trial {info['trial']}: metric {info['metric']:.4f}, {info['latency_ms']:.2f} ms in the study)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sensq", description="Sensitivity-guided INT8 quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"sensq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quantize", help="INT8 QDQ model from a float model and calibration data", parents=[common],
                       description="Quantize an ONNX model to INT8 QDQ (runs in ONNX Runtime). Accepts xquant JSON configs.")
    add_model_args(p)
    p.add_argument("-o", "--output", help="output .q.onnx (default <working_dir>/<output_prefix>.q.onnx)")
    p.add_argument("--no-analysis", action="store_true", help="skip the per-layer report (xquant analysis_enable)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("analyze", help="per-layer error report (cumulative and isolated)", parents=[common],
                       description="Per-layer quantization error of the default INT8 model: markdown, CSV and PNG.")
    add_model_args(p)
    p.add_argument("-o", "--output", default="reports", help="output folder (default reports/)")
    p.add_argument("--view", choices=["cumulative", "isolated", "both"], default="both")
    p.add_argument("--unit", choices=["node", "group"], default="node", help="isolated view: one compute node or one module group at a time")
    p.add_argument("--depth", type=int, default=1, help="group depth for --unit group (model.24 = 1)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples used for the analysis (default 8)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("eval", help="task metric of a model (COCO mAP, ImageNet top-1/top-5, plugins)", parents=[common],
                       description="Score an ONNX model (float or QDQ) on COCO / YOLO-layout / ImageNet-style data.")
    p.add_argument("-m", "--model", required=True, help="ONNX model to score")
    add_eval_args(p)
    p.add_argument("--mean", type=float, nargs="+", help="classification: mean on 0-255 pixels")
    p.add_argument("--std", type=float, nargs="+", help="classification: std on 0-255 pixels")
    p.add_argument("--json", help="write the metrics (and the 12 COCO stats) to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sensitivity", help="leave-one-out layer-group sensitivity (top-k summary, CSV/MD/PNG)", parents=[common],
                       description="Keep one layer group float at a time on the default INT8 model; rank groups by task metric.")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--top-k", type=int, default=10, help="lines in the summary (default 10)")
    p.add_argument("--unit", choices=["group", "node"], default="group", help="group by module prefix (default) or single nodes")
    p.add_argument("--depth", type=int, default=1, help="module prefix depth (model.24 = 1)")
    p.add_argument("-o", "--output", default="reports", help="output folder (default reports/)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("search", help="Optuna mixed-precision search: latency/accuracy Pareto front", parents=[common],
                       description="Search float/INT8 layer groups and calibration settings; writes pareto.{png,md,csv,json}. "
                                   "Rerunning the same command resumes the study; --budget counts all finished trials.")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--budget", type=int, default=50, help="number of trials (total, including earlier runs of the study)")
    p.add_argument("--workdir", help="run directory (default runs/<model name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<workdir>/study.db; postgresql://... for several workers)")
    p.add_argument("--study-name", help="Optuna study name (default derived from model, data and settings)")
    p.add_argument("--space", default="default", help="search space: a name in sensq/search_spaces or a YAML file")
    p.add_argument("--latency", default="ort", help="latency backend: ort, bops, 'cmd:<command with {model}>', table:<file.csv>")
    p.add_argument("--low-fidelity", type=int, help="samples for first-stage scoring (default a third of the data, >= 32)")
    p.add_argument("--sensitivity-limit", type=int, help="samples per sensitivity run (default = --low-fidelity)")
    p.add_argument("--max-drop", type=float, help="constraint: metric drop vs FP32 at most this (e.g. 0.005)")
    p.add_argument("--top-k", type=int, help="number of most sensitive groups the search toggles (default from the space: 12)")
    p.add_argument("--unit", choices=["group", "node"], default="group", help="toggle module groups (default) or single nodes")
    p.add_argument("--depth", type=int, default=1, help="module prefix depth (model.24 = 1)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export a search trial as .q.onnx, xquant config or ORT exclude list", parents=[common],
                       description="Export a trial of a finished (or interrupted) search.")
    p.add_argument("--workdir", required=True, help="the search's run directory")
    p.add_argument("--trial", type=int, help="trial number (see pareto.md); default: the front's best-metric trial")
    p.add_argument("-o", "--output", help="output file")
    p.add_argument("--format", choices=["onnx", "xquant", "ort-exclude"], default="onnx")
    p.set_defaults(func=cmd_export)

    return parser


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sensq: %(message)s"))
    root = logging.getLogger("sensq")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except SensqError as e:
        print(f"sensq: error: {e.problem}" + (f" -- {e.fix}" if e.fix else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sensq: interrupted; finished work (cached statistics, completed trials) is kept", file=sys.stderr)
        return 130


def json_dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
