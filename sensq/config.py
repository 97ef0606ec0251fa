"""Typed quantization config, read from xquant-style JSON (seed 002's fields and defaults) or built from the CLI.

Validated once here at the edge; everything after receives dataclasses, never raw dicts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SensqError
from .ranges import METHODS, normalize_percentile

log = logging.getLogger("sensq")

FILE_TYPES = ("img", "npy", "raw")
PRESETS = ("IMAGENET", "PT_IMAGENET")


@dataclass
class InputParams:
    """One model input (xquant calibration_parameters.input_parametres[i])."""

    input_name: str | None = None
    input_shape: list[int] | None = None
    dtype: str = "float32"
    file_type: str = "img"
    color_format: str | None = None  # None: rgb for recognised YOLO exports, else xquant's bgr
    mean_value: list[float] | None = None
    std_value: list[float] | None = None
    preprocess_file: str | None = None  # IMAGENET, PT_IMAGENET or "file.py:function"
    data_list_path: str | None = None  # list file (xquant) or, as a sensq extension, a folder
    resize: str | None = None  # sensq extension: letterbox | letterbox_topleft | resize | imagenet (None: from the model)

    def __post_init__(self):
        if self.file_type not in FILE_TYPES:
            raise SensqError(f"file_type {self.file_type} not implemented yet", f"use one of: {', '.join(FILE_TYPES)}")
        if self.dtype != "float32":
            raise SensqError(f"input dtype {self.dtype} not supported", "only float32 inputs are supported (as in xquant)")
        if self.preprocess_file == "":
            self.preprocess_file = None
        if self.preprocess_file and self.preprocess_file.upper() in PRESETS:
            self.preprocess_file = self.preprocess_file.upper()
        elif self.preprocess_file and ":" not in self.preprocess_file:
            raise SensqError(f"preprocess_file {self.preprocess_file!r} is neither a preset nor 'file.py:function'",
                             "use IMAGENET, PT_IMAGENET or 'path/to/file.py:function_name'")


@dataclass
class CustomSetting:
    """A subgraph between boundary tensors with its own precision or calibration (xquant custom_setting)."""

    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    precision_level: int | None = None  # >= 1: keep float
    calibration_type: str | None = None
    max_percentile: float | None = None
    node_names: list[str] = field(default_factory=list)  # sensq extension: exact node list (what export writes)


@dataclass
class QuantizeConfig:
    onnx_model: str = ""
    output_prefix: str | None = None
    working_dir: str | None = None
    skip_onnxsim: bool = False
    calibration_step: int = 100
    calibration_device: str = "cpu"
    calibration_type: str = "default"
    inputs: list[InputParams] = field(default_factory=list)
    analysis_enable: bool = True
    precision_level: int = 0
    finetune_level: int = 1
    max_percentile: float = 99.99  # stored as a percent; xquant's 0.9999 is converted
    custom_setting: list[CustomSetting] = field(default_factory=list)
    truncate_var_names: list[str] = field(default_factory=list)
    # sensq extensions
    target: str = "ort-cpu"
    activation_type: str | None = None
    per_channel: bool = True
    overflow_fix: str | None = None  # 7-bit weights: first_layer | all | none (None: the target's default)
    # Q/DQ placement: auto (the target's, unless its output error is far worse than inputs-only: sensq/recipe.py),
    # fused, inputs
    placement: str = "auto"
    bias_correction: str | None = None  # "fast" (passes/bias_correction.py)
    weight_range: str | None = None  # "mse" (passes/weight_clipping.py); None: min/max
    rounding: str | None = None  # "learned" (passes/learned_rounding.py); None: nearest
    rounding_budget: float = 900.0  # seconds learned rounding may take; convs it does not reach keep nearest
    equalize: str = "none"  # cross-layer equalization before calibration: none | exact (passes/equalization.py)
    float_nodes: list[str] = field(default_factory=list)
    float_op_types: list[str] = field(default_factory=list)
    auto_float_head: bool = True
    # a detector's head layers (the convs feeding the float decode): float (default) or int8 (sensq/heads.py)
    head_layers: str = "float"
    data_free: bool = False
    seed: int = 0
    cache_dir: str | None = None
    base_dir: str = "."  # the config file's folder: fallback for relative paths

    def __post_init__(self):
        if self.calibration_type not in METHODS:
            raise SensqError(f"calibration_type {self.calibration_type} not implemented yet", f"use one of: {', '.join(METHODS)}")
        self.max_percentile = normalize_percentile(float(self.max_percentile))
        if self.rounding == "nearest":
            self.rounding = None
        if self.rounding not in (None, "learned"):
            raise SensqError(f"rounding {self.rounding!r} not supported", "use nearest or learned")
        if not self.rounding_budget > 0:
            raise SensqError(f"rounding_budget {self.rounding_budget} must be positive", "give seconds, e.g. --rounding-budget 600")
        if self.head_layers not in ("float", "int8"):
            raise SensqError(f"head_layers {self.head_layers!r} not supported", "use float or int8")
        for cs in self.custom_setting:
            if cs.calibration_type and cs.calibration_type not in METHODS:
                raise SensqError(f"calibration_type {cs.calibration_type} not implemented yet (custom_setting)", f"use one of: {', '.join(METHODS)}")
        if self.placement not in ("auto", "fused", "inputs"):
            raise SensqError(f"placement {self.placement!r} not supported", "use auto, fused or inputs")
        from .passes.equalization import EQUALIZE_MODES

        if self.equalize not in EQUALIZE_MODES:
            raise SensqError(f"equalize {self.equalize!r} not supported", f"use one of: {', '.join(EQUALIZE_MODES)}")
        if self.calibration_step is None or int(self.calibration_step) < 1:
            raise SensqError(f"calibration_step {self.calibration_step} must be >= 1", "set calibration_step to the number of calibration samples to use, e.g. 100")
        self.calibration_step = int(self.calibration_step)

    def resolve(self, path: str | None) -> Path | None:
        if not path:
            return None
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists():
            return p  # xquant resolves config paths against the working directory (seed 000)
        beside = Path(self.base_dir) / p
        return beside if beside.exists() else p  # ...and sensq also against the config file's folder

    @property
    def source_path(self) -> Path:
        """The model file the user named (.onnx, or a .pt checkpoint), before any export."""
        if not self.onnx_model:
            raise SensqError("no model given", "pass --model model.onnx or set model_parameters.onnx_model in the config")
        return self.resolve(self.onnx_model)

    @property
    def model_path(self) -> Path:
        """The ONNX model; a .pt checkpoint resolves to its cached ONNX export (sensq.pt_export)."""
        path = self.source_path
        if path.suffix.lower() == ".pt":
            from .pt_export import resolve_model

            return resolve_model(path)
        return path

    @property
    def out_dir(self) -> Path:
        """working_dir, else the folder of the model the user named (for a .pt, not its export's cache folder)."""
        return self.resolve(self.working_dir) if self.working_dir else self.source_path.parent

    @property
    def prefix(self) -> str:
        """output_prefix, else the named model's name: yolov8n.onnx and yolov8n.pt both give yolov8n (not the
        export's yolov8n.<key>)."""
        if self.output_prefix:
            return self.output_prefix
        source = self.source_path
        return source.stem if source.suffix.lower() == ".pt" else source.name.removesuffix(".onnx")

    @property
    def output_model(self) -> Path:
        return self.out_dir / f"{self.prefix}.q.onnx"

    def to_xquant(self) -> dict:
        """The config back in xquant's JSON layout (plus sensq's extension keys)."""
        inputs = []
        for ip in self.inputs:
            d = {k: v for k, v in asdict(ip).items() if v is not None}
            inputs.append(d)
        cs = []
        for c in self.custom_setting:
            cs.append({k: v for k, v in asdict(c).items() if v not in (None, [], "")})
        return {
            "model_parameters": {"onnx_model": self.onnx_model, "output_prefix": self.output_prefix or self.prefix,
                                 "working_dir": self.working_dir or "", "skip_onnxsim": self.skip_onnxsim},
            "calibration_parameters": {"calibration_step": self.calibration_step, "calibration_device": self.calibration_device,
                                       "calibration_type": self.calibration_type, "input_parametres": inputs,
                                       "data_free": self.data_free, "seed": self.seed},
            "quantization_parameters": {
                "analysis_enable": self.analysis_enable, "precision_level": self.precision_level,
                "finetune_level": self.finetune_level, "max_percentile": self.max_percentile / 100.0,
                "custom_setting": cs, "truncate_var_names": self.truncate_var_names,
                "target": self.target, "activation_type": self.activation_type, "per_channel": self.per_channel,
                "overflow_fix": self.overflow_fix, "placement": self.placement,
                "bias_correction": self.bias_correction, "equalize": self.equalize, "weight_range": self.weight_range,
                "float_nodes": self.float_nodes, "float_op_types": self.float_op_types, "auto_float_head": self.auto_float_head,
                "head_layers": self.head_layers, "rounding": self.rounding, "rounding_budget": self.rounding_budget,
            },
        }


_SECTION_KEYS = {
    "model_parameters": {"onnx_model", "output_prefix", "working_dir", "skip_onnxsim"},
    "calibration_parameters": {"calibration_step", "calibration_device", "calibration_type", "input_parametres",
                               "input_parameters", "data_free", "seed"},
    "quantization_parameters": {"analysis_enable", "precision_level", "finetune_level", "max_percentile", "custom_setting",
                                "truncate_var_names", "target", "activation_type", "per_channel", "overflow_fix", "float_nodes",
                                "float_op_types", "auto_float_head", "placement", "bias_correction", "equalize", "weight_range",
                                "head_layers", "rounding", "rounding_budget"},
}


def read_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SensqError(f"config file not found: {p}", "check the path given to --config / -c")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SensqError(f"bad JSON in {p}: {e.msg} at line {e.lineno} column {e.colno}", "fix the JSON syntax (quotes, commas, brackets)") from e
    except UnicodeDecodeError as e:
        raise SensqError(f"config {p} is not UTF-8 text", "save the config as UTF-8 JSON") from e
    if not isinstance(data, dict):
        raise SensqError(f"config {p} must be a JSON object", "see examples/*.json for the layout")
    return data


def config_from_dict(data: dict, base_dir: str | Path = ".") -> QuantizeConfig:
    for section, keys in _SECTION_KEYS.items():
        sec = data.get(section, {}) or {}
        if not isinstance(sec, dict):
            raise SensqError(f"config section {section} must be an object", "see examples/*.json for the layout")
        for k in sec:
            if k not in keys:
                log.warning("config: unknown key %s.%s ignored", section, k)
    for k in data:
        if k not in _SECTION_KEYS:
            log.warning("config: unknown section %s ignored", k)
    mp = data.get("model_parameters", {}) or {}
    cp = data.get("calibration_parameters", {}) or {}
    qp = data.get("quantization_parameters", {}) or {}
    # xquant spells it "input_parametres"; accept the correct spelling too.
    raw_inputs = cp.get("input_parametres", cp.get("input_parameters", [])) or []
    if not isinstance(raw_inputs, list):
        raise SensqError("input_parametres must be a list (one entry per model input)", "wrap the entry in [ ... ]")
    inputs = []
    for i, entry in enumerate(raw_inputs):
        unknown = set(entry) - set(InputParams.__dataclass_fields__)
        for k in unknown:
            log.warning("config: unknown key input_parametres[%d].%s ignored", i, k)
        inputs.append(InputParams(**{k: v for k, v in entry.items() if k in InputParams.__dataclass_fields__}))
    custom = []
    for i, entry in enumerate(qp.get("custom_setting", []) or []):
        known = {k: v for k, v in entry.items() if k in CustomSetting.__dataclass_fields__}
        custom.append(CustomSetting(**known))
    kwargs = dict(
        onnx_model=mp.get("onnx_model", ""), output_prefix=mp.get("output_prefix") or None,
        working_dir=mp.get("working_dir") or None, skip_onnxsim=bool(mp.get("skip_onnxsim", False)),
        calibration_step=cp.get("calibration_step", 100), calibration_device=cp.get("calibration_device", "cpu"),
        calibration_type=cp.get("calibration_type", "default"), inputs=inputs,
        data_free=bool(cp.get("data_free", False)), seed=int(cp.get("seed", 0)),
        analysis_enable=bool(qp.get("analysis_enable", True)), precision_level=int(qp.get("precision_level", 0)),
        finetune_level=int(qp.get("finetune_level", 1)), max_percentile=qp.get("max_percentile", 0.9999),
        custom_setting=custom, truncate_var_names=list(qp.get("truncate_var_names", []) or []),
        target=qp.get("target", "ort-cpu"), activation_type=qp.get("activation_type"),
        per_channel=bool(qp.get("per_channel", True)), overflow_fix=qp.get("overflow_fix"),
        placement=qp.get("placement", "auto"), bias_correction=qp.get("bias_correction"),
        equalize=qp.get("equalize", "none"), weight_range=qp.get("weight_range"), float_nodes=list(qp.get("float_nodes", []) or []),
        float_op_types=list(qp.get("float_op_types", []) or []), auto_float_head=bool(qp.get("auto_float_head", True)),
        head_layers=qp.get("head_layers", "float"), rounding=qp.get("rounding"),
        rounding_budget=float(qp.get("rounding_budget", 900.0)), base_dir=str(base_dir),
    )
    return QuantizeConfig(**kwargs)


def load_config(path: str | Path) -> QuantizeConfig:
    p = Path(path)
    return config_from_dict(read_json(p), base_dir=p.parent)
