"""Per-layer error reports: cumulative rows against a numpy hand computation, the markdown/CSV/PNG outputs and their
flags, the isolated view's Output SNR, and `sensq analyze` (with real and synthetic calibration data)."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from sensq.analysis import cumulative_report, isolated_report
from sensq.cli import main
from sensq.evaluators.layer_error import (RegionErrorProbe, cumulative_errors, isolated_errors, region_output_errors,
                                          region_outputs)
from sensq.reports.layer_report import write_layer_report
from sensq.runtime import make_session
from sensq.statistics import augmented_model

from test_search import PNG_SIGNATURE, make_tiny  # noqa: F401

# In the QDQ model of conv1 -> relu -> conv2, Conv+Relu are fused, so the quantized activations are the input x,
# the relu output r1 and the output y; consumers see them as these dequantized tensors (ORT's QDQ naming).
DEQUANTIZED = {"x": "x_DequantizeLinear_Output", "r1": "r1_DequantizeLinear_Output", "y": "y"}
WEIGHTS = ["w1", "w2", "b1", "b2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("analysis"))


@pytest.fixture(scope="module")
def ws(tiny):
    return tiny.workspace()


@pytest.fixture(scope="module")
def coarse_plan(ws):
    """Ranges clipped at the 60th percentile: large errors on the activations, so some rows are flagged (x by its
    cosine only), while the weights (not affected by the activation method) stay clean."""
    return ws.base_plan.with_float([], method="percentile", percentile=60.0)


def _measures(q: list[np.ndarray], f: list[np.ndarray]) -> dict[str, float]:
    q = np.concatenate([np.asarray(a, np.float64).ravel() for a in q])
    f = np.concatenate([np.asarray(a, np.float64).ravel() for a in f])
    noise = float(np.sum((q - f) ** 2))
    return {"SNR": noise / float(np.sum(f ** 2)), "MSE": noise / f.size,
            "Cosine": float(q @ f / (np.linalg.norm(q) * np.linalg.norm(f)))}


def hand_errors(ws, qmodel: onnx.ModelProto, feeds: list[dict]) -> dict[str, dict[str, float]]:
    """SNR = ||q-f||^2/||f||^2, MSE and cosine over all samples, from the float and QDQ models run with the
    tensors exposed as outputs; weights dequantized by hand from the QDQ initializers."""
    float_model = ws.builder.model
    fsess = make_session(augmented_model(float_model, ["r1", "y"]))
    qsess = make_session(augmented_model(qmodel, list(DEQUANTIZED.values())))
    f_vals = {t: [] for t in DEQUANTIZED}
    q_vals = {t: [] for t in DEQUANTIZED}
    for feed in feeds:
        fo = dict(zip(["r1", "y"], fsess.run(["r1", "y"], feed)))
        fo["x"] = feed["x"]
        qo = dict(zip(DEQUANTIZED.values(), qsess.run(list(DEQUANTIZED.values()), feed)))
        for t, qt in DEQUANTIZED.items():
            f_vals[t].append(fo[t])
            q_vals[t].append(qo[qt])
    out = {t: _measures(q_vals[t], f_vals[t]) for t in DEQUANTIZED}
    q_inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    f_inits = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    for w in WEIGHTS:
        dq = next(n for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{w}_quantized")
        x = q_inits[dq.input[0]].astype(np.float64)
        scale, zp = q_inits[dq.input[1]].astype(np.float64), q_inits[dq.input[2]].astype(np.float64)
        if scale.size > 1:  # per output channel (axis 0)
            shape = (-1,) + (1,) * (x.ndim - 1)
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[f"{w}[Constant]"] = _measures([(x - zp) * scale], [f_inits[w]])
    return out


def _rel_close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


def _md_rows(md: str) -> dict[str, dict[str, str]]:
    """The 'All rows' table of a layer report: Var -> {column header: cell text}."""
    lines = md.split("## All rows", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = dict(zip(header, cells))
        rows[row["Var"]] = row
    return rows


def _is_flagged_by_hand(m: dict) -> bool:
    return m["SNR"] > 0.1 or m["Cosine"] < 0.99


# ------------------------------------------------------------------------------------------------ cumulative
def test_cumulative_rows_match_hand_computation(ws, coarse_plan):
    feeds = ws.samples(4)
    assert len(feeds) == 4
    for plan in (ws.base_plan, coarse_plan):
        qmodel = ws.build(plan)
        df = cumulative_errors(ws.builder.model, qmodel, feeds, progress=False)
        hand = hand_errors(ws, qmodel, feeds)
        assert list(df["Var"]) == ["x", "r1", "y"] + [f"{w}[Constant]" for w in ["w1", "w2", "b1", "b2"]]
        assert list(df["Op"][:3]) == ["x[Input]", "relu[Relu]", "conv2[Conv]"]
        for _, row in df.iterrows():
            h = hand[row["Var"]]
            for col in ("SNR", "MSE", "Cosine"):
                assert _rel_close(row[col], h[col]), (row["Var"], col, row[col], h[col])
            assert _rel_close(row["SQNR_dB"], -10 * np.log10(h["SNR"]))
        # Q.MinMax / F.MinMax of the output row: ranges of the values compared
        y_f = make_session(ws.builder.model).run(["y"], feeds[0])[0]
        fmin, fmax = df.loc[df["Var"] == "y", "F.MinMax"].iloc[0]
        assert fmin <= float(y_f.min()) and fmax >= float(y_f.max())


def test_cumulative_report_markdown_flags_and_png(ws, coarse_plan, tmp_path):
    prefix = tmp_path / "rep" / "tiny.v1"  # a dotted prefix must not be cut by suffix handling
    paths = cumulative_report(ws, prefix, plan=coarse_plan, progress=False)
    assert paths == {ext: tmp_path / "rep" / f"tiny.v1.q_report.{ext}" for ext in ("md", "csv", "png")}
    hand = hand_errors(ws, ws.build(coarse_plan), ws.samples(8))

    md = paths["md"].read_text(encoding="utf-8")
    rows = _md_rows(md)
    assert set(rows) == set(hand)
    for var, h in hand.items():
        for col, fmt in (("SNR", ".4g"), ("MSE", ".4g"), ("Cosine", ".4f")):
            cell = rows[var][col].replace("**", "").replace("⚠", "").strip()
            assert cell == format(h[col], fmt), (var, col, cell, h[col])
    expected_flags = {var for var, h in hand.items() if _is_flagged_by_hand(h)}
    md_flags = {var for var, r in rows.items() if any("⚠" in c for c in r.values())}
    assert md_flags == expected_flags
    # the coarse ranges give flagged and clean rows, and a row flagged by its cosine alone
    assert expected_flags and expected_flags != set(hand)
    cosine_only = {v for v, h in hand.items() if h["Cosine"] < 0.99 and h["SNR"] <= 0.1}
    assert cosine_only
    for v in cosine_only:
        assert "⚠" not in rows[v]["SNR"] and "⚠" in rows[v]["Cosine"]
    assert f"**{len(expected_flags)} of {len(hand)} rows flagged**" in md

    csv = pd.read_csv(paths["csv"])
    assert {v for v, f in zip(csv["Var"], csv["flagged"]) if f} == expected_flags
    for _, r in csv.iterrows():
        assert _rel_close(r["SNR"], hand[r["Var"]]["SNR"])

    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == PNG_SIGNATURE


def test_write_layer_report_direct(ws, tmp_path):
    """The report writer on the plain INT8 model: nothing flagged, values as in the frame."""
    feeds = ws.samples(4)
    df = cumulative_errors(ws.builder.model, ws.build(), feeds, progress=False)
    paths = write_layer_report(df, tmp_path / "plain", "tiny", "cumulative")
    rows = _md_rows(paths["md"].read_text(encoding="utf-8"))
    hand = hand_errors(ws, ws.build(), feeds)
    assert not any(_is_flagged_by_hand(h) for h in hand.values())
    assert not any("⚠" in c for r in rows.values() for c in r.values())
    assert rows["r1"]["Cosine"] == f"{hand['r1']['Cosine']:.4f}"
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------------------------------------ isolated
def test_isolated_report_one_row_per_compute_node(ws, tmp_path):
    t0 = time.perf_counter()
    paths, seconds = isolated_report(ws, tmp_path / "iso", progress=False)
    elapsed = time.perf_counter() - t0
    assert 0 < seconds <= elapsed  # the report's own time, in seconds, measured inside the call
    assert paths["md"].name == "iso.isolated_report.md"
    df = pd.read_csv(paths["csv"])
    assert sorted(df["Op"]) == ["conv1[Conv]", "conv2[Conv]"]  # compute nodes only (Relu is not one)
    assert list(df["Output SNR"]) == sorted(df["Output SNR"], reverse=True)

    feeds = ws.samples(8)
    fsess = make_session(ws.builder.model)
    hand = {}
    for node in ("conv1", "conv2"):
        others = set(ws.builder.node_names) - {node}
        qsess = make_session(ws.builder.build(ws.base_plan.with_float(others)))
        f = [fsess.run(None, feed)[0] for feed in feeds]
        q = [qsess.run(None, feed)[0] for feed in feeds]
        h = hand[node] = _measures(q, f)
        row = df[df["Op"] == f"{node}[Conv]"].iloc[0]
        assert _rel_close(row["Output SNR"], h["SNR"]), (node, row["Output SNR"], h["SNR"])
        assert _rel_close(row["Output Cosine"], h["Cosine"])
        assert row["Var"] == ws.graph.nodes[node].output[0]
    md = paths["md"].read_text(encoding="utf-8")
    assert "Isolated view" in md and "2 unit(s) analysed" in md
    rows = _md_rows(md)
    for _, r in df.iterrows():
        # four significant digits: an error ratio of 1e-5 must not print as 0.0000
        assert rows[r["Var"]]["Output SNR"].replace("**", "").replace("⚠", "").strip() == f"{r['Output SNR']:.4g}"
    # one column per measure: no "SNR" column repeating Output SNR
    assert "SNR" not in df.columns and "SNR" not in next(iter(rows.values()))
    assert "measured at the model outputs: `y`" in md
    # conv1 reads the model input: the report says where it ranks (1 = largest Output SNR)
    rank = 1 + (hand["conv2"]["SNR"] > hand["conv1"]["SNR"])
    assert f"first layers (reading a model input): `conv1` Output SNR {hand['conv1']['SNR']:.4g} (rank {rank} of 2)" in md
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE


def _plain_run(model: onnx.ModelProto, names: list[str], feed: dict) -> list[np.ndarray]:
    """onnxruntime with the tensors added as graph outputs by hand (no sensq helper)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return make_session(m).run(names, feed)


def test_isolated_error_is_measured_where_the_quantized_region_ends(ws):
    """With conv2 kept float (a float 'head'), conv1's isolated error is measured at conv2's input r1."""
    model = ws.builder.model
    assert region_outputs(model, []) == ["y"]
    assert region_outputs(model, ["conv2"]) == ["r1"]
    assert region_outputs(model, ["relu"]) == ["y"]  # a float node mid-graph is not where the quantized region ends
    plan = ws.base_plan.with_float(["conv2"])
    feeds = ws.samples(4)
    df = isolated_errors(ws.builder, plan, {"conv1": ["conv1"]}, feeds, model, progress=False)
    qmodel = ws.builder.build(plan.with_float(set(ws.builder.node_names) - {"conv1"}))
    f = [_plain_run(model, ["r1"], feed)[0] for feed in feeds]
    q = [_plain_run(qmodel, ["r1"], feed)[0] for feed in feeds]
    h = _measures(q, f)
    assert h["SNR"] > 0
    assert _rel_close(df["Output SNR"].iloc[0], h["SNR"]) and _rel_close(df["Output Cosine"].iloc[0], h["Cosine"])

    # the probe on the fully quantized model reads r1 after its DequantizeLinear (what conv2 reads) and y
    full = ws.build()
    probe = RegionErrorProbe(model, [], feeds, tensors=["r1", "y"])
    got = probe(full)
    qf = [_plain_run(full, [DEQUANTIZED["r1"], "y"], feed) for feed in feeds]
    ff = [_plain_run(model, ["r1", "y"], feed) for feed in feeds]
    for i, t in enumerate(["r1", "y"]):
        assert _rel_close(got["per_tensor"][t], _measures([a[i] for a in qf], [a[i] for a in ff])["SNR"]), t
    both = _measures([a[i] for a in qf for i in range(2)], [a[i] for a in ff for i in range(2)])
    assert _rel_close(got["Output SNR"], both["SNR"]) and _rel_close(got["Output Cosine"], both["Cosine"])
    assert region_output_errors(model, full, feeds, tensors=["r1", "y"])["Output SNR"] == got["Output SNR"]


def test_yolov5n_region_outputs_are_the_decode_inputs(yolov5n_ws):
    """yolov5n with its decode float: errors are measured at the three detection convs' outputs (box/objectness/class
    logits; the convs are float head layers, so they carry the features' error there), not at the decoded 1x25200x85
    output whose box pixels (0-640) would outweigh the class scores. (The session's yolov5n workspace: default
    config, calibrated on train2017; this test only reads it.)"""
    ws = yolov5n_ws
    assert ws.head_layers == {f"/model.24/m.{i}/Conv" for i in range(3)} <= set(ws.base_plan.float_nodes)
    tensors = region_outputs(ws.builder.model, ws.probe_float_nodes())
    assert tensors == [f"/model.24/m.{i}/Conv_output_0" for i in range(3)]
    got = RegionErrorProbe(ws.builder.model, ws.probe_float_nodes(), ws.samples(1))(ws.build())
    assert set(got["per_tensor"]) == set(tensors)
    assert all(0 < v < 1 for v in got["per_tensor"].values()) and 0 < got["Output SNR"] < 1


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_analyze_writes_both_reports(tiny, tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["analyze", *tiny.model_args(), "-o", str(out), "-q"]) == 0
    for kind in ("q_report", "isolated_report"):
        for ext in ("md", "csv", "png"):
            f = out / f"m.{kind}.{ext}"
            assert f.is_file() and f.stat().st_size > 0, f
    assert "Cumulative view" in (out / "m.q_report.md").read_text(encoding="utf-8")
    assert "Isolated view" in (out / "m.isolated_report.md").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert "cumulative md:" in printed and "isolated md:" in printed
    cum = pd.read_csv(out / "m.q_report.csv")
    assert set(cum["Var"]) >= {"x", "r1", "y"}


def test_cli_analyze_data_free(tiny, tmp_path):
    out = tmp_path / "df"
    assert main(["analyze", "-m", str(tiny.model), "--data-free", "-o", str(out), "-q"]) == 0
    for kind in ("q_report", "isolated_report"):
        md = (out / f"m.{kind}.md").read_text(encoding="utf-8")
        assert "data-free mode" in md, kind
    # the real-data report does not say so
    assert main(["analyze", *tiny.model_args(), "--view", "cumulative", "-o", str(tmp_path / "real"), "-q"]) == 0
    assert "data-free" not in (tmp_path / "real" / "m.q_report.md").read_text(encoding="utf-8")
    assert not (tmp_path / "real" / "m.isolated_report.md").exists()  # --view cumulative
    csv = pd.read_csv(out / "m.q_report.csv")
    assert len(csv) == 7 and np.isfinite(csv["SNR"]).all()


def test_reports_show_raw_pixel_input_and_first_layer(tmp_path):
    """A model fed raw 0-255 pixels (mean 0, std 1, no normalisation in the graph): both reports state the input
    range and the overflow fix in use, the isolated report where the first layer ranks."""
    import cv2

    from sensq.config import config_from_dict
    from sensq.quantize import prepare
    from sensq.targets import cpu_needs_reduced_range
    from tiny_models import conv_relu_conv

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(12)
    for i in range(3):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img[0, 0], img[0, 1] = 0, 255
        cv2.imwrite(str(calib / f"{i}.png"), img)
    cfg = config_from_dict({
        "model_parameters": {"onnx_model": str(conv_relu_conv(tmp_path / "m.onnx")), "working_dir": str(tmp_path / "out"),
                             "skip_onnxsim": True},
        "calibration_parameters": {"calibration_step": 3, "input_parametres": [
            {"mean_value": [0, 0, 0], "std_value": [1, 1, 1], "color_format": "bgr", "data_list_path": str(calib)}]},
        "quantization_parameters": {"analysis_enable": False}})
    cfg.cache_dir = str(tmp_path / "cache")
    ws = prepare(cfg, progress=False)
    assert (ws.stats.tensors["x"].min, ws.stats.tensors["x"].max) == (0.0, 255.0)
    iso, _ = isolated_report(ws, tmp_path / "raw", n_samples=3, progress=False)
    cum = cumulative_report(ws, tmp_path / "raw", n_samples=3, progress=False)
    fix = "first_layer" if cpu_needs_reduced_range() else "none"
    for md in (iso["md"].read_text(encoding="utf-8"), cum["md"].read_text(encoding="utf-8")):
        assert "model input `x` observed range [0, 255] (raw 0-255 values" in md
        assert f"1 first layer(s) read a model input; overflow_fix={fix}" in md
    df = pd.read_csv(iso["csv"])
    snr = dict(zip(df["Op"], df["Output SNR"]))
    rank = 1 + (snr["conv2[Conv]"] > snr["conv1[Conv]"])
    assert f"`conv1` Output SNR {snr['conv1[Conv]']:.4g} (rank {rank} of 2)" in iso["md"].read_text(encoding="utf-8")
