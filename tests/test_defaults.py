"""Defaults live in the library (sensq.defaults), the same for the CLI and the Python API: data discovery on the
shared layout, calibration never on the images that are scored, preprocessing a classifier was calibrated with is
the one it is evaluated with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sensq.cli import build_parser
from sensq.defaults import build_config, choose_data, setup
from sensq.errors import SensqError


@pytest.fixture()
def data_root(monkeypatch, tmp_path):
    def use(root: Path):
        monkeypatch.setenv("SENSQ_DATA", str(root))
        monkeypatch.setenv("SENSQ_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path)  # no ./datasets or ../shared/data around
    return use


@pytest.mark.data
def test_classifier_defaults_find_the_images_and_skip_the_calibrated_ones(data_dir, data_root):
    """Shared layout imagenet/{images/, images_labels.tsv}: calibrate on images/ (not the folder above it, where no
    image lies), evaluate the rest; --calib-step 200 skips 200 (not 100)."""
    data_root(data_dir)
    model = data_dir / "imagenet" / "efficientnet_lite0.onnx"
    c = choose_data(model=model)
    assert c.calib == [str(data_dir / "imagenet" / "images")] and c.skip == 100
    assert c.labels == str(data_dir / "imagenet" / "images_labels.tsv")
    assert choose_data(model=model, calib_step=200).skip == 200
    from sensq.data import list_files

    assert len(list_files(Path(c.calib[0]), "img", "input")) == 500  # a folder of images, found


@pytest.mark.data
def test_classifier_is_evaluated_with_the_normalization_it_was_calibrated_with(data_dir, data_root):
    data_root(data_dir)
    model = data_dir / "imagenet" / "efficientnet_lite0.onnx"
    # placement fused: the placement probe (tests/test_yolox_int8.py) is not what this checks, and costs seconds
    cfg, ws, ev = setup(progress=False, model=str(model), calib_step=4, limit=2, placement="fused")
    ip = cfg.inputs[0]
    assert ip.mean_value == [127.5] * 3 and ip.std_value == [127.5] * 3  # (x/255 - 0.5)/0.5 from the model's metadata
    res = ev.evaluate(str(model), limit=2, progress=False)
    assert res.extra["mean"] == ip.mean_value and res.extra["std"] == ip.std_value
    assert ev.data.files[0].name == sorted(p.name for p in (data_dir / "imagenet" / "images").iterdir())[4]  # skip = calib_step


def _coco_without_train(src: Path, dst: Path) -> Path:
    """A COCO folder with val2017 only: 30 of the shared images and their annotations."""
    ann = json.loads((src / "annotations" / "instances_val2017.json").read_text())
    keep = sorted(ann["images"], key=lambda r: r["id"])[:30]
    ids = {r["id"] for r in keep}
    (dst / "coco" / "annotations").mkdir(parents=True)
    (dst / "coco" / "val2017").mkdir()
    for r in keep:
        (dst / "coco" / "val2017" / r["file_name"]).symlink_to(src / "val2017" / r["file_name"])
    ann = {**ann, "images": keep, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids]}
    (dst / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    return dst


@pytest.mark.data
def test_detector_with_val_only_calibrates_on_a_split_never_on_scored_images(data_dir, yolov5n, data_root, tmp_path):
    root = _coco_without_train(data_dir / "coco", tmp_path / "d")
    data_root(root)
    c = choose_data(model=yolov5n, calib_step=8)
    calib = [Path(p).name for p in Path(c.calib[0]).read_text().split()]
    assert len(calib) == 8 and sorted(calib) == sorted(c.exclude)
    assert any("no train2017" in n for n in c.notes)
    assert choose_data(model=yolov5n, calib_step=8).exclude == c.exclude  # fixed seed: the same split every time
    cfg, ws, ev = setup(progress=False, model=str(yolov5n), calib_step=8, placement="fused")  # no placement probe
    scored = {f.name for f in ev.data.files}
    assert len(scored) == 22 and not scored & set(calib)  # the 8 calibration images are not scored
    with pytest.raises(SensqError, match="no train2017"):
        choose_data(model=yolov5n, calib_step=40)  # more calibration images than the split can give
    allowed = choose_data(model=yolov5n, calib_step=8, allow_calib_on_eval=True)
    assert allowed.exclude is None and allowed.calib == [str(root / "coco" / "val2017")]


def test_cli_options_and_python_api_build_the_same_config(tmp_path):
    """The CLI passes its parsed options to sensq.defaults.build_config; a Python caller passing the same names gets
    the same config (preset and overrides applied in the library, not in cli.py)."""
    from tiny_models import conv_relu_conv, write_pngs

    model = conv_relu_conv(tmp_path / "m.onnx")
    write_pngs(tmp_path / "calib", n=4)
    argv = ["quantize", "-m", str(model), "--calib", str(tmp_path / "calib"), "--preset", "yolo", "--per-tensor",
            "--method", "mse", "--overflow-fix", "all", "--calib-step", "3"]
    args = build_parser().parse_args(argv)
    from_cli = build_config(**{k: v for k, v in vars(args).items() if k not in ("func", "command", "quiet")})
    from_api = build_config(model=str(model), calib=[str(tmp_path / "calib")], preset="yolo", per_tensor=True,
                            method="mse", overflow_fix="all", calib_step=3)
    assert from_cli.to_xquant() == from_api.to_xquant()
    ip = from_api.inputs[0]
    assert (ip.resize, ip.std_value, from_api.per_channel, from_api.calibration_step) == ("letterbox", [255.0] * 3, False, 3)


@pytest.mark.data
def test_search_refuses_to_calibrate_on_the_evaluation_images(yolov5n, coco_dir, tmp_path, capfd):
    """Issue 18.1: --calib = the evaluation images is exit 2 with one line naming the overlap and the opt-in flag,
    before any calibration or trial runs."""
    from sensq.cli import main

    code = main(["search", "--model", str(yolov5n), "--calib", str(coco_dir / "val2017"), "--data", str(coco_dir),
                 "--budget", "2", "--calib-step", "2", "--limit", "2", "--workdir", str(tmp_path / "run"), "-q"])
    out, err = capfd.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and "--allow-calib-on-eval" in lines[0], err
    assert " 2 calibration image" in lines[0]  # calib-step 2: the two images that would calibrate are both scored
    assert not (tmp_path / "run").exists()  # refused before the search started


@pytest.mark.data
def test_overlap_is_found_by_content_and_by_resolved_path_not_by_name(yolov5n, coco_dir, tmp_path):
    """Copies under new names and symlinks count; a different image under a scored image's name does not."""
    import shutil

    val = sorted((coco_dir / "val2017").iterdir())
    train = sorted((coco_dir / "train2017").iterdir())
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(val[0], calib / "a_copy.jpg")
    shutil.copy(val[1], calib / "b_copy.jpg")
    (calib / "c_link.jpg").symlink_to(val[2])
    shutil.copy(train[0], calib / val[3].name)  # same name as a scored image, other content: not an overlap
    shutil.copy(train[1], calib / "e_train.jpg")
    with pytest.raises(SensqError, match=r"3 calibration images .*--allow-calib-on-eval"):
        setup(progress=False, model=str(yolov5n), calib=[str(calib)], data=str(coco_dir), calib_step=5)
    cfg, ws, ev = setup(progress=False, model=str(yolov5n), calib=[str(calib)], data=str(coco_dir), calib_step=5,
                        allow_calib_on_eval=True, placement="fused")  # no placement probe: not what this checks
    assert len(ev.data.files) == 206  # allowed: nothing left out, the run goes on
