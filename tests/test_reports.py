"""Report rendering: numbers in the markdown, flags in md and csv, csv round trip, valid PNGs, Pareto front, top-k."""
from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from sensq.evaluators.measure import compare
from sensq.reports.layer_report import flagged, write_layer_report
from sensq.reports.plots import shorten_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path, min_side: int = 150) -> tuple[int, int]:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert min_side <= h <= 8000 and min_side <= w <= 8000
    return h, w


def md_table(md: str) -> list[dict[str, str]]:
    """Rows of the '## All rows' table as {header: cell}."""
    lines = md.split("## All rows", 1)[1].strip().splitlines()
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows.append(dict(zip(headers, cells)))
    return rows


# Tiny tensors whose measures are worked out by hand:
#   A  f=[1,2,2] q=[1,2,3]      SNR 1/9 = 0.1111 (flag)  MSE 1/3 = 0.3333  cos 11/(3*sqrt(14)) = 0.9800 (flag)
#   B  f=[3,4]   q=[3,4]        SNR 0                    MSE 0             cos 1
#   C  f=[1,0,0,0] q=[1,.3,0,0] SNR .09/1 = 0.0900       MSE .09/4 = 0.0225 cos 1/sqrt(1.09) = 0.9578 (flag)
#   D  f=[2,0]   q=[2,.2]       SNR .04/4 = 0.0100       MSE .04/2 = 0.0200 cos 4/(2*sqrt(4.04)) = 0.9950
TENSORS = {
    "A": ([1, 2, 2], [1, 2, 3]),
    "B": ([3, 4], [3, 4]),
    "C": ([1, 0, 0, 0], [1, 0.3, 0, 0]),
    "D": ([2, 0], [2, 0.2]),
}


@pytest.fixture
def small_df() -> pd.DataFrame:
    rows = []
    for name, (f, q) in TENSORS.items():
        op = f"/model.{name}/conv/Conv[Conv]"
        var = f"model.{name}.weight[Constant]" if name == "B" else f"/model.{name}/conv/Conv_output_0"
        rows.append({"Op": op, "Var": var, **compare(np.array(q, float), np.array(f, float))})
    return pd.DataFrame(rows)


def test_markdown_numbers_match_hand_computation(small_df, tmp_path):
    paths = write_layer_report(small_df, tmp_path / "m", "tiny", "cumulative")
    assert paths["md"] == tmp_path / "m.q_report.md"
    md = paths["md"].read_text(encoding="utf-8")
    assert "|  | Op | Var | SNR | SQNR dB | MSE | Cosine | Q.MinMax | F.MinMax | F.Hist |" in md
    rows = md_table(md)
    assert len(rows) == 4
    a, b, c, d = rows
    assert a["SNR"] == f"**{1 / 9:.4f}** ⚠" == "**0.1111** ⚠"
    assert a["MSE"] == "0.3333"  # four significant digits
    assert a["Cosine"] == f"**{11 / (3 * math.sqrt(14)):.4f}** ⚠" == "**0.9800** ⚠"
    assert a["SQNR dB"] == f"{10 * math.log10(9):.2f}"
    assert a["Q.MinMax"] == "1.000,3.000" and a["F.MinMax"] == "1.000,2.000"
    assert a["F.Hist"] == ",".join(["1"] + ["0"] * 30 + ["2"])
    assert (b["SNR"], b["MSE"], b["Cosine"], b["SQNR dB"]) == ("0", "0", "1.0000", "inf")
    assert b["Var"] == "model.B.weight[Constant]"
    assert (c["SNR"], c["MSE"]) == ("0.09", "0.0225")
    assert c["Cosine"] == f"**{1 / math.sqrt(1.09):.4f}** ⚠" == "**0.9578** ⚠"
    assert (d["SNR"], d["MSE"], d["Cosine"]) == ("0.01", "0.02", f"{4 / (2 * math.sqrt(4.04)):.4f}")
    assert "**2 of 4 rows flagged**" in md
    assert "noise-to-signal" in md and "0.1" in md and "0.99" in md


def threshold_df() -> pd.DataFrame:
    return pd.DataFrame({
        "Op": [f"/n{i}/Conv[Conv]" for i in range(7)],
        "Var": [f"/n{i}/Conv_output_0" for i in range(7)],
        "SNR": [0.1, 0.0999, 0.1001, 0.05, math.inf, math.nan, 0.02],
        "Cosine": [0.99, 0.9899, 0.995, 0.9901, 1.0, 0.98, 0.999],
        "Q.MinMax": [(-1.0, 1.0)] * 7,
        "F.MinMax": [(-1.25, 1.5)] * 7,
        "F.Hist": [list(range(32))] * 7,
    })


EXPECTED_SNR_FLAG = [False, False, True, False, True, False, False]  # strictly > 0.1; NaN never flagged, inf is
EXPECTED_COS_FLAG = [False, True, False, False, False, True, False]  # strictly < 0.99


def test_flags_agree_between_md_and_csv_at_thresholds(tmp_path):
    df = threshold_df()
    expected = [s or c for s, c in zip(EXPECTED_SNR_FLAG, EXPECTED_COS_FLAG)]
    assert list(flagged(df, 0.1, 0.99)) == expected
    paths = write_layer_report(df, tmp_path / "t", "thresholds", "cumulative")
    rows = md_table(paths["md"].read_text(encoding="utf-8"))
    assert [r["SNR"].endswith("⚠") for r in rows] == EXPECTED_SNR_FLAG
    assert [r["Cosine"].endswith("⚠") for r in rows] == EXPECTED_COS_FLAG
    assert rows[0]["SNR"] == "0.1" and rows[2]["SNR"] == "**0.1001** ⚠"
    assert rows[4]["SNR"] == "**inf** ⚠"
    csv = pd.read_csv(paths["csv"])
    assert list(csv["SNR_flag"]) == EXPECTED_SNR_FLAG
    assert list(csv["Cosine_flag"]) == EXPECTED_COS_FLAG
    assert list(csv["flagged"]) == expected


def test_custom_thresholds(tmp_path):
    df = threshold_df()
    # SNR > 0.04 now also catches 0.05, 0.0999 and 0.1; Cosine < 0.9 catches nothing.
    assert list(flagged(df, 0.04, 0.9)) == [True, True, True, True, True, False, False]
    paths = write_layer_report(df, tmp_path / "c", "custom", "cumulative", snr_threshold=0.04, cosine_threshold=0.9)
    rows = md_table(paths["md"].read_text(encoding="utf-8"))
    assert [r["SNR"].endswith("⚠") for r in rows] == [True, True, True, True, True, False, False]
    assert not any(r["Cosine"].endswith("⚠") for r in rows)


def test_csv_round_trips(small_df, tmp_path):
    paths = write_layer_report(small_df, tmp_path / "r", "tiny", "cumulative")
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns[:11]) == ["Op", "Var", "SNR", "SQNR_dB", "MSE", "Cosine", "Q.Min", "Q.Max", "F.Min",
                                      "F.Max", "F.Hist"]
    assert list(csv["Op"]) == list(small_df["Op"]) and list(csv["Var"]) == list(small_df["Var"])
    for col in ("SNR", "SQNR_dB", "MSE", "Cosine"):
        assert csv[col].tolist() == small_df[col].tolist()  # exact: pandas writes full precision, inf included
    assert csv["Q.Min"].tolist() == [t[0] for t in small_df["Q.MinMax"]]
    assert csv["F.Max"].tolist() == [t[1] for t in small_df["F.MinMax"]]
    assert [list(map(int, s.split(" "))) for s in csv["F.Hist"]] == list(small_df["F.Hist"])
    assert csv["SNR_flag"].dtype == bool and csv["Cosine_flag"].dtype == bool
    assert list(csv["SNR_flag"]) == [True, False, False, False]
    assert list(csv["Cosine_flag"]) == [True, False, True, False]


def test_isolated_view_and_missing_columns(tmp_path):
    df = pd.DataFrame({
        "Op": ["/a/Conv[Conv]", "/b/Conv[Conv]", "/c/Conv[Conv]"],
        "Var": ["/a/out", "/b/out", "/c/out"],
        "Output SNR": [0.1, 0.1001, 0.02],
        "Output Cosine": [0.95, 0.999, 0.999],
        "SNR": [0.01, 0.01, 0.5],
        "Scale": [0.5, 0.25, 0.125],
    })
    paths = write_layer_report(df, tmp_path / "iso", "isolated", "isolated", notes=["only one layer quantized"])
    assert paths == {"md": tmp_path / "iso.isolated_report.md", "csv": tmp_path / "iso.isolated_report.csv",
                     "png": tmp_path / "iso.isolated_report.png"}
    md = paths["md"].read_text(encoding="utf-8")
    assert "|  | Op | Var | SNR | Output SNR | Output Cosine | Scale |" in md  # xquant order, then extras
    assert "- only one layer quantized" in md
    rows = md_table(md)
    assert [r["Output SNR"] for r in rows] == ["0.1", "**0.1001** ⚠", "0.02"]
    assert [r["SNR"] for r in rows] == ["0.01", "0.01", "**0.5** ⚠"]
    assert list(flagged(df)) == [False, True, True]
    csv = pd.read_csv(paths["csv"])
    assert list(csv["Output_SNR_flag"]) == [False, True, False]
    assert list(csv["Cosine_flag"]) == [False, False, False]  # no Cosine column: schema kept, nothing flagged
    assert list(csv["flagged"]) == [False, True, True]
    assert_valid_png(paths["png"])


def test_small_errors_keep_their_magnitude(tmp_path):
    """yolov5n's isolated rows are all far below 1e-4: four significant digits, never 0.0000."""
    df = pd.DataFrame({"Op": ["/a/Conv[Conv]", "/b/Conv[Conv]"], "Var": ["/a/out", "/b/out"],
                       "Output SNR": [1.23456e-5, 2.5e-9], "Output SQNR_dB": [-10 * math.log10(1.23456e-5), 86.02],
                       "Output Cosine": [0.999999, 1.0]})
    md = write_layer_report(df, tmp_path / "s", "small", "isolated")["md"].read_text(encoding="utf-8")
    rows = md_table(md)
    assert [r["Output SNR"] for r in rows] == ["1.235e-05", "2.5e-09"]
    assert rows[0]["Output SQNR_dB"] == "49.08"  # by hand: -10 log10(1.23456e-5) = 49.0849
    assert "- `/a/out` Output SNR 1.235e-05" in md and "0.0000" not in md.split("## All rows")[0]


def synthetic_layers(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    snr = 10.0 ** rng.uniform(-6, 0.3, n)  # spans > 2 decades -> log axis
    return pd.DataFrame({
        "Op": [f"/model.{i // 8}/m.0/cv{i % 3}/conv/Conv[Conv]" for i in range(n)],
        "Var": [f"/model.{i // 8}/m.0/cv{i % 3}/conv/Conv_output_0" if i % 4 else f"model.{i // 8}.conv.weight[Constant]"
                for i in range(n)],
        "SNR": snr,
        "Cosine": 1 - snr / 5,
    })


def test_pngs_scale_with_layer_count(tmp_path):
    small = write_layer_report(synthetic_layers(60), tmp_path / "s60", "60 layers", "cumulative")
    large = write_layer_report(synthetic_layers(250, seed=1), tmp_path / "s250", "250 layers", "cumulative")
    _, w60 = assert_valid_png(small["png"])
    _, w250 = assert_valid_png(large["png"])
    assert w250 > 2 * w60  # more bars get a wider figure instead of overlapping labels
    assert "![per-layer SNR](s250.q_report.png)" in large["md"].read_text(encoding="utf-8")


def test_empty_layer_report(tmp_path):
    df = pd.DataFrame(columns=["Op", "Var", "SNR", "Cosine"])
    paths = write_layer_report(df, tmp_path / "e", "empty", "cumulative")
    assert "**0 of 0 rows flagged**" in paths["md"].read_text(encoding="utf-8")
    assert len(pd.read_csv(paths["csv"])) == 0
    assert_valid_png(paths["png"], min_side=50)


def test_shorten_name():
    assert shorten_name("/model.0/conv/Conv_output_0") == "model.0/conv/Conv"
    assert shorten_name("model.0.conv.weight[Constant]") == "model.0.conv.weight (w)"
    s = shorten_name("/model.22/cv3.2/cv3.2.1/conv/Conv_output_0", max_len=24)
    assert s.startswith("model.22/…/") and s.endswith("conv/Conv") and len(s) <= 24


# ---------------------------------------------------------------- kept from the first committed version

def _scaled_rows() -> pd.DataFrame:
    f = np.array([1.0, 2.0, 2.0])
    rows = []
    for name, q in [("ok", f + 0.01), ("just_below", f * 1.3162), ("just_above", f * 1.3163), ("neg", -f)]:
        rows.append({"Op": f"/{name}/Conv[Conv]", "Var": f"{name}_out", **compare(q, f)})
    return pd.DataFrame(rows)


def test_layer_report_flags_exactly_the_rows_over_thresholds(tmp_path):
    df = _scaled_rows()
    # scaling by s gives SNR (s-1)^2: 0.3162^2 = 0.09998 (kept), 0.3163^2 = 0.10005 (flagged); -f: SNR 4, cosine -1
    expected = [False, False, True, True]
    assert list(flagged(df)) == expected
    paths = write_layer_report(df, tmp_path / "m", "tiny", "cumulative")
    rows = md_table(paths["md"].read_text(encoding="utf-8"))
    assert [r["Var"] for r in rows] == ["ok_out", "just_below_out", "just_above_out", "neg_out"]
    assert [any("⚠" in cell for cell in r.values()) for r in rows] == expected
    assert rows[2]["SNR"] == f"**{df.loc[2, 'SNR']:.4g}** ⚠" and rows[0]["MSE"] == f"{df.loc[0, 'MSE']:.4g}"
    csv = pd.read_csv(paths["csv"])
    assert list(csv["SNR_flag"] | csv["Cosine_flag"]) == expected
    assert csv["SNR"].tolist() == pytest.approx(df["SNR"].tolist())
    assert_valid_png(paths["png"])
