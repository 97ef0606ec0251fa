"""User errors through the CLI: exit code 2, exactly one `sensq: error:` line on stderr, no traceback, work kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from sensq.cli import main

from tiny_models import X1_SHAPE, conv_relu_conv, qdq_nodes, two_input_model, write_arrays, write_config, write_pngs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSQ_CACHE", str(tmp_path / "env_cache"))


def run(tmp_path: Path, *args: str) -> int:
    return main(["quantize", *args, "--no-analysis", "-q", "--cache-dir", str(tmp_path / "cache")])


def assert_one_error_line(capfd, *needles: str) -> str:
    """stderr (Python and C level) is exactly one line `sensq: error: ...` containing every needle."""
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("sensq: error: "), line
    assert " -- " in line, f"no fix given: {line}"
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    """(model, image folder) for the 1-input Conv->Relu->Conv model."""
    model = conv_relu_conv(tmp_path / "m.onnx")
    write_pngs(tmp_path / "imgs", n=3)
    return model, tmp_path / "imgs"


def tiny_cfg(tmp_path: Path, model: Path, calib: Path, entry: dict | None = None, **quant) -> str:
    e = {"mean_value": [0, 0, 0], "std_value": [255, 255, 255], "data_list_path": str(calib), **(entry or {})}
    return str(write_config(tmp_path / "cfg.json", model, [e], **quant))


def test_success_baseline(tmp_path, tiny, capfd):
    model, imgs = tiny
    cfg = tiny_cfg(tmp_path, model, imgs)
    assert run(tmp_path, "--config", cfg) == 0
    out, err = capfd.readouterr()
    assert err == ""
    q = tmp_path / "out" / "m.q.onnx"
    assert f"wrote {q}" in out and q.is_file()
    assert len(qdq_nodes(onnx.load(str(q)))) > 0
    assert run(tmp_path, "--config", cfg) == 0
    out, _ = capfd.readouterr()
    assert "calibration statistics: from cache" in out


def test_input_count_differs_from_model(tmp_path, capfd):
    model = two_input_model(tmp_path / "two.onnx")
    write_arrays(tmp_path / "d1", X1_SHAPE, 2)
    cfg = write_config(tmp_path / "cfg.json", model, [{"file_type": "npy", "data_list_path": str(tmp_path / "d1")}])
    assert run(tmp_path, "--config", str(cfg)) == 2
    assert_one_error_line(capfd, "input_parametres size", "config has 1, model has 2")


def test_unknown_calibration_type(tmp_path, tiny, capfd):
    cfg = tiny_cfg(tmp_path, *tiny)
    text = Path(cfg).read_text().replace('"calibration_step": 8', '"calibration_step": 8, "calibration_type": "xxx"')
    Path(cfg).write_text(text)
    assert run(tmp_path, "--config", cfg) == 2
    assert_one_error_line(capfd, "calibration_type xxx not implemented")


def test_unknown_method_on_the_command_line(tmp_path, tiny, capfd):
    model, imgs = tiny
    assert run(tmp_path, "--model", str(model), "--calib", str(imgs), "--method", "xxx") == 2
    assert_one_error_line(capfd, "calibration_type xxx not implemented")


def test_unknown_file_type(tmp_path, tiny, capfd):
    cfg = tiny_cfg(tmp_path, *tiny, entry={"file_type": "xxx"})
    assert run(tmp_path, "--config", cfg) == 2
    assert_one_error_line(capfd, "file_type xxx not implemented")


def test_zero_calibration_files(tmp_path, tiny, capfd):
    model, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert run(tmp_path, "--config", tiny_cfg(tmp_path, model, empty)) == 2
    assert_one_error_line(capfd, "finds 0 items", str(empty))


def test_missing_calibration_folder(tmp_path, tiny, capfd):
    model, _ = tiny
    assert run(tmp_path, "--config", tiny_cfg(tmp_path, model, tmp_path / "nowhere")) == 2
    assert_one_error_line(capfd, "finds 0 items", "does not exist")


def test_truncation_tensor_missing(tmp_path, tiny, capfd):
    cfg = tiny_cfg(tmp_path, *tiny, truncate_var_names=["/model.22/Nope_output_0"])
    assert run(tmp_path, "--config", cfg) == 2
    assert_one_error_line(capfd, "truncate graph failed", "/model.22/Nope_output_0")


def test_truncation_tensor_missing_without_simplifier(tmp_path, tiny, capfd):
    model, imgs = tiny
    assert run(tmp_path, "--model", str(model), "--calib", str(imgs), "--skip-simplify", "--truncate", "nope_t") == 2
    assert_one_error_line(capfd, "truncate graph failed", "nope_t")


def test_truncation_at_a_graph_output(tmp_path, tiny, capfd):
    cfg = tiny_cfg(tmp_path, *tiny, truncate_var_names=["y"])
    assert run(tmp_path, "--config", cfg) == 2
    assert_one_error_line(capfd, "truncate graph failed", "'y'", "model output")


def test_truncation_that_works(tmp_path, tiny, capfd):
    """Control for the two cases above: cutting after the Relu keeps conv2 float."""
    cfg = tiny_cfg(tmp_path, *tiny, truncate_var_names=["r1"])
    assert run(tmp_path, "--config", cfg) == 0
    assert capfd.readouterr().err == ""
    q = onnx.load(str(tmp_path / "out" / "m.q.onnx"))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert list(conv2.input[1:]) == ["w2", "b2"], "conv2 after the cut must keep float weights"
    assert not any(n.input[0] == "y" for n in qdq_nodes(q))  # nothing produced after the cut is quantized
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    assert conv1.input[1].endswith("DequantizeLinear_Output"), "conv1 before the cut must be quantized"


def test_missing_model_file(tmp_path, tiny, capfd):
    _, imgs = tiny
    cfg = tiny_cfg(tmp_path, tmp_path / "absent.onnx", imgs)
    assert run(tmp_path, "--config", cfg) == 2
    assert_one_error_line(capfd, "model file not found", "absent.onnx")


def test_corrupt_model_file(tmp_path, tiny, capfd):
    _, imgs = tiny
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert run(tmp_path, "--model", str(bad), "--calib", str(imgs)) == 2
    line = assert_one_error_line(capfd, "bad.onnx")
    assert "cannot parse" in line or "has no nodes" in line


def test_unreadable_image(tmp_path, tiny, capfd):
    model, imgs = tiny
    (imgs / "img_001b.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg " * 10)
    assert run(tmp_path, "--config", tiny_cfg(tmp_path, model, imgs)) == 2
    assert_one_error_line(capfd, "cannot read image", "img_001b.jpg")
    assert not list((tmp_path / "cache").rglob("*.npz")), "statistics of a failed calibration must not be cached"


def test_bad_json(tmp_path, capfd):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{\n  "model_parameters": {"onnx_model": "m.onnx"},\n}\n')  # trailing comma; '}' at line 3 col 1
    assert run(tmp_path, "--config", str(cfg)) == 2
    assert_one_error_line(capfd, "bad JSON", "line 3 column 1", str(cfg))


def test_config_not_an_object(tmp_path, capfd):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("[1, 2]")
    assert run(tmp_path, "--config", str(cfg)) == 2
    assert_one_error_line(capfd, "must be a JSON object")


def test_missing_config_file(tmp_path, capfd):
    assert run(tmp_path, "--config", str(tmp_path / "nope.json")) == 2
    assert_one_error_line(capfd, "config file not found", "nope.json")


def test_no_calibration_data(tmp_path, tiny, capfd):
    model, _ = tiny
    assert run(tmp_path, "--model", str(model)) == 2
    assert_one_error_line(capfd, "no calibration data given")


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "stats").glob("*.npz"))


def test_failure_after_success_keeps_the_cache(tmp_path, tiny, capfd):
    model, imgs = tiny
    cfg = tiny_cfg(tmp_path, model, imgs)
    assert run(tmp_path, "--config", cfg) == 0
    capfd.readouterr()
    files = _cache_files(tmp_path)
    assert len(files) == 1
    before = files[0].read_bytes()
    assert run(tmp_path, "--config", cfg, "--float-nodes", "nope") == 2
    assert_one_error_line(capfd, "float node 'nope' not in graph")
    assert _cache_files(tmp_path) == files and files[0].read_bytes() == before
    assert run(tmp_path, "--config", cfg) == 0
    assert "calibration statistics: from cache" in capfd.readouterr().out


def test_failure_after_calibration_keeps_the_statistics(tmp_path, tiny, capfd):
    """The output cannot be written (its folder is a file): the run fails after calibrating; the next run reuses the
    statistics. The failure itself must be a one-line user error, not a traceback."""
    model, imgs = tiny
    cfg = tiny_cfg(tmp_path, model, imgs)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    try:
        rc = run(tmp_path, "--config", cfg, "-o", str(blocker / "m.q.onnx"))
    except Exception as e:  # noqa: BLE001 - checked below
        rc = e
    assert len(_cache_files(tmp_path)) == 1, "statistics computed before the failure were not kept"
    assert rc == 2, f"unwritable output escaped as {rc!r} instead of a one-line error"
    assert_one_error_line(capfd, str(blocker))
