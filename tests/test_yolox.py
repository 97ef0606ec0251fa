"""YOLOX as a first-class detector: its export is recognised, its preprocessing and raw-grid decode are YOLOX's own
(checked against an independent re-implementation of YOLOX's preproc / decode and pycocotools), and an export whose
preprocessing sensq cannot tell is decided on calibration images, not assumed."""
from __future__ import annotations

import contextlib
import io
import logging

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sensq.evaluators.coco.layouts import ULTRALYTICS, YOLOX, decode_yolox, plausible_images, recognize
from sensq.preprocess import ImagePreprocess

pytestmark = pytest.mark.data


def _yolox_preproc(img, size):
    """YOLOX's data_augment.preproc (swap=(2, 0, 1), no normalisation), written out from its source."""
    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    padded = np.ones((size[0], size[1], 3), np.uint8) * 114
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[: int(img.shape[0] * r), : int(img.shape[1] * r)] = resized
    return padded.transpose(2, 0, 1).astype(np.float32), r


def test_top_left_letterbox_is_yoloxs_preproc(coco_dir):
    files = sorted((coco_dir / "val2017").glob("*.jpg"))[:3]
    pre = ImagePreprocess(416, 416, resize=YOLOX.resize, color_format=YOLOX.color, mean=list(YOLOX.mean), std=list(YOLOX.std))
    for f in files:
        ref, r = _yolox_preproc(cv2.imread(str(f)), (416, 416))
        px, meta = pre.pixels(f)
        np.testing.assert_array_equal(pre.normalize(px), ref)
        assert meta["ratio"] == (r, r) and meta["pad"] == (0.0, 0.0)


def test_raw_grid_decode_matches_yoloxs_demo_postprocess():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(52 * 52 + 26 * 26 + 13 * 13, 85)).astype(np.float32)
    # YOLOX demo_postprocess (yolox/utils/demo_utils.py), written out: grids per stride, meshgrid(arange(w), arange(h))
    grids, expanded = [], []
    for s in (8, 16, 32):
        h = w = 416 // s
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack((xv, yv), 2).reshape(1, -1, 2))
        expanded.append(np.full((1, h * w, 1), s))
    grids, expanded = np.concatenate(grids, 1)[0], np.concatenate(expanded, 1)[0]
    ref = out.copy()
    ref[:, :2] = (ref[:, :2] + grids) * expanded
    ref[:, 2:4] = np.exp(ref[:, 2:4]) * expanded
    np.testing.assert_allclose(decode_yolox(out, (416, 416)), ref, rtol=1e-6)


def test_exports_are_recognised(yolox_nano, yolov5n):
    x = recognize(onnx.load(str(yolox_nano)))
    assert x.layout == "yolox" and x.preprocess == YOLOX and "3549" in x.reason
    u = recognize(onnx.load(str(yolov5n)))
    assert u.preprocess == ULTRALYTICS


def test_unrecognised_detector_gets_the_preprocessing_that_finds_objects(yolov5n, coco_dir, tmp_path, caplog):
    """yolov5n without its metadata: nothing says Ultralytics, so the calibration images decide (and it is said)."""
    from sensq.defaults import detector_preprocess

    m = onnx.load(str(yolov5n))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    assert recognize(m).preprocess is None
    files = sorted((coco_dir / "val2017").glob("*.jpg"))[:4]
    assert plausible_images(m, files, ULTRALYTICS) == 4 and plausible_images(m, files, YOLOX) == 0  # 300 junk boxes
    with caplog.at_level(logging.WARNING, logger="sensq"):
        assert detector_preprocess(bare, coco_dir / "val2017") == ULTRALYTICS
    assert "preprocessing unknown" in caplog.text and "--preset yolo" in caplog.text


def test_fp32_map_equals_an_independent_yolox_scorer(yolox_nano, coco_dir):
    """sensq's evaluator with no preprocessing options vs YOLOX's own eval recipe (preproc, decode, obj * cls > 0.001,
    class-wise NMS 0.65, 300 boxes) scored by pycocotools, on 30 images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sensq.evaluators import make_evaluator

    n = 30
    ev = make_evaluator(str(coco_dir), model=str(yolox_nano))
    got = ev.evaluate(str(yolox_nano), limit=n, progress=False).metrics["mAP50-95"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_dir / "annotations" / "instances_val2017.json"))
    ids, cats = sorted(gt.getImgIds())[:n], sorted(gt.getCatIds())
    sess = ort.InferenceSession(str(yolox_nano), providers=["CPUExecutionProvider"])
    dets = []
    for iid in ids:
        info = gt.loadImgs(iid)[0]
        img = cv2.imread(str(coco_dir / "val2017" / info["file_name"]))
        x, r = _yolox_preproc(img, (416, 416))
        o = decode_yolox(sess.run(None, {"images": x[None]})[0][0], (416, 416))
        scores = o[:, 5:] * o[:, 4:5]
        i, j = np.nonzero(scores > 0.001)
        boxes = np.concatenate([o[i, :2] - o[i, 2:4] / 2, o[i, 2:4]], 1)
        keep = []
        for c in np.unique(j):
            k = np.flatnonzero(j == c)
            keep += list(k[np.asarray(cv2.dnn.NMSBoxes(boxes[k].tolist(), scores[i[k], c].tolist(), 0.0, 0.65)).reshape(-1)])
        keep = sorted(keep, key=lambda k: -scores[i[k], j[k]])[:300]
        h0, w0 = img.shape[:2]
        for k in keep:
            x1, y1 = np.clip(boxes[k, 0] / r, 0, w0), np.clip(boxes[k, 1] / r, 0, h0)
            x2 = np.clip((boxes[k, 0] + boxes[k, 2]) / r, 0, w0)
            y2 = np.clip((boxes[k, 1] + boxes[k, 3]) / r, 0, h0)
            dets.append({"image_id": iid, "category_id": cats[j[k]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(scores[i[k], j[k]])})
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(dets), "bbox")
        e.params.imgIds = ids
        e.evaluate(), e.accumulate(), e.summarize()
    assert got == pytest.approx(e.stats[0], abs=2e-3)
