"""Calibration inputs and configs: multi-input models, .npy/raw files, list files, custom preprocessing, xquant keys."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from sensq.config import InputParams, QuantizeConfig, config_from_dict, load_config
from sensq.data import TORCH_MEAN, TORCH_STD, SyntheticData, build_calibration_data, image_preprocess_for, list_files
from sensq.errors import SensqError
from sensq.quantize import prepare, quantize

from tiny_models import X1_SHAPE, X2_SHAPE, conv_relu_conv, cosine, qdq_nodes, run_model, two_input_model, write_arrays, write_pngs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSQ_CACHE", str(tmp_path / "env_cache"))


def two_input_cfg(tmp_path: Path, inputs: list[dict], step: int = 8, **extra) -> QuantizeConfig:
    model = tmp_path / "two.onnx"
    if not model.exists():
        two_input_model(model)
    data = {
        "model_parameters": {"onnx_model": str(model), "working_dir": str(tmp_path / "out"), "skip_onnxsim": True},
        "calibration_parameters": {"calibration_step": step, "input_parametres": inputs},
        "quantization_parameters": {"analysis_enable": False, **extra},
    }
    cfg = config_from_dict(data, base_dir=tmp_path)
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


def npy_inputs(tmp_path: Path, n: int = 6, kind: str = "npy", loc1: float = 0.0, loc2: float = 0.0):
    write_arrays(tmp_path / "d1", X1_SHAPE, n, kind=kind, seed=1, loc=loc1)
    write_arrays(tmp_path / "d2", X2_SHAPE, n, kind=kind, seed=2, loc=loc2)
    return ({"file_type": kind, "data_list_path": str(tmp_path / "d1")},
            {"file_type": kind, "data_list_path": str(tmp_path / "d2")})


def check_qdq_close_to_float(float_path: Path, q_path: Path, feeds: dict) -> None:
    q = onnx.load(str(q_path))
    assert len(qdq_nodes(q)) > 0, "the output model has no Q/DQ nodes"
    (yf,) = run_model(float_path, feeds)
    (yq,) = run_model(q_path, feeds)
    assert yq.shape == yf.shape
    assert cosine(yf, yq) > 0.99


# multi-input ------------------------------------------------------------------------------------------------------
def test_two_input_npy_folders_quantize_and_run(tmp_path):
    p1, p2 = npy_inputs(tmp_path)
    cfg = two_input_cfg(tmp_path, [p1, p2])
    res = quantize(cfg, progress=False, analyze=False)
    assert res.output == tmp_path / "out" / "two.q.onnx" and res.output.is_file()
    rng = np.random.default_rng(42)
    feeds = {"x1": rng.standard_normal(X1_SHAPE).astype(np.float32), "x2": rng.standard_normal(X2_SHAPE).astype(np.float32)}
    check_qdq_close_to_float(tmp_path / "two.onnx", res.output, feeds)
    q = onnx.load(str(res.output))
    assert [i.name for i in q.graph.input] == ["x1", "x2"]


def test_two_input_data_reaches_the_right_input(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=3, loc1=10.0, loc2=-10.0)
    ws = prepare(two_input_cfg(tmp_path, [p1, p2]), progress=False)
    x1 = np.stack([np.load(p) for p in sorted((tmp_path / "d1").glob("*.npy"))])
    x2 = np.stack([np.load(p) for p in sorted((tmp_path / "d2").glob("*.npy"))])
    assert ws.stats.tensors["x1"].min == x1.min() and ws.stats.tensors["x1"].max == x1.max()
    assert ws.stats.tensors["x2"].min == x2.min() and ws.stats.tensors["x2"].max == x2.max()


def test_swapped_input_order_with_explicit_shapes(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=3, loc1=10.0, loc2=-10.0)
    p1 = {**p1, "input_name": "x1", "input_shape": X1_SHAPE}
    p2 = {**p2, "input_name": "x2", "input_shape": X2_SHAPE}
    cfg = two_input_cfg(tmp_path, [p2, p1])  # config order differs from the model's (x1, x2)
    data = build_calibration_data(cfg, onnx.load(cfg.model_path), yolo=False)
    assert [s.name for s in data.sources] == ["x1", "x2"]  # ordered as the model's inputs
    feed = next(iter(data))
    assert list(feed) == ["x1", "x2"] and feed["x1"].shape == tuple(X1_SHAPE) and feed["x2"].shape == tuple(X2_SHAPE)
    assert feed["x1"].mean() > 5 and feed["x2"].mean() < -5
    res = quantize(cfg, progress=False, analyze=False)
    feeds = {"x1": np.load(tmp_path / "d1" / "s_000.npy"), "x2": np.load(tmp_path / "d2" / "s_000.npy")}
    check_qdq_close_to_float(cfg.model_path, res.output, feeds)


def test_swapped_input_order_shapes_from_the_model(tmp_path):
    """Entries named by input_name but without input_shape: each must take the shape of the input it names."""
    p1, p2 = npy_inputs(tmp_path, n=3, loc1=10.0, loc2=-10.0)
    cfg = two_input_cfg(tmp_path, [{**p2, "input_name": "x2"}, {**p1, "input_name": "x1"}])
    data = build_calibration_data(cfg, onnx.load(cfg.model_path), yolo=False)
    shapes = {s.name: s.shape for s in data.sources}
    assert shapes == {"x1": X1_SHAPE, "x2": X2_SHAPE}, f"input shapes paired by position, not by input_name: {shapes}"
    ws = prepare(cfg, progress=False)
    assert ws.stats.tensors["x1"].min > 0 > ws.stats.tensors["x2"].max


def test_raw_float32_files(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=4, kind="raw")
    cfg = two_input_cfg(tmp_path, [p1, p2])
    res = quantize(cfg, progress=False, analyze=False)
    x1 = np.fromfile(tmp_path / "d1" / "s_000.raw", dtype=np.float32).reshape(X1_SHAPE)
    x2 = np.fromfile(tmp_path / "d2" / "s_000.raw", dtype=np.float32).reshape(X2_SHAPE)
    check_qdq_close_to_float(cfg.model_path, res.output, {"x1": x1, "x2": x2})
    ws = prepare(cfg, progress=False)  # cache hit; the stats saw exactly the raw values
    assert ws.stats_cached
    allx1 = np.concatenate([np.fromfile(p, dtype=np.float32) for p in sorted((tmp_path / "d1").glob("*.raw"))])
    assert ws.stats.tensors["x1"].min == allx1.min() and ws.stats.tensors["x1"].max == allx1.max()


def test_raw_file_of_wrong_size_is_a_user_error(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=2, kind="raw")
    np.zeros(7, np.float32).tofile(tmp_path / "d1" / "s_001.raw")
    with pytest.raises(SensqError, match="holds 7 values"):
        prepare(two_input_cfg(tmp_path, [p1, p2]), progress=False)


def test_list_files_relative_to_the_list_file(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    write_arrays(lists / "arrays" / "x1", X1_SHAPE, 3, seed=1)
    write_arrays(tmp_path / "other" / "x2", X2_SHAPE, 3, seed=2)
    (lists / "x1.txt").write_text("# calibration list\narrays/x1/s_000.npy\n\n  arrays/x1/s_001.npy  \narrays/x1/s_002.npy\n")
    (lists / "x2.txt").write_text("".join(f"../other/x2/s_{i:03d}.npy\n" for i in range(3)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the paths must not be resolved against the working directory
    files = list_files(lists / "x1.txt", "npy", "x1")
    assert files == [lists / "arrays" / "x1" / f"s_{i:03d}.npy" for i in range(3)]
    cfg = two_input_cfg(tmp_path, [{"file_type": "npy", "data_list_path": str(lists / "x1.txt")},
                                   {"file_type": "npy", "data_list_path": str(lists / "x2.txt")}])
    ws = prepare(cfg, progress=False)
    assert ws.stats.n_samples == 3


def test_list_file_with_missing_entry(tmp_path):
    write_arrays(tmp_path / "a", X1_SHAPE, 1)
    lst = tmp_path / "list.txt"
    lst.write_text("a/s_000.npy\na/nope.npy\n")
    with pytest.raises(SensqError, match="1 missing file") as e:
        list_files(lst, "npy", "x1")
    assert "nope.npy" in str(e.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    conv_relu_conv(tmp_path / "proj" / "m.onnx")
    write_pngs(tmp_path / "proj" / "imgs", n=2)
    cfg_path = tmp_path / "proj" / "cfg.json"
    cfg_path.write_text(json.dumps({
        "model_parameters": {"onnx_model": "m.onnx", "skip_onnxsim": True},
        "calibration_parameters": {"input_parametres": [{"data_list_path": "imgs"}]},
    }))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/cfg.json")
    cfg.cache_dir = str(tmp_path / "cache")
    assert cfg.model_path.resolve() == tmp_path / "proj" / "m.onnx"
    ws = prepare(cfg, progress=False)
    assert ws.stats.n_samples == 2


def test_calibration_step_caps_the_samples(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=5)
    ws = prepare(two_input_cfg(tmp_path, [p1, p2], step=2), progress=False)
    assert ws.stats.n_samples == 2 and len(ws.data) == 2
    assert ws.stats.tensors["a"].count == 2 * 4 * 8 * 8  # conv_a output [1,4,8,8], two samples
    # only the first two files (sorted by name) were read
    x1 = np.stack([np.load(tmp_path / "d1" / f"s_{i:03d}.npy") for i in range(2)])
    assert ws.stats.tensors["x1"].max == x1.max()
    assert len(ws.samples(10)) == 2


def test_lists_of_different_lengths(tmp_path):
    write_arrays(tmp_path / "d1", X1_SHAPE, 3)
    write_arrays(tmp_path / "d2", X2_SHAPE, 2)
    cfg = two_input_cfg(tmp_path, [{"file_type": "npy", "data_list_path": str(tmp_path / "d1")},
                                   {"file_type": "npy", "data_list_path": str(tmp_path / "d2")}])
    with pytest.raises(SensqError, match="differ in length"):
        prepare(cfg, progress=False)


# custom preprocessing ---------------------------------------------------------------------------------------------
PRE_PY = '''
import json
from pathlib import Path

import numpy as np

LOG = Path(__file__).with_name("calls.jsonl")


def load_sample(path_list, input_parametr):
    """xquant signature: a list of file paths and the input's parameters; returns the input array."""
    with LOG.open("a") as f:
        f.write(json.dumps({"paths": list(path_list), "params": {k: v for k, v in input_parametr.items()}}) + "\\n")
    arr = np.load(path_list[0]).astype(np.float32)
    return np.full(input_parametr["input_shape"], 7.0, np.float32) + 0 * arr.reshape(input_parametr["input_shape"])
'''


def test_custom_preprocess_file_is_called(tmp_path, monkeypatch):
    p1, p2 = npy_inputs(tmp_path, n=3)
    (tmp_path / "pre.py").write_text(PRE_PY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "pre.py" is found beside the config (base_dir), not in the working directory
    p1 = {**p1, "preprocess_file": "pre.py:load_sample", "mean_value": [1.0, 2.0, 3.0]}
    ws = prepare(two_input_cfg(tmp_path, [p1, p2]), progress=False)
    assert ws.stats.tensors["x1"].min == ws.stats.tensors["x1"].max == 7.0  # what the function returned
    assert ws.stats.tensors["x2"].min < 0 < ws.stats.tensors["x2"].max  # untouched input
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3
    assert [c["paths"] for c in calls] == [[str(tmp_path / "d1" / f"s_{i:03d}.npy")] for i in range(3)]
    assert calls[0]["params"]["input_shape"] == X1_SHAPE
    assert calls[0]["params"]["mean_value"] == [1.0, 2.0, 3.0]
    assert calls[0]["params"]["file_type"] == "npy"


def test_custom_preprocess_errors(tmp_path):
    (tmp_path / "pre.py").write_text(PRE_PY)
    (tmp_path / "broken.py").write_text("import numpy as np\nthis is not python\n")
    p1, p2 = npy_inputs(tmp_path, n=1)
    for spec, msg in (("pre.py:nope", "has no function 'nope'"), ("missing.py:f", "missing.py not found"),
                      ("broken.py:f", "failed to import")):
        with pytest.raises(SensqError, match=msg):
            prepare(two_input_cfg(tmp_path, [{**p1, "preprocess_file": spec}, p2]), progress=False)
    with pytest.raises(SensqError, match="neither a preset"):
        InputParams(preprocess_file="pre.py")


def test_presets(tmp_path):
    assert InputParams(preprocess_file="imagenet").preprocess_file == "IMAGENET"
    assert InputParams(preprocess_file="pt_imagenet").preprocess_file == "PT_IMAGENET"
    assert InputParams(preprocess_file="").preprocess_file is None
    pre = image_preprocess_for(InputParams(preprocess_file="PT_IMAGENET"), [1, 3, 8, 8], yolo=False)
    assert (pre.resize, pre.color_format, pre.mean, pre.std) == ("imagenet", "rgb", TORCH_MEAN, TORCH_STD)
    pre = image_preprocess_for(InputParams(preprocess_file="IMAGENET", mean_value=[1, 2, 3], std_value=[4, 5, 6]), [1, 3, 8, 8], yolo=False)
    assert (pre.resize, pre.color_format, pre.mean, pre.std) == ("imagenet", "bgr", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    yolo = image_preprocess_for(InputParams(), [1, 3, 640, 640], yolo=True)
    assert (yolo.resize, yolo.color_format, yolo.mean, yolo.std) == ("letterbox", "rgb", [0.0] * 3, [255.0] * 3)
    plain = image_preprocess_for(InputParams(), [1, 3, 8, 8], yolo=False)
    assert (plain.resize, plain.color_format, plain.std) == ("resize", "bgr", [1.0] * 3)
    with pytest.raises(SensqError, match="not an NCHW image"):
        image_preprocess_for(InputParams(), [1, 16], yolo=False)
    # the preset really normalises with the torchvision statistics: a PNG through PT_IMAGENET
    (png,) = write_pngs(tmp_path / "im", n=1, size=(16, 16))
    pre = image_preprocess_for(InputParams(preprocess_file="PT_IMAGENET"), [1, 3, 8, 8], yolo=False)
    x = pre.tensor(png)
    pixels = pre.pixels(png)[0].astype(np.float32)
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(x[0, 1], (pixels[1] - TORCH_MEAN[1]) / TORCH_STD[1], rtol=1e-5, atol=1e-5)


def test_data_free_synthetic(tmp_path):
    conv_relu_conv(tmp_path / "m.onnx")
    cfg = config_from_dict({"model_parameters": {"onnx_model": str(tmp_path / "m.onnx"), "skip_onnxsim": True},
                            "calibration_parameters": {"data_free": True, "seed": 3}})
    cfg.cache_dir = str(tmp_path / "cache")
    model = onnx.load(cfg.model_path)
    a, b = list(SyntheticData(cfg, model, yolo=False)), list(SyntheticData(cfg, model, yolo=False))
    assert len(a) == 32 and a[0]["x"].shape == (1, 3, 8, 8) and a[0]["x"].dtype == np.float32
    assert all(np.array_equal(u["x"], v["x"]) for u, v in zip(a, b))  # same seed, same data
    ws = prepare(cfg, progress=False)
    assert ws.stats.n_samples == 32 and not ws.stats_cached
    assert prepare(cfg, progress=False).stats_cached


# config ------------------------------------------------------------------------------------------------------------
ENTRY = {"mean_value": [1, 2, 3], "std_value": [4, 5, 6], "color_format": "rgb", "data_list_path": "d"}


@pytest.mark.parametrize("key", ["input_parametres", "input_parameters"])
def test_both_spellings_of_input_parameters(key):
    cfg = config_from_dict({"model_parameters": {"onnx_model": "m.onnx"},
                            "calibration_parameters": {key: [ENTRY, {**ENTRY, "file_type": "npy"}]}})
    assert len(cfg.inputs) == 2
    assert cfg.inputs[0] == InputParams(mean_value=[1, 2, 3], std_value=[4, 5, 6], color_format="rgb", data_list_path="d")
    assert cfg.inputs[1].file_type == "npy"


def test_both_spellings_quantize(tmp_path):
    p1, p2 = npy_inputs(tmp_path, n=2)
    outs = []
    for key in ("input_parametres", "input_parameters"):
        cfg = config_from_dict({
            "model_parameters": {"onnx_model": str(two_input_model(tmp_path / "two.onnx")), "skip_onnxsim": True,
                                 "output_prefix": key},
            "calibration_parameters": {key: [p1, p2]},
        })
        cfg.cache_dir = str(tmp_path / "cache")
        outs.append(quantize(cfg, progress=False, analyze=False).output)
    assert outs[0] != outs[1] and all(o.is_file() for o in outs)


@pytest.mark.parametrize("given, expected", [(0.9999, 99.99), (0.999, 99.9), (99.99, 99.99), (99.9, 99.9), (1.0, 100.0)])
def test_max_percentile_fraction_or_percent(given, expected):
    cfg = config_from_dict({"model_parameters": {"onnx_model": "m.onnx"}, "quantization_parameters": {"max_percentile": given}})
    assert cfg.max_percentile == pytest.approx(expected, abs=1e-9)
    assert cfg.to_xquant()["quantization_parameters"]["max_percentile"] == pytest.approx(expected / 100.0, abs=1e-12)


def test_config_defaults_match_xquant():
    cfg = config_from_dict({})
    assert cfg.calibration_step == 100 and cfg.calibration_type == "default"
    assert cfg.max_percentile == pytest.approx(99.99)
    assert cfg.inputs == [] and cfg.truncate_var_names == [] and not cfg.skip_onnxsim


def test_to_xquant_round_trip(tmp_path):
    cfg = config_from_dict({
        "model_parameters": {"onnx_model": "m.onnx", "output_prefix": "p", "working_dir": "w"},
        "calibration_parameters": {"calibration_step": 7, "calibration_type": "kl", "input_parametres": [ENTRY]},
        "quantization_parameters": {"max_percentile": 0.999, "truncate_var_names": ["t"],
                                    "custom_setting": [{"input_names": ["a"], "output_names": ["b"], "precision_level": 1}]},
    })
    again = config_from_dict(json.loads(json.dumps(cfg.to_xquant())))
    for f in ("onnx_model", "output_prefix", "working_dir", "calibration_step", "calibration_type", "max_percentile",
              "truncate_var_names", "inputs", "custom_setting"):
        assert getattr(again, f) == getattr(cfg, f), f


def test_unknown_keys_are_ignored_with_a_warning(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sensq"):
        cfg = config_from_dict({"model_parameters": {"onnx_model": "m.onnx", "colour": 1},
                                "calibration_parameters": {"input_parametres": [{**ENTRY, "bogus": 2}]},
                                "extra_section": {}})
    assert cfg.inputs[0].data_list_path == "d"
    text = caplog.text
    assert "model_parameters.colour" in text and "input_parametres[0].bogus" in text and "extra_section" in text


@pytest.mark.parametrize("data, msg", [
    ({"calibration_parameters": {"calibration_type": "xxx"}}, "calibration_type xxx not implemented"),
    ({"calibration_parameters": {"input_parametres": [{"file_type": "xxx"}]}}, "file_type xxx not implemented"),
    ({"calibration_parameters": {"calibration_step": 0}}, "calibration_step 0 must be >= 1"),
    ({"calibration_parameters": {"input_parametres": {"mean_value": [0]}}}, "must be a list"),
    ({"calibration_parameters": {"input_parametres": [{"dtype": "int8"}]}}, "input dtype int8 not supported"),
    ({"quantization_parameters": {"custom_setting": [{"calibration_type": "yyy"}]}}, "calibration_type yyy not implemented"),
    ({"model_parameters": ["m.onnx"]}, "must be an object"),
])
def test_config_errors(data, msg):
    with pytest.raises(SensqError, match=msg):
        config_from_dict(data)


def test_input_count_mismatch(tmp_path):
    p1, _ = npy_inputs(tmp_path, n=1)
    cfg = two_input_cfg(tmp_path, [p1])
    with pytest.raises(SensqError, match="input_parametres size should equal to model inputs size") as e:
        build_calibration_data(cfg, onnx.load(cfg.model_path), yolo=False)
    assert "config has 1, model has 2 (x1, x2)" in str(e.value)


# shared data: the seed-000 xquant yolov8 config --------------------------------------------------------------------
SEED_000 = {
    "model_parameters": {"onnx_model": "yolov8/model/yolov8n.onnx", "working_dir": "yolov8", "skip_onnxsim": False},
    "calibration_parameters": {"input_parametres": [{"mean_value": [0, 0, 0], "std_value": [255, 255, 255],
                                                     "color_format": "rgb", "data_list_path": "yolov8/data/calib_list.txt"}]},
    "quantization_parameters": {"truncate_var_names": ["/model.22/Reshape_output_0", "/model.22/Reshape_1_output_0",
                                                       "/model.22/Reshape_2_output_0"]},
}
SIX_CUTS = [f"/model.22/Reshape{s}_output_0" for s in ("", "_1", "_2", "_3", "_4", "_5")]


def test_seed_000_yolov8_config_with_six_cuts(tmp_path, yolov8n_random, coco_dir, capfd):
    import copy

    from sensq.cli import main
    from sensq.model import Graph

    images = sorted((coco_dir / "train2017").glob("*.jpg"))[:4]
    assert len(images) == 4
    calib_list = tmp_path / "calib_list.txt"
    calib_list.write_text("".join(f"{p}\n" for p in images))
    cfg = copy.deepcopy(SEED_000)  # adapted only in paths (and the two extra cut pairs below)
    cfg["model_parameters"]["onnx_model"] = str(yolov8n_random)
    cfg["model_parameters"]["working_dir"] = str(tmp_path / "yolov8")
    cfg["calibration_parameters"]["input_parametres"][0]["data_list_path"] = str(calib_list)
    cfg["calibration_parameters"]["calibration_step"] = 4
    cfg["quantization_parameters"]["truncate_var_names"] = SIX_CUTS
    cfg_path = tmp_path / "seed000.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))

    assert main(["quantize", "--config", str(cfg_path), "--no-analysis", "-q"]) == 0
    out, err = capfd.readouterr()
    assert err == "", f"warnings although the six cuts split the graph cleanly: {err}"
    q_path = tmp_path / "yolov8" / "yolov8n-arch-random.q.onnx"
    assert q_path.is_file() and f"wrote {q_path}" in out
    assert list((tmp_path / "env_cache" / "stats").glob("*.npz")), "statistics not cached in SENSQ_CACHE"

    float_model = onnx.load(str(yolov8n_random))
    g = Graph(float_model)
    after = g.downstream(SIX_CUTS)
    produced_after = {o for n in after for o in g.nodes[n].output if o}
    q = onnx.load(str(q_path))
    q_tensors = {o for n in q.graph.node for o in n.output}
    assert len(produced_after & q_tensors) >= 0.9 * len(produced_after), "tensor names changed; the check would be vacuous"
    qdq = qdq_nodes(q)
    assert len(qdq) > 100  # the backbone is quantized
    bad = sorted({n.input[0] for n in qdq} & produced_after)
    assert not bad, f"Q/DQ on tensors after the cut: {bad[:5]}"
    # nodes after the cut read float tensors only (a DQ may feed them only the cut tensors themselves)
    dq_out = {n.output[0]: n.input[0] for n in qdq if n.op_type == "DequantizeLinear"}
    q_after = [n for n in q.graph.node if n.name in after]
    assert len(q_after) >= 0.9 * len(after)
    fed = sorted({dq_out[x] for n in q_after for x in n.input if x in dq_out} - set(SIX_CUTS))
    assert not fed, f"nodes after the cut consume dequantized tensors: {fed[:5]}"
    # and the float decode head still computes: same output shape as the float model
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    (yq,) = run_model(q_path, {"images": x})
    assert yq.shape == (1, 84, 8400)
