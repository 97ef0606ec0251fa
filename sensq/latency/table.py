"""Per-layer costs measured on the target device, summed over the model: int8 cost where the QDQ graph quantizes a node."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SensqError
from .base import LatencyResult, ModelLike, construct, load_model, register_latency_backend
from .graph import FREE_OPS, node_key, quantized_nodes



@dataclass
class _TableRow:
    float_ms: float
    int8_ms: float
    op_type: str | None


def _read_latency_table(path: Path) -> dict[str, _TableRow]:
    fix = "give a CSV with header node,float_ms,int8_ms (optionally op_type), one row per node of the float model"
    if not path.is_file():
        raise SensqError(f"latency table not found: {path}", fix)
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
        missing = [c for c in ("node", "float_ms", "int8_ms") if c not in header]
        if missing:
            raise SensqError(f"latency table {path} lacks column(s) {', '.join(missing)}", fix)
        rows: dict[str, _TableRow] = {}
        for line_no, row in enumerate(reader, start=2):
            node = (row.get(header["node"]) or "").strip()
            if not node:
                continue
            if node in rows:
                raise SensqError(f"latency table {path} lists node {node!r} twice (line {line_no})", "keep one row per node")
            try:
                float_ms, int8_ms = (float((row.get(header[c]) or "").strip()) for c in ("float_ms", "int8_ms"))
            except ValueError:
                raise SensqError(f"latency table {path} line {line_no}: float_ms/int8_ms of {node!r} are not numbers",
                                 "write plain numbers in milliseconds, e.g. 0.42") from None
            op_type = None
            if "op_type" in header:
                op_type = (row.get(header["op_type"]) or "").strip() or None
            rows[node] = _TableRow(float_ms, int8_ms, op_type)
    if not rows:
        raise SensqError(f"latency table {path} has no rows", fix)
    return rows


@register_latency_backend("table")
class TableLatency:
    """Sum of per-layer target costs: int8_ms for nodes quantized in this model (see quantized_nodes), float_ms for
    the others. A row's `node` is a node name or one of the node's output tensor names (exporters leave nodes
    unnamed; their outputs keep their names through QDQ quantization). Q/DQ and Constant nodes are not costed
    (their cost belongs in the layer's int8_ms). Model nodes absent from the table cost 0 and are listed in
    details["missing_nodes"]; a table row that matches no node is an error (a typo would silently cost 0).
    Deterministic: spread is 0."""

    name = "table"
    unit = "ms"
    deterministic = True

    def __init__(self, path: str | Path):
        self.path = Path(str(path).strip().strip("\"'"))
        self.rows = _read_latency_table(self.path)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "TableLatency":
        if not arg and "path" not in opts:
            raise SensqError("the table latency backend needs a CSV file", "write --latency table:layers.csv")
        return construct(cls, arg, **opts) if arg else construct(cls, **opts)

    def _row_for(self, node) -> tuple[str | None, _TableRow | None]:
        # ORT renames a quantized graph output's producer output to <name>_QuantizeLinear_Input
        outputs = [o.removesuffix("_QuantizeLinear_Input") for o in node.output]
        for key in [node.name, *outputs]:
            if key and key in self.rows:
                return key, self.rows[key]
        return None, None

    def measure(self, model: ModelLike) -> LatencyResult:
        proto = load_model(model)
        quantized = quantized_nodes(proto)
        total, n_int8, missing, op_mismatch = 0.0, 0, [], []
        used: set[str] = set()
        for node in proto.graph.node:
            if node.op_type in FREE_OPS:
                continue
            key, row = self._row_for(node)
            if row is None:
                missing.append(node_key(node))
                continue
            used.add(key)
            if row.op_type and row.op_type != node.op_type:
                op_mismatch.append(key)
            if node_key(node) in quantized:
                total += row.int8_ms
                n_int8 += 1
            else:
                total += row.float_ms
        unmatched = sorted(set(self.rows) - used)
        if unmatched:
            raise SensqError(f"{len(unmatched)} row(s) of latency table {self.path} match no node of the model, e.g. "
                             f"{unmatched[0]!r}",
                             "key each row by a node name or an output tensor name of this model (Netron shows both)")
        details = {"table": str(self.path), "n_costed": len(used), "n_int8": n_int8, "n_missing_nodes": len(missing),
                   "missing_nodes": missing, "op_type_mismatches": op_mismatch}
        return LatencyResult.exact(total, self.unit, self.name, **details)

    def timer(self, model: ModelLike):
        raise TypeError("table is deterministic: use measure()")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "unit": self.unit, "table": str(self.path)}
