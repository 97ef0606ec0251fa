""".pt input (sensq.pt_export): one-line errors without the Ultralytics extra and for original YOLOv5 checkpoints,
checkpoint kinds read without unpickling, the export cached by checkpoint hash and settings (with a stand-in for
ultralytics, which is not installed here), and no torch/ultralytics import in the core."""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from sensq.cli import main
from sensq.config import QuantizeConfig
from sensq.errors import SensqError
from sensq import pt_export

from test_search import restore_sensq_logger  # noqa: F401 (autouse)

ULTRALYTICS_PICKLE = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x14ultralytics.nn.tasks\x94"
                      b"\x8c\x0eDetectionModel\x94\x93\x94)\x81\x94.")
YOLOV5_PICKLE = b"\x80\x02cmodels.yolo\nDetectionModel\n)\x81."
# Would run os.system("touch pwned") if unpickled: reading the checkpoint's kind must not execute it.
EVIL_PICKLE = b"\x80\x02cos\nsystem\nX\x0b\x00\x00\x00touch pwned\x85R."


def checkpoint(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{path.stem}/data.pkl", payload)
        z.writestr(f"{path.stem}/version", "3\n")
    return path


@pytest.fixture
def no_ultralytics(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` raises, find_spec finds nothing


def test_kinds_are_read_without_running_the_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pt_export.checkpoint_kind(checkpoint(tmp_path / "u.pt", ULTRALYTICS_PICKLE)) == "ultralytics"
    assert pt_export.checkpoint_kind(checkpoint(tmp_path / "v5.pt", YOLOV5_PICKLE)) == "yolov5"
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(YOLOV5_PICKLE)  # pre-zip torch.save format
    assert pt_export.checkpoint_kind(legacy) == "yolov5"
    assert pt_export.checkpoint_kind(checkpoint(tmp_path / "evil.pt", EVIL_PICKLE)) == "unknown"
    assert not (tmp_path / "pwned").exists()


def test_shared_checkpoints_are_recognised(data_dir):
    assert pt_export.checkpoint_kind(data_dir / "models" / "yolov8n-arch-random.pt") == "ultralytics"
    assert pt_export.checkpoint_kind(data_dir / "models" / "yolov5n.pt") == "yolov5"


def test_missing_extra_is_one_line_error_exit_2(no_ultralytics, data_dir, capsys):
    pt = data_dir / "models" / "yolov8n-arch-random.pt"
    with pytest.raises(SensqError) as e:
        QuantizeConfig(onnx_model=str(pt)).model_path
    assert e.value.fix.startswith('pip install -e ".[ultralytics]"')
    code = main(["quantize", "--model", str(pt), "--data-free", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sensq: error: yolov8n-arch-random.pt is an Ultralytics checkpoint")
    assert 'pip install -e ".[ultralytics]"' in lines[0]


def test_original_yolov5_checkpoint_says_ultralytics_cannot_load_it(data_dir, capsys):
    code = main(["quantize", "--model", str(data_dir / "models" / "yolov5n.pt"), "--data-free", "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "original YOLOv5 checkpoint" in lines[0] and "ultralytics package does not load" in lines[0]


def test_onnx_paths_pass_through(tmp_path):
    assert pt_export.resolve_model(tmp_path / "m.onnx") == tmp_path / "m.onnx"


@pytest.fixture
def fake_ultralytics(monkeypatch):
    """A stand-in for the ultralytics package: YOLO(path).export(**settings) writes '<stem>.onnx' beside the weights."""
    calls = []

    class YOLO:
        def __init__(self, weights):
            self.weights = Path(weights)

        def export(self, **settings):
            calls.append((self.weights, settings))
            out = self.weights.with_suffix(".onnx")
            out.write_bytes(b"exported from " + self.weights.read_bytes()[-8:])
            return str(out)

    module = types.ModuleType("ultralytics")
    module.YOLO, module.__version__ = YOLO, "8.3.0-fake"
    module.__spec__ = importlib.machinery.ModuleSpec("ultralytics", None)
    monkeypatch.setitem(sys.modules, "ultralytics", module)
    monkeypatch.setattr(pt_export, "_resolved", {})
    return calls


def test_export_is_cached_by_checkpoint_and_settings(fake_ultralytics, tmp_path):
    pt = checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE)
    users_own = tmp_path / "det.onnx"
    users_own.write_bytes(b"the user's own export")
    first = pt_export.resolve_model(pt)
    assert first.parent == tmp_path and first.name.startswith("det.") and first.suffix == ".onnx"
    assert len(fake_ultralytics) == 1 and fake_ultralytics[0][1] == pt_export.EXPORT_SETTINGS
    assert fake_ultralytics[0][1]["opset"] == 17 and fake_ultralytics[0][1]["imgsz"] == 640
    assert fake_ultralytics[0][1]["dynamic"] is False and fake_ultralytics[0][1]["simplify"] is True
    assert users_own.read_bytes() == b"the user's own export"  # never overwritten
    pt_export._resolved.clear()
    assert pt_export.resolve_model(pt) == first and len(fake_ultralytics) == 1  # cached on disk
    assert QuantizeConfig(onnx_model=str(pt)).model_path == first
    checkpoint(pt, ULTRALYTICS_PICKLE + b"changed")  # new weights: new key, new export
    second = pt_export.resolve_model(pt)
    assert second != first and len(fake_ultralytics) == 2


def test_read_only_folder_caches_in_sensq_cache(fake_ultralytics, tmp_path, monkeypatch, isolated_cache):
    pt = checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE)
    monkeypatch.setattr(pt_export.os, "access", lambda path, mode: False)  # as for ../shared (root ignores chmod)
    assert pt_export.resolve_model(pt).parent == Path(isolated_cache) / "pt"


def test_core_imports_neither_torch_nor_ultralytics():
    code = ("import sys, sensq, sensq.cli, sensq.config, sensq.pt_export, sensq.export, sensq.latency, sensq.targets; "
            "bad = [m for m in ('torch', 'ultralytics') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
