"""Export a search trial for a deployment toolchain: one writer per format behind `export_trial`.

    onnx         the QDQ model itself (.q.onnx), byte for byte the one the study scored      onnx_qdq.py
    xquant       a config that `sensq quantize --config` rebuilds that model from            xquant.py
    ort-exclude  onnxruntime quantize_static settings that reproduce it                      ort_exclude.py
    trtexec      a TensorRT 10 trtexec command line, float groups pinned by --layerPrecisions trtexec.py
    nncf         an NNCF IgnoredScope (names and patterns) + Python snippet                  nncf_scope.py
    json         the float nodes as plain JSON                                               float_json.py

Each writer module names the consumer version it targets in CONSUMER. Without a trial number the recommended trial
is exported (see trial.py); every format that rebuilds the model first checks the calibration statistics key, and
the formats writing the scored QDQ model check its hash against the trial's (ExportContext.scored_model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import SensqError
from . import float_json, nncf_scope, onnx_qdq, ort_exclude, trtexec, xquant
from .paths import SUFFIXES, save_model, sibling
from .trial import TrialChoice, choose_trial, load_search, workspace_for
from .xquant import xquant_config

WRITERS: dict[str, ModuleType] = {"onnx": onnx_qdq, "xquant": xquant, "ort-exclude": ort_exclude, "trtexec": trtexec,
                                  "nncf": nncf_scope, "json": float_json}
FORMATS = tuple(WRITERS)
# Formats that carry per-group 16-bit activations (plan.a16_nodes): the built model itself, and the JSON node lists.
# xquant and ort-exclude settings, trtexec (no 16-bit integer Q/DQ in TensorRT) and NNCF scopes cannot.
CARRY_A16 = ("onnx", "json")
# Formats that carry float16 groups (plan.fp16_nodes): the built model (Cast islands), the JSON node lists and trtexec
# (--layerPrecisions ...:fp16). xquant, ort-exclude and NNCF scopes have no per-node float16 setting.
CARRY_FP16 = ("onnx", "json", "trtexec")


@dataclass
class ExportContext:
    """What a writer gets: the search's record, the chosen trial, and the workspace (rebuilt on first use)."""

    workdir: Path
    info: dict
    choice: TrialChoice
    progress: bool = True
    force: bool = False  # write a rebuilt model whose hash differs from the scored one
    _ws: object = None

    @property
    def ws(self):
        if self._ws is None:
            self._ws = workspace_for(self.info, progress=self.progress)
        return self._ws

    def scored_model(self, plan=None):
        """The trial's QDQ model rebuilt, refused when its bytes differ from the one the study scored (model_hash)
        unless forced: a machine-dependent choice (overflow_fix's VNNI check) can rebuild it differently."""
        from ..evaluators.scoring import model_hash

        qmodel = self.ws.build(plan or self.choice.plan)
        expected = self.choice.attrs.get("model_hash")
        if expected and not self.force and model_hash(qmodel) != expected:
            raise SensqError(f"the rebuilt model (sha256 {model_hash(qmodel)[:12]}) differs from the model trial "
                             f"{self.choice.number} scored ({expected[:12]}), so its scores would not apply",
                             "export on the machine that ran the search, or pass --force to write the rebuilt model")
        return qmodel

    def float_model(self, out: Path) -> Path:
        """The float graph sensq quantized (simplified, opset >= 13, every node named), written next to `out`: the
        node names in every exported list refer to it, not to the original .onnx."""
        return save_model(self.ws.builder.model, sibling(out, ".float.onnx"))


def export_trial(workdir: str | Path, trial: int | None, output: str | Path, fmt: str = "onnx", progress: bool = True,
                 force: bool = False) -> dict:
    """Python API of `sensq export`. Returns what was written, the trial and the scores it reproduces:
    {"trial", "output", "metric", "latency", "latency_unit", "ratio", "confirm_metric", "picked", "summary", "files",
    "notes", "consumer", "format"}."""
    if fmt not in WRITERS:
        raise SensqError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    info = load_search(workdir)
    choice = choose_trial(workdir, info, trial)
    ctx = ExportContext(Path(workdir), info, choice, progress, force)
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SensqError(f"cannot create {out.parent}: {e.strerror or e}", "choose an output path in a writable folder (-o)") from e
    writer = WRITERS[fmt]
    if choice.plan.a16_nodes and fmt not in CARRY_A16:
        raise SensqError(f"trial {choice.number} runs {len(choice.plan.a16_nodes)} node(s) with 16-bit activations, "
                         f"which the {fmt} format cannot express", f"export it as {' or '.join(CARRY_A16)}")
    if choice.plan.fp16_nodes and fmt not in CARRY_FP16:
        raise SensqError(f"trial {choice.number} runs {len(choice.plan.fp16_nodes)} node(s) in float16, which the {fmt} "
                         "format cannot express", f"export it as {', '.join(CARRY_FP16)}")
    written = writer.write(ctx, out)
    return {"trial": choice.number, "output": out, "metric": choice.metric, "latency": choice.latency,
            "latency_unit": choice.latency_unit, "ratio": choice.ratio, "confirm_metric": choice.confirm_metric,
            "picked": choice.picked,
            "summary": choice.summary(info.get("metric_name") or "metric"), "files": written.get("files", [out]),
            "notes": written.get("notes", []), "consumer": writer.CONSUMER, "format": fmt}


__all__ = ["FORMATS", "SUFFIXES", "WRITERS", "ExportContext", "TrialChoice", "choose_trial", "export_trial",
           "load_search", "sibling", "workspace_for", "xquant_config"]
