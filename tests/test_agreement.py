"""Label-free agreement with FP32: detection (COCO mAP against FP32's confident boxes), classification (top-1
agreement, softmax KL) and output SNR, each checked against an independent computation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sensq.evaluators import detect_kind, make_evaluator
from sensq.evaluators.agreement import (AGREEMENT, PSEUDO_GT_CONF, SNR, DetectionAgreementEvaluator,
                                        OutputAgreementEvaluator, image_files)
from sensq.evaluators.coco import make_coco_evaluator
from sensq.evaluators.samples import PairedBootstrap
from sensq.preprocess import ImagePreprocess

N_IMAGES = 6


@pytest.fixture(scope="module")
def val_links(coco_dir, tmp_path_factory):
    """A folder of symlinks to the first N_IMAGES val JPEGs (no annotations)."""
    d = tmp_path_factory.mktemp("unlabeled")
    for f in sorted((coco_dir / "val2017").iterdir())[:N_IMAGES]:
        (d / f.name).symlink_to(f)
    return d


def _shifted(model_path, dx: float, path):
    """The model with every box centre moved dx input pixels right (YOLOv5 rows: cx, cy, w, h, obj, classes)."""
    m = onnx.load(str(model_path))
    out = m.graph.output[0]
    old = out.name
    shift = np.zeros((1, 1, 85), np.float32)
    shift[0, 0, 0] = dx
    m.graph.initializer.append(numpy_helper.from_array(shift, "shift_dx"))
    m.graph.node.append(helper.make_node("Add", [old + "_raw", "shift_dx"], [old]))
    for n in m.graph.node[:-1]:
        n.output[:] = [o + "_raw" if o == old else o for o in n.output]
    onnx.save(m, str(path))
    return path


def test_image_folder_picks_agreement(val_links, yolov5n):
    assert detect_kind(val_links) == "agreement"
    ev = make_evaluator(str(val_links), model=str(yolov5n))
    assert isinstance(ev, DetectionAgreementEvaluator) and len(ev) == N_IMAGES and ev.primary == AGREEMENT


def test_fp32_agrees_with_itself_exactly(val_links, yolov5n):
    ev = DetectionAgreementEvaluator(image_files(val_links), str(yolov5n))
    res = ev.evaluate(str(yolov5n), progress=False)
    assert res.value == 1.0 and res.metrics["agreement50"] == 1.0
    assert res.extra["pseudo_gt_boxes"] > 0
    # the bootstrap path: pycocotools' precision tp / (tp + fp + spacing(1)) is 1 - 2^-53 for a single-box class
    assert res.samples.value(np.arange(N_IMAGES)) == pytest.approx(1.0, abs=1e-15)
    boot = PairedBootstrap(np.arange(N_IMAGES), n_boot=50)
    d = boot.difference(res.samples, res.samples)
    assert (d.value, d.lo, d.hi) == (0.0, 0.0, 0.0)


def test_shifted_boxes_score_what_pycocotools_scores(val_links, yolov5n, coco_dir, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    shifted = _shifted(yolov5n, 6.0, tmp_path / "shifted.onnx")
    ev = DetectionAgreementEvaluator(image_files(val_links), str(yolov5n))
    res = ev.evaluate(str(shifted), progress=False)
    assert 0.05 < res.value < 0.95  # a 6-pixel shift costs the high IoU thresholds, not all matches

    # independent reference: the labeled COCO evaluator's detections, pseudo ground truth built here, stock COCOeval
    lab = make_coco_evaluator(coco_dir)
    ids = lab.data.image_ids[:N_IMAGES]
    lab.evaluate(str(yolov5n), indices=range(N_IMAGES), progress=False)
    ref = lab.last_detections
    lab.evaluate(str(shifted), indices=range(N_IMAGES), progress=False)
    dets = lab.last_detections
    keep = ref[ref[:, 5] >= PSEUDO_GT_CONF]
    cats = sorted({int(c) for c in np.r_[ref[:, 6], dets[:, 6]]})
    gt = COCO()
    gt.dataset = {"images": [{"id": int(i)} for i in ids], "categories": [{"id": c} for c in cats],
                  "annotations": [{"id": k + 1, "image_id": int(r[0]), "category_id": int(r[6]), "bbox": list(r[1:5]),
                                   "area": float(r[3] * r[4]), "iscrowd": 0} for k, r in enumerate(keep)]}
    gt.createIndex()
    e = COCOeval(gt, gt.loadRes(dets), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    assert res.value == pytest.approx(e.stats[0], abs=1e-12)
    assert res.metrics["agreement50"] == pytest.approx(e.stats[1], abs=1e-12)
    assert res.samples.value(np.arange(N_IMAGES)) == pytest.approx(e.stats[0], abs=1e-12)


def _linear_classifier(path, scale: float, seed: int = 0):
    """x [1,3,8,8] -> global average pool -> 10 logits; `scale` multiplies the weights (a perturbed copy)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((3, 10)) * scale).astype(np.float32)
    g = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
                          "cls", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_classification_agreement_kl_and_snr(tmp_path):
    from scipy.stats import entropy

    from tests.tiny_models import run_model, write_pngs

    files = write_pngs(tmp_path / "imgs", n=8, size=(8, 8))
    ref, other = _linear_classifier(tmp_path / "a.onnx", 1.0), _linear_classifier(tmp_path / "b.onnx", 1.0, seed=1)
    pre = ImagePreprocess(8, 8, "resize", "rgb", [0.0], [255.0])
    ev = OutputAgreementEvaluator(files, str(ref), pre, classifier=True, pixel_cache=str(tmp_path / "px"))
    same = ev.evaluate(str(ref), progress=False)
    assert same.value == 1.0 and same.metrics["kl"] == 0.0 and same.metrics[SNR] == 100.0
    res = ev.evaluate(str(other), progress=False)
    la = np.concatenate([run_model(ref, {"x": pre.tensor(f)})[0] for f in files])
    lb = np.concatenate([run_model(other, {"x": pre.tensor(f)})[0] for f in files])
    sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    assert res.value == pytest.approx(np.mean(la.argmax(1) == lb.argmax(1)))
    assert res.metrics["kl"] == pytest.approx(np.mean([entropy(p, q) for p, q in zip(sm(la), sm(lb))]), rel=1e-5)
    snr = 10 * np.log10((la ** 2).sum(1) / ((la - lb) ** 2).sum(1))
    assert res.metrics[SNR] == pytest.approx(snr.mean(), rel=1e-5)
    assert ev.goals["kl"] == "minimize" and ev.goals[AGREEMENT] == "maximize"


def test_setup_choice_is_logged_and_task_forces_it(val_links, yolov5n, imagenet_dir, caplog):
    import logging

    from sensq.defaults import evaluator_for

    with caplog.at_level(logging.INFO, logger="sensq"):
        ev = evaluator_for(str(val_links), model=str(yolov5n))
    said = [r.getMessage() for r in caplog.records if "holds images and no annotations" in r.getMessage()]
    assert isinstance(ev, DetectionAgreementEvaluator) and len(said) == 1 and AGREEMENT in said[0]
    # a labeled classification folder: auto scores top-1 against labels, --task agreement forces label-free
    model = imagenet_dir / "efficientnet_lite0.onnx"
    assert evaluator_for(str(imagenet_dir / "images"), model=str(model), labels=str(imagenet_dir / "images_labels.tsv")).primary == "top1"
    calib = sorted((imagenet_dir / "images").iterdir())[:5]
    ev = evaluator_for(str(imagenet_dir / "images"), task="agreement", model=str(model), calib_files=calib)
    assert isinstance(ev, OutputAgreementEvaluator) and ev.classifier and ev.primary == AGREEMENT
    assert len(ev) == len(list((imagenet_dir / "images").glob("*.JPEG"))) - 5


def test_stored_results_reload_with_the_pseudo_ground_truth(val_links, yolov5n, tmp_path):
    """A resumed search reads per-sample results from disk before scoring anything: the reference is rebuilt."""
    from sensq.evaluators.scoring import SampleStore

    shifted = _shifted(yolov5n, 3.0, tmp_path / "s.onnx")
    ev = DetectionAgreementEvaluator(image_files(val_links), str(yolov5n))
    store = SampleStore(tmp_path / "store", ev)  # keyed before scoring, as in a search
    res = ev.evaluate(str(shifted), progress=False)
    store.put("k", res.samples)
    fresh = DetectionAgreementEvaluator(image_files(val_links), str(yolov5n))
    back = SampleStore(tmp_path / "store", fresh, memory=0).get("k")
    assert back.primary == AGREEMENT and back.value(np.arange(N_IMAGES)) == res.samples.value(np.arange(N_IMAGES))
