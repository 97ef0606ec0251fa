"""ImageNet-style classification evaluator: label-file formats, ImageFolder trees, skip/limit, batching,
normalisation hints, the EfficientNet-Lite0 acceptance top-1 and input errors."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sensq.errors import SensqError
from sensq.evaluators.imagenet import (ClassificationEvaluator, load_imagenet, make_imagenet_evaluator,
                                       metadata_normalization, read_synsets)

COLORS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}  # BGR for cv2.imwrite
CLASS_OF = {"red": 0, "green": 1, "blue": 2}  # the tiny model predicts the dominant RGB channel
SYNSETS = ["n00000010", "n00000020", "n00000030"]


def tiny_classifier(batch="N", n_classes=3, offset=0) -> onnx.ModelProto:
    """logits = mean colour (RGB) @ W: class = dominant channel (+ offset)."""
    w = np.zeros((3, n_classes), np.float32)
    w[np.arange(3), np.arange(3) + offset] = 1.0
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n_classes])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _images(folder, per_color=3):
    """Solid-colour JPEGs named <colour>_<k>.jpg (sorted names: blue*, green*, red*)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for color, bgr in COLORS.items():
        for k in range(per_color):
            f = folder / f"{color}_{k}.jpg"
            cv2.imwrite(str(f), np.full((40 + k, 50, 3), bgr, np.uint8))
            files.append(f)
    return files


def _expected(ds):
    return [CLASS_OF[f.name.split("_")[0]] for f in ds.files]


def test_label_file_formats_agree(tmp_path):
    files = _images(tmp_path / "images")
    rows = [(f"images/{f.name}", CLASS_OF[f.name.split("_")[0]]) for f in files]
    (tmp_path / "with_header.tsv").write_text("file\tsynset\tindex\n" + "".join(f"{p}\t{SYNSETS[i]}\t{i}\n" for p, i in rows))
    (tmp_path / "plain.txt").write_text("".join(f"{p} {i}\n" for p, i in rows))
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "label"), *rows])
    (tmp_path / "synsets.tsv").write_text("".join(f"{p}\t{SYNSETS[i]}\n" for p, i in rows))
    (tmp_path / "synset_to_index.tsv").write_text("index\tsynset\tname\n" + "".join(f"{i}\t{s}\tx\n" for i, s in enumerate(SYNSETS)))
    results = [load_imagenet(tmp_path, labels=name) for name in ("with_header.tsv", "plain.txt", "table.csv", "synsets.tsv")]
    for ds in results:
        assert [f.name for f in ds.files] == sorted(f.name for f in files)
        assert ds.labels.tolist() == _expected(ds)
    # auto-found label file (images_labels.tsv is the preferred name)
    (tmp_path / "images_labels.tsv").write_text((tmp_path / "with_header.tsv").read_text())
    assert load_imagenet(tmp_path).source.endswith("images_labels.tsv")


def test_synset_list_formats(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{s} some name, other\n" for s in SYNSETS[::-1]))
    assert read_synsets(tmp_path / "LOC_synset_mapping.txt") == {SYNSETS[2]: 0, SYNSETS[1]: 1, SYNSETS[0]: 2}


def test_image_folder_tree_with_synset_and_plain_class_names(tmp_path):
    for i, color in enumerate(COLORS):
        _images(tmp_path / "syn" / SYNSETS[CLASS_OF[color]], 1)
        _images(tmp_path / "plain" / f"class_{CLASS_OF[color]}", 1)
    for d in ("syn", "plain"):
        for sub in (tmp_path / d).iterdir():  # keep only the image of the folder's own colour
            for f in sub.iterdir():
                keep = CLASS_OF[f.name.split("_")[0]] == (SYNSETS.index(sub.name) if d == "syn" else int(sub.name[-1]))
                if not keep:
                    f.unlink()
    # synset folders are mapped through the synset list when one is present (here: reversed order)
    (tmp_path / "syn" / "synset_to_index.tsv").write_text("index\tsynset\n" + "".join(f"{2 - i}\t{s}\n" for i, s in enumerate(SYNSETS)))
    ds = load_imagenet(tmp_path / "syn")
    assert ds.labels.tolist() == [2 - c for c in _expected(ds)]
    ds = load_imagenet(tmp_path / "plain")
    assert ds.labels.tolist() == _expected(ds) and ds.source.startswith("imagefolder")


def test_tiny_model_accuracy_colour_order_and_static_batch(tmp_path):
    files = _images(tmp_path / "images", per_color=3)
    (tmp_path / "labels.txt").write_text("".join(f"images/{f.name}\t{CLASS_OF[f.name.split('_')[0]]}\n" for f in files))
    ev = make_imagenet_evaluator(tmp_path, mean=[0.0], std=[1.0], batch_size=4)
    r = ev.evaluate(tiny_classifier(), progress=False)
    assert r.metrics == {"top1": 1.0, "top5": 1.0} and r.n_samples == 9 and r.extra["batch_size"] == 4
    assert 0 < r.inference_seconds <= r.seconds
    # a static batch of 4 over 9 images pads the last batch and gives the same predictions
    r_static = ev.evaluate(tiny_classifier(batch=4), progress=False)
    np.testing.assert_array_equal(r_static.samples.scores["pred"], r.samples.scores["pred"])
    # limit scores the first n in file-name order (blue_0, blue_1, ...)
    r2 = ev.evaluate(tiny_classifier(), limit=2, progress=False)
    assert r2.n_samples == 2 and r2.samples.scores["pred"].tolist() == [2, 2]
    # BGR input swaps red and blue: only the green images stay correct
    bgr = make_imagenet_evaluator(tmp_path, mean=[0.0], std=[1.0], color_format="bgr")
    assert bgr.evaluate(tiny_classifier(), progress=False).metrics["top1"] == pytest.approx(3 / 9)
    # 1001-class (background first) models are offset automatically
    r1001 = ev.evaluate(tiny_classifier(n_classes=1001, offset=1), progress=False)
    assert r1001.metrics["top1"] == 1.0


def test_skip_drops_the_first_files_by_name(tmp_path):
    files = _images(tmp_path / "images")
    (tmp_path / "labels.txt").write_text("".join(f"images/{f.name}\t0\n" for f in files))
    ds = load_imagenet(tmp_path, skip=4)
    assert [f.name for f in ds.files] == sorted(f.name for f in files)[4:]


def test_metadata_normalization_hints():
    assert metadata_normalization({"preprocessing_native": "resize 256, center crop 224, x/255, (x-0.5)/0.5"}) == \
        ([127.5] * 3, [127.5] * 3)
    mean, std = metadata_normalization({"mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]"})
    np.testing.assert_allclose([mean, std], [[123.675, 116.28, 103.53], [58.395, 57.12, 57.375]])
    assert metadata_normalization({"mean_values": "[127, 127, 127]", "std_values": "128"}) == ([127.0] * 3, [128.0])
    assert metadata_normalization({"author": "x"}) is None


def test_input_errors(tmp_path):
    with pytest.raises(SensqError, match="data folder not found"):
        load_imagenet(tmp_path / "nope")
    with pytest.raises(SensqError, match="no label file and no class sub-folders"):
        load_imagenet(tmp_path)
    with pytest.raises(SensqError, match="label file not found"):
        load_imagenet(tmp_path, labels="missing.tsv")
    files = _images(tmp_path / "images", 1)
    (tmp_path / "labels.tsv").write_text("".join(f"images/{f.name}\t{SYNSETS[0]}\n" for f in files))
    with pytest.raises(SensqError, match="no synset list"):
        load_imagenet(tmp_path)
    (tmp_path / "labels.tsv").write_text("images/missing.jpg\t3\n")
    with pytest.raises(SensqError, match="1 of 1 images .* missing"):
        load_imagenet(tmp_path)
    (tmp_path / "labels.tsv").write_text("".join(f"images/{f.name}\t7\n" for f in files))
    with pytest.raises(SensqError, match="no images left"):
        load_imagenet(tmp_path, skip=3)
    with pytest.raises(SensqError, match="outside the model's 3 classes"):
        ClassificationEvaluator(load_imagenet(tmp_path)).evaluate(tiny_classifier(), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# real model (acceptance)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0(imagenet_dir):
    return imagenet_dir / "efficientnet_lite0.onnx"


@pytest.fixture(scope="module")
def imagenet_eval(imagenet_dir):
    return make_imagenet_evaluator(imagenet_dir, skip=100, mean=[127.0], std=[128.0])


@pytest.mark.data
@pytest.mark.slow
def test_efficientnet_lite0_acceptance_top1_on_400_images(imagenet_eval, imagenet_dir, lite0):
    rows = sorted((imagenet_dir / "images_labels.tsv").read_text().splitlines()[1:])
    assert len(imagenet_eval) == 400
    assert imagenet_eval.data.files[0].name == rows[100].split("\t")[0].split("/")[-1]
    r = imagenet_eval.evaluate(lite0, progress=False)
    assert r.n_samples == 400 and r.primary == "top1"
    assert abs(r.metrics["top1"] - 0.8875) <= 0.0025
    assert r.metrics["top5"] >= r.metrics["top1"]
    assert r.extra["normalization"] == "given" and r.extra["input_size"] == [224, 224]


@pytest.mark.data
def test_batched_and_single_inference_agree(imagenet_eval, imagenet_dir, lite0):
    single = make_imagenet_evaluator(imagenet_dir, skip=100, mean=[127.0], std=[128.0], batch_size=1)
    a = single.evaluate(lite0, limit=24, progress=False)
    b = imagenet_eval.evaluate(lite0, limit=24, progress=False)
    assert b.extra["batch_size"] == 32 and a.extra["batch_size"] == 1
    np.testing.assert_array_equal(a.samples.scores["pred"], b.samples.scores["pred"])
    assert a.metrics == b.metrics


@pytest.mark.data
def test_model_metadata_gives_the_native_normalisation(imagenet_dir, lite0):
    ev = make_imagenet_evaluator(imagenet_dir, skip=100)
    r = ev.evaluate(lite0, limit=8, progress=False)
    assert r.extra["normalization"] == "model metadata" and r.extra["mean"] == [127.5] * 3
