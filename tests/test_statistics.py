"""Calibration statistics: the on-disk cache (hit without inference, invalidation), save/load round trip."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import sensq.runtime as sruntime
import sensq.statistics as sstats
from sensq.config import config_from_dict
from sensq.statistics import CalibrationStats, TensorStats, augmented_model, float_activation_names, stats_key

from tiny_models import conv_relu_conv, write_arrays, write_pngs

# `sensq.quantize` is also the name of the quantize() function re-exported by sensq/__init__.py, which shadows the
# submodule as an attribute of the package: fetch the module itself.
squant = importlib.import_module("sensq.quantize")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSQ_CACHE", str(tmp_path / "env_cache"))  # nothing may touch the user's cache


def make_cfg(tmp_path: Path, calib: Path, mean=(0.0, 0.0, 0.0), skip_onnxsim=False, **calib_extra):
    model = tmp_path / "m.onnx"
    if not model.exists():
        conv_relu_conv(model)
    cfg = config_from_dict({
        "model_parameters": {"onnx_model": str(model), "working_dir": str(tmp_path / "out"), "skip_onnxsim": skip_onnxsim},
        "calibration_parameters": {"calibration_step": 10, "input_parametres": [
            {"mean_value": list(mean), "std_value": [255.0, 255.0, 255.0], "color_format": "rgb",
             "data_list_path": str(calib), **calib_extra}]},
        "quantization_parameters": {"analysis_enable": False},
    })
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


class Counter:
    """Wraps the real collect() and counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return sstats.collect(*args, **kwargs)


def _forbid(*args, **kwargs):
    raise AssertionError("inference ran although the statistics were cached")


def cache_files(cfg) -> list[Path]:
    return sorted((Path(cfg.cache_dir) / "stats").glob("*.npz"))


def test_second_prepare_hits_cache_without_inference(tmp_path, monkeypatch):
    imgs = write_pngs(tmp_path / "calib", n=3)
    cfg = make_cfg(tmp_path, tmp_path / "calib")
    ws1 = squant.prepare(cfg, progress=False)
    assert not ws1.stats_cached
    assert ws1.stats.n_samples == len(imgs)
    files = cache_files(cfg)
    assert len(files) == 1
    assert not (Path(os.environ["SENSQ_CACHE"])).exists(), "cache_dir from the config must win over SENSQ_CACHE"

    monkeypatch.setattr(squant, "collect", _forbid)
    monkeypatch.setattr(sstats, "collect", _forbid)
    monkeypatch.setattr(sruntime, "make_session", _forbid)
    ws2 = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert ws2.stats_cached
    assert ws2.calibration_seconds == 0.0
    assert ws2.stats.key == ws1.stats.key
    assert set(ws2.stats.tensors) == set(ws1.stats.tensors)
    for name, st in ws1.stats.tensors.items():
        assert ws2.stats.tensors[name].min == st.min and ws2.stats.tensors[name].max == st.max
        assert np.array_equal(ws2.stats.tensors[name].hist, st.hist)
    assert cache_files(cfg) == files
    # the cached workspace still builds a QDQ model
    q = ws2.build()
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_input_stats_match_the_preprocessed_images(tmp_path):
    """The observed input range is what the preprocessing makes of the pixels: (p - mean) / std."""
    import cv2

    imgs = write_pngs(tmp_path / "calib", n=2, size=(8, 8))
    cfg = make_cfg(tmp_path, tmp_path / "calib", mean=(10.0, 10.0, 10.0), skip_onnxsim=True)
    ws = squant.prepare(cfg, progress=False)
    pixels = np.stack([cv2.imread(str(p)) for p in imgs]).astype(np.float32)  # 8x8 already: no resize
    st = ws.stats.tensors["x"]
    assert st.min == pytest.approx((pixels.min() - 10.0) / 255.0, abs=1e-6)
    assert st.max == pytest.approx((pixels.max() - 10.0) / 255.0, abs=1e-6)
    assert ws.stats.n_samples == 2


def _counting(monkeypatch) -> Counter:
    c = Counter()
    monkeypatch.setattr(squant, "collect", c)
    return c


def test_changed_file_content_and_mtime_recalibrates(tmp_path, monkeypatch):
    imgs = write_pngs(tmp_path / "calib", n=3)
    counter = _counting(monkeypatch)
    squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 1
    squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 1  # unchanged: cache hit

    # new content (and a later mtime): recalibrate
    write_pngs(tmp_path / "calib", n=3, seed=99)
    st = imgs[0].stat()
    os.utime(imgs[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    ws = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 2 and not ws.stats_cached

    # same bytes, only a later mtime: still treated as changed (no content hashing), recalibrate
    st = imgs[1].stat()
    os.utime(imgs[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    ws = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 3 and not ws.stats_cached

    # an added file changes the data set: recalibrate
    write_pngs(tmp_path / "extra", n=1, seed=5)[0].rename(tmp_path / "calib" / "zzz.png")
    ws = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 4 and ws.stats.n_samples == 4
    assert len(cache_files(make_cfg(tmp_path, tmp_path / "calib"))) == 4


def test_same_size_rewrite_within_the_same_second_recalibrates(tmp_path, monkeypatch):
    """Fixed-size calibration files (.npy/.raw) rewritten with new values keep their size; if the rewrite lands in
    the same wall-clock second as the previous write, int(st_mtime) is unchanged and the stale statistics are reused."""
    model = tmp_path / "m.onnx"
    conv_relu_conv(model)
    (f,) = write_arrays(tmp_path / "npy", [1, 3, 8, 8], n=1, seed=0)
    t0 = 1_700_000_000 * 10**9  # a whole second
    os.utime(f, ns=(t0, t0 + 100_000_000))

    def cfg():
        c = make_cfg(tmp_path, tmp_path / "npy", file_type="npy")
        return c

    counter = _counting(monkeypatch)
    ws1 = squant.prepare(cfg(), progress=False)
    np.save(f, np.full((1, 3, 8, 8), 50.0, np.float32))  # same size, very different values
    os.utime(f, ns=(t0, t0 + 600_000_000))  # later mtime, same second
    ws2 = squant.prepare(cfg(), progress=False)
    assert counter.calls == 2, "changed calibration file (same size, same second) reused stale cached statistics"
    assert ws2.stats.tensors["x"].max == 50.0 != ws1.stats.tensors["x"].max


def test_changed_preprocessing_recalibrates(tmp_path, monkeypatch):
    write_pngs(tmp_path / "calib", n=2)
    counter = _counting(monkeypatch)
    ws0 = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    ws1 = squant.prepare(make_cfg(tmp_path, tmp_path / "calib", mean=(128.0, 128.0, 128.0)), progress=False)
    assert counter.calls == 2 and not ws1.stats_cached
    assert ws1.stats.key != ws0.stats.key
    # the new mean really shifted the observed input range by 128/255
    assert ws1.stats.tensors["x"].min == pytest.approx(ws0.stats.tensors["x"].min - 128.0 / 255.0, abs=1e-6)
    # colour order is part of the key too
    ws2 = squant.prepare(make_cfg(tmp_path, tmp_path / "calib", color_format="bgr"), progress=False)
    assert counter.calls == 3 and ws2.stats.key not in (ws0.stats.key, ws1.stats.key)
    # and going back to the first settings hits the first cache entry
    ws3 = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 3 and ws3.stats_cached and ws3.stats.key == ws0.stats.key


def test_calibration_step_is_part_of_the_key(tmp_path, monkeypatch):
    write_pngs(tmp_path / "calib", n=3)
    counter = _counting(monkeypatch)
    cfg = make_cfg(tmp_path, tmp_path / "calib")
    cfg.calibration_step = 2
    ws = squant.prepare(cfg, progress=False)
    assert ws.stats.n_samples == 2
    cfg = make_cfg(tmp_path, tmp_path / "calib")
    cfg.calibration_step = 3
    ws = squant.prepare(cfg, progress=False)
    assert counter.calls == 2 and ws.stats.n_samples == 3


def test_unreadable_cache_file_recalibrates(tmp_path, monkeypatch):
    write_pngs(tmp_path / "calib", n=2)
    cfg = make_cfg(tmp_path, tmp_path / "calib")
    counter = _counting(monkeypatch)
    squant.prepare(cfg, progress=False)
    (path,) = cache_files(cfg)
    path.write_bytes(b"not an npz")
    ws = squant.prepare(make_cfg(tmp_path, tmp_path / "calib"), progress=False)
    assert counter.calls == 2 and not ws.stats_cached
    assert CalibrationStats.load(path).key == ws.stats.key  # rewritten with good content


def test_save_load_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    a = TensorStats()
    a.update(rng.standard_normal(1000).astype(np.float32) * 3)
    b = TensorStats()
    b.update(np.array([1e-3, 2e-3], np.float32))
    tensors = {"/model.0/conv/Conv_output_0": a, "b": b, "empty_hist": TensorStats(min=-1.0, max=1.0, scale=2.0, count=0)}
    cs = CalibrationStats(tensors=tensors, key="abc123", n_samples=7)
    path = tmp_path / "sub" / "s.npz"
    cs.save(path)
    assert path.is_file() and not list(path.parent.glob("*.tmp.npz"))
    back = CalibrationStats.load(path)
    assert back.key == "abc123" and back.n_samples == 7
    assert set(back.tensors) == set(tensors)
    for name, st in tensors.items():
        got = back.tensors[name]
        assert (got.min, got.max, got.scale, got.count) == (st.min, st.max, st.scale, st.count)
        assert got.hist.dtype == np.int64 and np.array_equal(got.hist, st.hist)
    # a loaded stats keeps accumulating exactly like the original
    x = np.array([5.0, -9.0], np.float32)
    back.tensors["b"].update(x)
    b.update(x)
    assert np.array_equal(back.tensors["b"].hist, b.hist) and back.tensors["b"].scale == b.scale


def test_save_load_empty(tmp_path):
    CalibrationStats(tensors={}, key="k", n_samples=0).save(tmp_path / "e.npz")
    back = CalibrationStats.load(tmp_path / "e.npz")
    assert back.tensors == {} and back.key == "k"


def test_stats_key_depends_on_every_part():
    k = stats_key(b"model", "data")
    assert k == stats_key(b"model", "data") and len(k) == 24
    assert len({k, stats_key(b"model2", "data"), stats_key(b"model", "data2"), stats_key(b"model", "data", "x")}) == 4


def test_float_activation_names_and_augmented_model(tmp_path):
    model = onnx.load(str(conv_relu_conv(tmp_path / "m.onnx")))
    names = float_activation_names(model)
    assert names == ["x", "c1", "r1", "y"]
    aug = augmented_model(model, names)
    assert [o.name for o in aug.graph.output] == ["y", "x", "c1", "r1"]
    assert [o.name for o in model.graph.output] == ["y"], "augmented_model must not modify its input"


def _run_with_outputs(model: onnx.ModelProto, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Plain onnxruntime with the tensors added as graph outputs (no sensq code involved)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in {o.name for o in m.graph.output})
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed)))


def _hand_histogram(values: np.ndarray) -> tuple[float, np.ndarray]:
    """Histogram of |x| per sign over [0, R), R the smallest power of two above max|x|, binned with np.histogram."""
    H = sstats.BINS_PER_SIGN
    v = values.astype(np.float64).ravel()
    scale = float(2.0 ** (np.floor(np.log2(np.abs(v).max())) + 1))
    pos, _ = np.histogram(v[v >= 0], bins=H, range=(0.0, scale))
    neg, _ = np.histogram(-v[v < 0], bins=H, range=(0.0, scale))
    return scale, np.concatenate([pos, neg])


def test_collect_observes_every_activation(tmp_path):
    model = onnx.load(str(conv_relu_conv(tmp_path / "m.onnx")))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    cs = sstats.collect(model, iter(feeds), 3, progress=False)
    assert cs.n_samples == 3
    assert set(cs.tensors) == {"x", "c1", "r1", "y"}
    # every tensor against its values from plain onnxruntime, histogrammed by np.histogram
    values = {t: [] for t in ("x", "c1", "r1", "y")}
    for feed in feeds:
        out = _run_with_outputs(model, ["c1", "r1", "y"], feed)
        out["x"] = feed["x"]
        for t in values:
            values[t].append(out[t])
    for t, vs in values.items():
        v = np.concatenate([a.ravel() for a in vs])
        st = cs.tensors[t]
        assert (st.min, st.max, st.count) == (float(v.min()), float(v.max()), v.size), t
        scale, hist = _hand_histogram(v)
        assert st.scale == scale, t
        assert np.array_equal(st.hist, hist), t
    assert np.array_equal(np.maximum(np.concatenate([a.ravel() for a in values["c1"]]), 0),
                          np.concatenate([a.ravel() for a in values["r1"]]))  # the reference itself is sane


def _relu_model(path: Path, shape: tuple[int, ...]) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _shares(st: TensorStats, labels: np.ndarray) -> np.ndarray:
    """Share of the sampled values per label, for a tensor whose values are the labels (small integers)."""
    counts = np.array([st.hist[int(v * sstats.BINS_PER_SIGN / st.scale)] for v in labels], np.float64)
    return counts / st.hist.sum()


@pytest.mark.parametrize("shape,axis", [((1, 3, 80, 80, 85), -1), ((1, 224, 224, 3), -1), ((1, 16, 160, 160), 1)])
def test_sample_covers_every_channel_and_column(tmp_path, shape, axis):
    """A tensor whose value is its index along one axis: every index must be sampled about equally often, by the
    observer graph (activations) and by the numpy path (model inputs) alike.

    The old stride (size / SAMPLE_CAP rounded up) aliased: 25 on 1x3x80x80x85 saw every 5th of the 85 columns,
    3 on 1x224x224x3 (NHWC RGB) saw one channel."""
    n = shape[axis]
    index = np.arange(n, dtype=np.float32).reshape([-1 if a == (axis % len(shape)) else 1 for a in range(len(shape))])
    x = np.broadcast_to(index + 1.0, shape).astype(np.float32)  # values 1..n (0 would share a bin with nothing else)
    assert x.size > 2 * sstats.SAMPLE_CAP
    cs = sstats.collect(_relu_model(tmp_path / "m.onnx", shape), iter([{"x": x}]), 1, progress=False)
    labels = np.arange(1, n + 1, dtype=np.float64)
    for name in ("x", "y"):  # x: the feed (numpy sample), y: the Relu output (in-graph sample)
        st = cs.tensors[name]
        assert st.count == x.size and st.hist.sum() <= sstats.SAMPLE_CAP
        shares = _shares(st, labels)
        assert shares.sum() == pytest.approx(1.0)  # every sampled value is one of the labels
        assert shares.min() > 0.9 / n and shares.max() < 1.1 / n, (name, shares.min() * n, shares.max() * n)


def test_observer_graph_sample_is_the_numpy_sample(tmp_path):
    """The in-graph Reshape/Slice sample and sample_values() pick the same values (by position, on random data)."""
    shape = (1, 3, 80, 80, 85)
    obs, plan = sstats.observer_model(_relu_model(tmp_path / "m.onnx", shape), ["y"])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    mn, mx, sample, size = plan["y"]
    got = _run_with_outputs(obs, [mn, mx, sample], {"x": x})
    y = np.maximum(x, 0).ravel()
    assert size == y.size and float(got[mn]) == y.min() and float(got[mx]) == y.max()
    assert np.array_equal(got[sample].ravel(), sstats.sample_values(y))
    # by hand: 1632000 = 2^8 * 3 * 5^3 * 17 values; 1632000 / 65536 -> 25 shares 5, 26 and 28 share 2, 27 shares 3: 29
    assert sstats.sample_step(y.size) == 29
    assert np.array_equal(got[sample], y[::29]) and got[sample].size == 56276
