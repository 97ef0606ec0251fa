"""Latency backends: swappable ways to put a cost on a (QDQ) ONNX model, chosen by a string on the command line.

    make_latency_backend("ort")                      ONNX Runtime CPU wall time, unit ms
    make_latency_backend("ort:threads=2,warmup=3")   options may follow the name as key=value pairs
    make_latency_backend("bops")                     analytic cost sum(MACs x weight bits x activation bits), unit GBOPs
    make_latency_backend('cmd:"trtexec --onnx={model}"')  a user command that prints the latency, unit ms (or unit=)
    make_latency_backend("table:layers.csv")         per-layer float/int8 costs measured on the target, unit ms
    make_latency_backend("openvino")                 OpenVINO CPU wall time, unit ms (optional extra `openvino`)

One module per backend behind one protocol (base.LatencyBackend); `paired.measure_paired` times a model against
its FP32 reference in alternating rounds (the search's latency axis is that ratio, with its interval).
Whether a layer runs in int8 is read from the QDQ graph itself (graph.quantized_nodes), so bops and table agree
with what onnxruntime.quantization actually wrote.
"""
from __future__ import annotations

from . import bops as _bops  # noqa: F401  (registers the backends)
from . import command as _command  # noqa: F401
from . import openvino as _openvino  # noqa: F401  (importable without the openvino package)
from . import ort as _ort  # noqa: F401
from . import table as _table  # noqa: F401
from .base import (LatencyBackend, LatencyResult, ModelLike, Timer, available_latency_backends, iqr,
                   make_latency_backend, median_ci, register_latency_backend)
from .bops import BopsLatency
from .command import CommandLatency, parse_latency_ms
from .fusion import fusion_report, optimized_graph
from .graph import COMPUTE_OPS, LayerCost, bops, layer_costs, macs_per_node, node_key, quantized_nodes, structure_key
from .machine import evaluation_lock, has_vnni, machine_id, machine_info, measurement_lock
from .openvino import OpenVinoLatency, measure_in_blocks
from .ort import OrtLatency, random_inputs
from .paired import PairedLatency, Reference, measure_paired, measure_together
from .table import TableLatency

__all__ = ["LatencyBackend", "LatencyResult", "ModelLike", "Timer", "available_latency_backends", "iqr",
           "make_latency_backend", "median_ci", "register_latency_backend", "BopsLatency", "CommandLatency",
           "parse_latency_ms", "COMPUTE_OPS", "LayerCost", "bops", "layer_costs", "macs_per_node", "node_key",
           "quantized_nodes", "structure_key", "has_vnni", "machine_id", "machine_info", "measurement_lock",
           "evaluation_lock",
           "OrtLatency", "random_inputs", "OpenVinoLatency", "measure_in_blocks",
           "fusion_report", "optimized_graph", "PairedLatency", "Reference", "measure_paired", "measure_together", "TableLatency"]
