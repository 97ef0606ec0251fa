"""The tiny search setup shared by the search, sensitivity and export tests: a conv->relu->conv model, 4 calibration
PNGs, and a plugin evaluator (metric = -MSE of the output against the float model on 16 fixed random inputs, one
per-sample score each, so subsets, intervals and pruning work as with a real evaluator)."""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from sensq.config import QuantizeConfig, config_from_dict
from sensq.evaluators.plugins import make_plugin_evaluator
from sensq.quantize import prepare
from sensq.search import SearchSettings, TrialRecord, records

from tiny_models import conv_relu_conv, write_pngs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEED_LABELS = ["all-INT8", "seed: top-1 float", "seed: top-2 float", "seed: top-3 float"]

# SENSQ_TEST_SLEEP makes every evaluate() slower (for the kill test); calls are counted in `calls`.
PLUGIN_SOURCE = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    import numpy as np

    from sensq.evaluators.base import EvalResult, resolve_indices
    from sensq.evaluators.samples import MeanSamples
    from sensq.runtime import make_session


    class TinyMSE:
        name = "tiny-mse"
        primary = "neg_mse"

        def __init__(self, data, model, sleep=0.0):
            self.inputs = np.load(Path(data) / "inputs.npy")
            self.sleep = sleep
            self.calls = 0
            self.scored = 0
            sess = make_session(str(model))
            self.input_name = sess.get_inputs()[0].name
            self.reference = [sess.run(None, {self.input_name: x})[0].astype(np.float64) for x in self.inputs]

        def __len__(self):
            return len(self.inputs)

        def signature(self):
            return f"tiny-mse:{len(self.inputs)}"

        def evaluate(self, model, limit=None, progress=True, indices=None):
            self.calls += 1
            t0 = time.perf_counter()
            idx = resolve_indices(len(self), limit, indices)
            self.scored += len(idx)
            sess = make_session(model)
            per = np.array([-float(np.mean((sess.run(None, {self.input_name: self.inputs[i]})[0] - self.reference[i]) ** 2))
                            for i in idx])
            if self.sleep:
                time.sleep(self.sleep)
            samples = MeanSamples(np.asarray(idx, np.int64), {"neg_mse": per}, "neg_mse")
            return EvalResult({"neg_mse": float(per.mean())}, "neg_mse", len(idx), time.perf_counter() - t0,
                              samples=samples)


    def make(data, model=None):
        return TinyMSE(data, model, float(os.environ.get("SENSQ_TEST_SLEEP", "0")))
''')


@dataclass
class Tiny:
    root: Path
    model: Path
    calib: Path
    data: Path
    plugin: Path

    @property
    def task(self) -> str:
        return f"{self.plugin}:make"

    def config(self) -> QuantizeConfig:
        """Its own cache folder: per-sample results of one test never serve another (counts of scored samples)."""
        cfg = config_from_dict({
            "model_parameters": {"onnx_model": str(self.model)},
            "calibration_parameters": {"calibration_step": 4, "input_parametres": [
                {"mean_value": [0.0] * 3, "std_value": [255.0] * 3, "color_format": "rgb",
                 "data_list_path": str(self.calib)}]},
            "quantization_parameters": {"analysis_enable": False},
        })
        cfg.cache_dir = str(self.root / "cache")
        return cfg

    def workspace(self):
        return prepare(self.config(), progress=False)

    def evaluator(self):
        return make_plugin_evaluator(self.task, str(self.data), model=str(self.model))

    def model_args(self) -> list[str]:
        return ["-m", str(self.model), "--calib", str(self.calib), "--mean", "0", "0", "0",
                "--std", "255", "255", "255", "--color", "rgb", "--cache-dir", str(self.root / "cache")]

    def search_args(self, workdir: Path, budget: int, *extra: str) -> list[str]:
        return ["search", *self.model_args(), "--data", str(self.data), "--task", self.task, "--latency", "bops",
                "--budget", str(budget), "--workdir", str(workdir), "--low-fidelity", "8", "--unit", "node",
                "--confirm", "0", "-q", *extra]


def make_tiny(root: Path) -> Tiny:
    root.mkdir(parents=True, exist_ok=True)
    model = conv_relu_conv(root / "m.onnx")
    write_pngs(root / "calib", n=4)
    data = root / "data"
    data.mkdir(exist_ok=True)
    np.save(data / "inputs.npy", np.random.default_rng(7).uniform(0, 1, (16, 1, 3, 8, 8)).astype(np.float32))
    plugin = root / "tiny_eval.py"
    plugin.write_text(PLUGIN_SOURCE)
    return Tiny(root, model, root / "calib", data, plugin)


def tiny_settings(workdir: Path, budget: int, **kw) -> SearchSettings:
    kw.setdefault("latency", "bops")
    kw.setdefault("confirm", 0)
    kw.setdefault("group_by", "node")  # conv1, relu, conv2: three groups (structurally they are one block)
    kw.setdefault("low_fidelity", 8)
    return SearchSettings(budget=budget, workdir=str(workdir), seed=0, **kw)


def load_study(workdir: Path) -> optuna.Study:
    info = json.loads((Path(workdir) / "search.json").read_text())
    return optuna.load_study(study_name=info["study_name"], storage=info["storage"])


def study_records(workdir: Path) -> list[TrialRecord]:
    return records(load_study(workdir))


def searched(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Trials the budget counts (not the sensitivity pass's warm-start entries, not repeats of a built model)."""
    return [r for r in recs if r.source != "sensitivity" and r.repeat_of is None]


def entered(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Every searched trial, repeats of a built model included (they carry the label of the plan they were)."""
    return [r for r in recs if r.source != "sensitivity"]
