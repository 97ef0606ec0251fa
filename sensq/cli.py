"""`sensq VERB ...`: parses arguments and calls the Python API (defaults live in sensq.defaults, not here).

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
def add_model_args(p: argparse.ArgumentParser) -> None:
    from .defaults import PRESETS

    g = p.add_argument_group("model and calibration")
    g.add_argument("-c", "--config", help="xquant-style JSON config (CLI options override its values)")
    g.add_argument("-m", "-i", "--model", help="float ONNX model (or an Ultralytics .pt; overrides model_parameters.onnx_model)")
    g.add_argument("--calib", nargs="+", metavar="PATH",
                   help="calibration data per model input: a folder of images/.npy/.raw files or a list file (one path per line)")
    g.add_argument("--calib-step", type=int, help="number of calibration samples (xquant calibration_step; default 100)")
    g.add_argument("--file-type", choices=["img", "npy", "raw"], help="calibration file type (default img)")
    g.add_argument("--preset", choices=PRESETS,
                   help="image preprocessing: yolo = letterbox, RGB, x/255; yolox = top-left letterbox, BGR, 0-255; imagenet = resize 256 + centre crop with --mean/--std; "
                        "pt_imagenet = the same with torchvision mean/std; resize = plain resize (xquant default). "
                        "Default: recognised from the detector's export (checked on a few calibration images), else the ImageNet crop with the model's own normalization")
    g.add_argument("--mean", type=float, nargs="+", help="mean_value on 0-255 pixels, one or three values")
    g.add_argument("--std", type=float, nargs="+", help="std_value on 0-255 pixels, one or three values")
    g.add_argument("--color", choices=["rgb", "bgr"], help="color_format")
    g.add_argument("--data-free", action="store_true", help="no calibration images: ranges from synthetic inputs (lower accuracy)")
    g.add_argument("--skip-simplify", action="store_true", help="do not run onnxslim first (xquant skip_onnxsim)")
    g.add_argument("--cache-dir", help="where calibration statistics and per-sample results are cached "
                                       "(default $SENSQ_CACHE or ~/.cache/sensq; may be shared between workers)")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", help="range method: default, minmax, percentile, kl, mse (xquant calibration_type)")
    q.add_argument("--percentile", type=float, help="percentile for --method percentile, e.g. 99.99 (0.9999 also accepted)")
    q.add_argument("--target", help="deployment target: ort-cpu (default), openvino-cpu, tensorrt (aliases trt, openvino); "
                                    "sets activation type, INT8 op set, overflow fix and the default --latency")
    q.add_argument("--activation-type", choices=["uint8", "int8", "uint16", "int16"],
                   help="override the target's activation type; 16-bit (A16W8) raises the model to ONNX opset 21")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    q.add_argument("--overflow-fix", choices=["first_layer", "all", "none"],
                   help="7-bit weights against int16 saturation in ORT's x86 kernels without VNNI (default first_layer there, else none)")
    q.add_argument("--placement", choices=["auto", "fused", "inputs"],
                   help="where Q/DQ go: fused = the target's (ORT: every op, so QLinear kernels fuse); inputs = compute-layer "
                        "inputs only, depthwise inputs per channel (NNCF's placement; on ORT the convs then run in float); "
                        "auto (default) = fused unless its output error on calibration images is far worse than inputs'")
    q.add_argument("--bias-correction", choices=["fast", "none"],
                   help="fast: each conv's bias absorbs the mean output shift its weight rounding causes on the "
                        "calibration inputs (Nagel et al. 2019; NNCF's default). Default none (see docs/benchmarks.md)")
    q.add_argument("--weight-range", choices=["minmax", "mse"],
                   help="conv weight scales: minmax (onnxruntime's, default) or mse (per-channel clipping ratio with "
                        "the smallest squared weight error)")
    q.add_argument("--rounding", choices=["nearest", "learned"],
                   help="conv weight rounding: nearest (default) or learned = weights and bias fitted, stage by stage, "
                        "to reproduce the FP32 conv outputs from the quantized model's own inputs on calibration images "
                        "(GPTQ-style, no labels; minutes, cached; see docs/benchmarks.md)")
    q.add_argument("--rounding-budget", type=float, metavar="SECONDS",
                   help="time learned rounding may take (default 900); convs it does not reach keep nearest rounding")
    q.add_argument("--equalize", choices=["none", "exact"],
                   help="cross-layer equalization before calibration (Nagel et al. 2019): exact = conv pairs joined by "
                        "ReLU or nothing (the float model's function is unchanged; SiLU / ReLU6 pairs are left alone). Default none (see docs/benchmarks.md)")
    q.add_argument("--truncate", nargs="+", metavar="TENSOR", help="truncate_var_names: everything after these tensors stays float")
    q.add_argument("--float-nodes", nargs="+", metavar="NODE", help="node names kept float")
    q.add_argument("--float-op-types", nargs="+", metavar="OP", help="op types kept float (e.g. Sigmoid Mul)")
    q.add_argument("--no-auto-head", action="store_true", help="do not keep a recognised detector decode head float")
    q.add_argument("--head-layers", choices=["float", "int8"],
                   help="a recognised detector's head layers (the convs feeding its float decode): float (default: their "
                        "outputs mix box offsets and class logits under one INT8 scale) or int8 (faster, less accurate)")
    q.add_argument("--seed", type=int, help="seed for data-free inputs, splits and search (default 0)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", help="evaluation data: a COCO folder (annotations/ + val2017/), a YOLO data.yaml folder, "
                                  "or an image folder for classification")
    g.add_argument("--labels", help="classification label file (file -> class index or synset); relative to --data")
    g.add_argument("--task", default="auto", help="evaluator: auto, coco, yolo, imagenet, agreement (label-free: against the FP32 model's outputs; "
                   "auto picks it for a folder of images without annotations), path/to/file.py:function, or an entry-point name")
    g.add_argument("--skip", type=int, help="classification: skip the first N files by name (default: the calibration images)")
    g.add_argument("--limit", type=int, help="evaluate only the first N samples of the evaluation set")
    g.add_argument("--allow-calib-on-eval", action="store_true",
                   help="allow calibrating on the evaluation images (by default sensq keeps them apart)")


def options(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet")}


# ---------------------------------------------------------------------------------------------------- commands
def cmd_quantize(args) -> int:
    from .defaults import build_config
    from .quantize import quantize

    cfg = build_config(**options(args))
    if args.no_analysis:
        cfg.analysis_enable = False
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
    from .defaults import build_config
    from .quantize import prepare

    cfg = build_config(**options(args))
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


def cmd_eval(args) -> int:
    from .defaults import evaluator_for
    from .model import load_model

    load_model(args.model)  # clear error for a missing/corrupt model before any data work
    evaluator = evaluator_for(**options(args))
    model = args.model
    if getattr(args, "target", None):  # scored by the runtime the target deploys on
        from .runtime import scoring_runtime
        from .targets import get_target

        scored_by, factory = scoring_runtime(get_target(args.target).name)
        model = factory(args.model) if factory else model
        print(f"scored by {scored_by}")
    res = evaluator.evaluate(model, limit=args.limit, progress=not args.quiet)
    for k, v in res.metrics.items():
        print(f"{k}: {v:.4f}")
    print(f"samples: {res.n_samples}; {res.seconds:.1f} s ({res.inference_seconds:.1f} s inference)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res.to_dict(), indent=2, default=str), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def cmd_sensitivity(args) -> int:
    from .defaults import setup
    from .sensitivity import run_sensitivity, summary, write_report

    cfg, ws, evaluator = setup(progress=not args.quiet, **options(args))
    out = Path(args.output)
    res = run_sensitivity(ws, evaluator, limit=args.limit, depth=args.depth, by=args.unit, progress=not args.quiet,
                          cache=out / "cache", budget_seconds=args.sensitivity_budget)
    print(summary(res, args.top_k))
    for k, v in write_report(res, out, args.top_k).items():
        print(f"{k}: {v}")
    return 0


def cmd_search(args) -> int:
    from .defaults import setup
    from .search import SearchSettings, run_search

    if args.budget < 1:
        raise SensqError(f"--budget {args.budget} must be >= 1", "give the number of plans to evaluate, e.g. --budget 50")
    if args.unlabeled and args.rank_by != "agreement":
        raise SensqError("--unlabeled is read only with --rank-by agreement",
                         "add --rank-by agreement (rank plans label-free on those images, confirm on --data)")
    cfg, ws, evaluator = setup(progress=not args.quiet, **options(args))
    confirm_evaluator = None
    if args.rank_by == "agreement":
        from .defaults import ranking_evaluator

        confirm_evaluator, evaluator = evaluator, ranking_evaluator(ws, evaluator, args.unlabeled, cfg.cache_dir)
    settings = SearchSettings(budget=args.budget, workdir=str(args.workdir or f"runs/{cfg.prefix}"), storage=args.storage,
                              study_name=args.study_name, seed=cfg.seed, space=args.space, latency=args.latency,
                              strategy=args.strategy, low_fidelity=args.low_fidelity, confirm=args.confirm,
                              limit=args.limit, sensitivity_budget=args.sensitivity_budget, max_drop=args.max_drop,
                              latency_confirm=args.latency_confirm, depth=args.depth, group_by=args.unit,
                              top_k=args.top_k, worker=args.worker)
    res = run_search(ws, evaluator, settings, progress=not args.quiet, confirm_evaluator=confirm_evaluator)
    print(f"search finished in {res.seconds / 60:.1f} min")
    return 0


def cmd_export(args) -> int:
    from .export import SUFFIXES, export_trial

    out = args.output or f"{Path(args.workdir).name}.trial{args.trial if args.trial is not None else 'best'}{SUFFIXES[args.format]}"
    info = export_trial(args.workdir, args.trial, out, args.format, progress=not args.quiet, force=args.force)
    print(f"wrote {info['output']} ({info['summary']})")
    for f in info.get("files", [])[1:]:
        print(f"  and {f}")
    if info.get("consumer"):
        print(f"  for {info['consumer']}")
    for note in info.get("notes", []):
        print(f"  {note}")
    return 0


def _confirm(value: str):
    return value if value == "auto" else float(value)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sensq", description="Sensitivity-guided INT8 quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"sensq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_quantize_parser, _analyze_parser, _eval_parser, _sensitivity_parser, _search_parser, _export_parser):
        add(sub, common)
    return parser


def _quantize_parser(sub, common) -> None:
    p = sub.add_parser("quantize", help="INT8 QDQ model from a float model and calibration data", parents=[common],
                       description="Quantize an ONNX model to INT8 QDQ (runs in ONNX Runtime). Accepts xquant JSON configs.")
    add_model_args(p)
    p.add_argument("-o", "--output", help="output .q.onnx (default <working_dir>/<output_prefix>.q.onnx)")
    p.add_argument("--no-analysis", action="store_true", help="skip the per-layer report (xquant analysis_enable)")
    p.set_defaults(func=cmd_quantize)


def _analyze_parser(sub, common) -> None:
    p = sub.add_parser("analyze", help="per-layer error report (cumulative and isolated)", parents=[common],
                       description="Per-layer quantization error of the default INT8 model: markdown, CSV and PNG.")
    add_model_args(p)
    p.add_argument("-o", "--output", default="reports", help="output folder (default reports/)")
    p.add_argument("--view", choices=["cumulative", "isolated", "both"], default="both")
    p.add_argument("--unit", choices=["node", "group"], default="node", help="isolated view: one compute node or one layer group at a time")
    p.add_argument("--depth", type=int, default=1, help="group depth for --unit group (model.24 = 1)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples used for the analysis (default 8)")
    p.set_defaults(func=cmd_analyze)


def _eval_parser(sub, common) -> None:
    p = sub.add_parser("eval", help="task metric of a model (COCO mAP, ImageNet top-1/top-5, plugins)", parents=[common],
                       description="Score an ONNX model (float or QDQ) on COCO / YOLO-layout / ImageNet-style data.")
    p.add_argument("-m", "--model", required=True, help="ONNX model to score")
    add_eval_args(p)
    p.add_argument("--preset", choices=["yolo", "yolox", "resize"],
                   help="detection preprocessing (default: recognised from the model's export)")
    p.add_argument("--color", choices=["rgb", "bgr"], help="detection: colour order of the model input")
    p.add_argument("--mean", type=float, nargs="+", help="mean on 0-255 pixels")
    p.add_argument("--std", type=float, nargs="+", help="std on 0-255 pixels")
    p.add_argument("--json", help="write the metrics (and the 12 COCO stats) to this JSON file")
    p.add_argument("--target", help="score on the runtime this target deploys on: ort-cpu (default, ONNX Runtime) or "
                                    "openvino-cpu (OpenVINO CPU, f32 inference precision)")
    p.set_defaults(func=cmd_eval)


GROUPINGS = ["auto", "module", "structure", "node"]


def _sensitivity_parser(sub, common) -> None:
    from .sensitivity import DEFAULT_BUDGET_SECONDS

    p = sub.add_parser("sensitivity", help="layer-group sensitivity (proxy for all groups, task metric within a budget)",
                       parents=[common], description="Rank layer groups: the proxy (isolated SNR) for every group, the "
                       "leave-one-out task metric for the worst ones within --sensitivity-budget seconds.")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--top-k", type=int, default=10, help="lines in the summary (default 10)")
    p.add_argument("--unit", choices=GROUPINGS, default="auto",
                   help="groups: module prefixes when node names carry them, else graph structure (auto); or single nodes")
    p.add_argument("--depth", type=int, default=1, help="module prefix depth (model.24 = 1)")
    p.add_argument("--sensitivity-budget", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help=f"seconds for task-metric runs (default {DEFAULT_BUDGET_SECONDS:.0f}); groups beyond it are ranked by the proxy")
    p.add_argument("-o", "--output", default="reports", help="output folder (default reports/)")
    p.set_defaults(func=cmd_sensitivity)


def _search_parser(sub, common) -> None:
    from .search.latency_confirm import LATENCY_CONFIRM_SECONDS
    from .sensitivity import DEFAULT_BUDGET_SECONDS

    p = sub.add_parser("search", help="mixed-precision search: latency/accuracy Pareto front with intervals", parents=[common],
                       description="Search float/INT8 layer groups and calibration settings; writes pareto.{png,md,csv,json} "
                                   "and trials.csv. Rerunning the same command resumes the study.")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--budget", type=int, default=50, help="distinct plans to evaluate (the study's total; repeats are not counted)")
    p.add_argument("--workdir", help="run directory (default runs/<model name>)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<workdir>/study.db; postgresql://... for several workers)")
    p.add_argument("--study-name", help="Optuna study name (default derived from model, data and settings)")
    p.add_argument("--worker", type=int, default=0, help="worker id when several processes share one study (sampler seed = --seed + id)")
    p.add_argument("--space", default="default", help="search space: a name in sensq/search_spaces or a YAML file")
    p.add_argument("--strategy", choices=["tpe", "random", "greedy"], default="tpe",
                   help="tpe (default; warm-started from the sensitivity pass), random (Optuna RandomSampler) or greedy "
                        "(add float groups one at a time in sensitivity order)")
    p.add_argument("--latency", help="latency backend: ort, openvino, bops, 'cmd:<command with {model}>', table:<file.csv> "
                                     "(default: the target's)")
    p.add_argument("--confirm", type=_confirm, default="auto",
                   help="held-out part of the evaluation set re-scoring the front at the end: a fraction, a count, 0 (off) "
                        "or auto (half, up to 1000 samples, when the set has >= 400 samples)")
    p.add_argument("--low-fidelity", type=int, help="search samples of the first stage (default a third of the search split, >= 32)")
    p.add_argument("--sensitivity-budget", type=float, default=DEFAULT_BUDGET_SECONDS,
                   help=f"seconds for leave-one-out task-metric runs before the search (default {DEFAULT_BUDGET_SECONDS:.0f})")
    p.add_argument("--max-drop", type=float, default=0.005,
                   help="recommended point: the fastest on the front within this of FP32 on the search split (default 0.005)")
    p.add_argument("--rank-by", choices=["metric", "agreement"], default="metric",
                   help="what trials are scored by: the --data metric (default), or agreement with FP32 on --unlabeled "
                        "images (label-free, more images, narrower intervals); with agreement the front is confirmed on "
                        "all of --data's labeled samples")
    p.add_argument("--unlabeled", metavar="DIR", help="images for --rank-by agreement (calibration and --data images "
                                                     "are left out), e.g. the calibration pool")
    p.add_argument("--latency-confirm", type=float, default=LATENCY_CONFIRM_SECONDS, metavar="SECONDS",
                   help="after the trials, re-time the plans that may be on the front together with FP32 and all-INT8 "
                        f"in one interleaved session and build the front from those ratios (default {LATENCY_CONFIRM_SECONDS:.0f} s; 0: off)")
    p.add_argument("--top-k", type=int, help="number of most sensitive groups the search toggles (default from the space: 12)")
    p.add_argument("--unit", choices=GROUPINGS, default="auto", help="layer groups the search toggles (see sensq sensitivity)")
    p.add_argument("--depth", type=int, default=1, help="module prefix depth (model.24 = 1)")
    p.set_defaults(func=cmd_search)


def _export_parser(sub, common) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="export a search trial for a runtime or toolchain", parents=[common],
                       description="Export a trial of a finished (or interrupted) search.")
    p.add_argument("--workdir", required=True, help="the search's run directory")
    p.add_argument("--trial", type=int, help="trial number (see pareto.md); default: the recommended trial")
    p.add_argument("-o", "--output", help="output file")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--force", action="store_true",
                   help="write the rebuilt model even when its hash differs from the one the search scored")
    p.set_defaults(func=cmd_export)


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
        print("sensq: interrupted; finished work (cached statistics, completed trials, reports) is kept", file=sys.stderr)
        return 130
