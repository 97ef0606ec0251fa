""".pt input (sensq.pt_export): one-line errors without the Ultralytics extra and for original YOLOv5 checkpoints,
checkpoint kinds read without unpickling, the export cached by checkpoint hash and settings (with a stand-in for
ultralytics, which is not installed here), and no torch/ultralytics import in the core."""
from __future__ import annotations

import importlib.machinery
import logging
import stat
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest

from sensq.cli import main
from sensq.config import QuantizeConfig
from sensq.errors import SensqError
from sensq import pt_export


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


class Calls(list):
    """Recorded export calls; .behaviour switches the stand-in's habits."""


@pytest.fixture
def fake_ultralytics(monkeypatch):
    """A stand-in for the ultralytics package (checked against the real one by bench/bench_pt.py): YOLO(path).export(**settings) writes '<stem>.onnx' beside the weights,
    logs as Ultralytics does (a page of INFO on the 'ultralytics' logger) and, like the real one, may hand back the
    path as given (relative)."""
    calls = Calls()
    behaviour = {"relative": False, "seconds": 0.0}

    class YOLO:
        def __init__(self, weights):
            self.weights = Path(weights)

        def export(self, **settings):
            calls.append((self.weights, settings))
            logger = logging.getLogger("ultralytics")
            logger.info("ONNX: export success, saved as %s", self.weights.with_suffix(".onnx"))
            logger.warning("a warning the user should see")
            time.sleep(behaviour["seconds"])
            out = self.weights.with_suffix(".onnx")
            out.write_bytes(b"exported from " + self.weights.read_bytes()[-8:])
            return out.name if behaviour["relative"] else str(out)

    module = types.ModuleType("ultralytics")
    module.YOLO, module.__version__ = YOLO, "8.3.0-fake"
    module.__spec__ = importlib.machinery.ModuleSpec("ultralytics", None)
    monkeypatch.setitem(sys.modules, "ultralytics", module)
    monkeypatch.setattr(pt_export, "_resolved", {})
    calls.behaviour = behaviour
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
    assert "half" not in fake_ultralytics[0][1]  # deprecated in ultralytics 8.4 (warns); FP32 is the default
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


def test_export_key_follows_the_exporter_versions(fake_ultralytics, tmp_path, monkeypatch):
    pt = checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE)
    versions = {"ultralytics": "8.4.190", "torch": "2.13.0+cpu", "onnx": "1.23.2", "onnxslim": "0.1.98"}
    monkeypatch.setattr(pt_export, "exporter_versions", lambda: dict(versions))
    first = pt_export.resolve_model(pt)
    pt_export._resolved.clear()
    versions["torch"] = "2.14.1"  # another torch writes another graph: export again, keep the old one
    second = pt_export.resolve_model(pt)
    assert second != first and first.is_file() and second.is_file() and len(fake_ultralytics) == 2
    assert pt_export.exporter_versions()["torch"] == "2.14.1"


def test_real_versions_are_read_without_importing(no_ultralytics):
    versions = pt_export.exporter_versions()
    assert set(versions) == {"ultralytics", "torch", "onnx", "onnxslim"}
    import onnx

    assert versions["onnx"] == onnx.__version__ and "torch" not in sys.modules


def test_folder_without_write_bits_caches_in_sensq_cache(fake_ultralytics, tmp_path, isolated_cache):
    """../shared/data is r-x for everyone but root may still write there: the export must not land in it."""
    folder = tmp_path / "shared"
    folder.mkdir()
    pt = checkpoint(folder / "det.pt", ULTRALYTICS_PICKLE)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        out = pt_export.resolve_model(pt)
        assert out.parent == Path(isolated_cache) / "pt" and out.is_file()
        assert sorted(p.name for p in folder.iterdir()) == ["det.pt"]
    finally:
        folder.chmod(0o755)


def test_relative_path_from_exporter_and_its_log_quieted(fake_ultralytics, tmp_path, monkeypatch):
    fake_ultralytics.behaviour["relative"] = True
    monkeypatch.chdir(tmp_path)  # a relative name must be taken from the temporary copy's folder, not the cwd
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.levelno)
    logger = logging.getLogger("ultralytics")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        out = pt_export.resolve_model(checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE))
    finally:
        logger.removeHandler(handler)
    assert out.read_bytes().startswith(b"exported from ")
    assert not (tmp_path / "det.onnx").exists()
    assert seen == [logging.WARNING] and logger.level == logging.INFO  # INFO page dropped, warning kept, level back


def test_concurrent_resolves_export_once(fake_ultralytics, tmp_path):
    fake_ultralytics.behaviour["seconds"] = 0.3
    pt = checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE)
    results = []

    def resolve():
        results.append(pt_export.resolve_model(pt))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_ultralytics) == 1 and len(set(results)) == 1 and results[0].is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_broken_ultralytics_install_is_one_line_error(tmp_path, monkeypatch, capsys):
    """As seen with `pip install --no-deps ultralytics`: importing it fails on a missing dependency's metadata."""
    package = tmp_path / "site" / "ultralytics"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import importlib.metadata\nimportlib.metadata.version('no-such-dist-sensq')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "ultralytics", raising=False)
    monkeypatch.setattr(pt_export, "_resolved", {})
    pt = checkpoint(tmp_path / "det.pt", ULTRALYTICS_PICKLE)
    code = main(["quantize", "--model", str(pt), "--data-free", "-q"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "Ultralytics extra is installed but does not import (PackageNotFoundError" in lines[0]
    assert 'pip install -e ".[ultralytics]"' in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.pt", "site"]


def test_outputs_are_named_after_the_checkpoint(fake_ultralytics, tmp_path):
    (tmp_path / "models").mkdir()
    pt = checkpoint(tmp_path / "models" / "det.pt", ULTRALYTICS_PICKLE)
    cfg = QuantizeConfig(onnx_model=str(pt))
    assert cfg.prefix == "det" and cfg.out_dir == tmp_path / "models"
    assert cfg.output_model == tmp_path / "models" / "det.q.onnx"
    assert fake_ultralytics == []  # naming the outputs does not export
    assert cfg.model_path.name.startswith("det.") and cfg.model_path.name != "det.onnx"
    assert QuantizeConfig(onnx_model=str(pt), working_dir=str(tmp_path), output_prefix="x").output_model == tmp_path / "x.q.onnx"
    onnx_cfg = QuantizeConfig(onnx_model=str(tmp_path / "m.v2.onnx"))
    assert onnx_cfg.prefix == "m.v2" and onnx_cfg.out_dir == tmp_path
