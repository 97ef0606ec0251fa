"""The trial's QDQ model, byte for byte the one the study scored (same statistics, same plan, same builder)."""
from __future__ import annotations

from pathlib import Path

from .paths import save_model

CONSUMER = "onnxruntime 1.20-1.31 CPUExecutionProvider (QDQ, the model's opset >= 13); any runtime that reads QDQ ONNX"


def write(ctx, out: Path) -> dict:
    save_model(ctx.scored_model(), out)
    return {"files": [out]}
