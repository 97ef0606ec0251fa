"""sensq: sensitivity-guided INT8 quantization for ONNX models.

Python API (mirrors the CLI verbs):
    from sensq import load_config, quantize, prepare
    cfg = load_config("examples/yolov5n_coco.json")
    result = quantize(cfg)
"""
__version__ = "0.1.0"

from .config import InputParams, QuantizeConfig, config_from_dict, load_config  # noqa: E402
from .errors import SensqError  # noqa: E402
from .plan import PrecisionPlan  # noqa: E402
from .quantize import prepare, quantize  # noqa: E402

__all__ = ["InputParams", "QuantizeConfig", "config_from_dict", "load_config", "SensqError", "PrecisionPlan", "prepare", "quantize"]
