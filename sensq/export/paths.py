"""Where an export's files go: default name endings per format and companion files next to the output."""
from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import SensqError

# Default output name endings per format (the CLI appends them to "<workdir>.trial<N>").
SUFFIXES = {"onnx": ".q.onnx", "xquant": ".xquant.json", "ort-exclude": ".ort_exclude.json", "trtexec": ".trtexec.sh",
            "nncf": ".nncf.json", "json": ".float_nodes.json"}


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    try:
        onnx.save(model, str(path))
    except OSError as e:
        raise SensqError(f"cannot write {path}: {e.strerror or e}", "choose an output path in a writable folder (-o)") from e
    return path


def sibling(out: Path, suffix: str) -> Path:
    """A companion file next to `out`: 'm.trial3.nncf.json' + '.float.onnx' -> 'm.trial3.float.onnx'."""
    name = out.name
    for ending in sorted(SUFFIXES.values(), key=len, reverse=True):
        if name.endswith(ending):
            return out.with_name(name[: -len(ending)] + suffix)
    return out.with_name(out.stem + suffix)
