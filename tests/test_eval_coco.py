"""COCO / YOLO-layout detection evaluator: decode + NMS on synthetic heads, the array COCO metric against stock
pycocotools, the yolov5n acceptance mAP, YOLO-layout equivalence and input errors."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import yaml

from sensq.errors import SensqError
from sensq.evaluators.coco import (COCO80_TO_91, COCO_STAT_NAMES, DetectionEvaluator, GroundTruth, coco_eval_arrays,
                                   coco_stats, detect_layout, load_coco, load_yolo, make_coco_evaluator,
                                   make_yolo_evaluator, postprocess, pycocotools_eval)
from sensq.preprocess import ImagePreprocess

# ---------------------------------------------------------------------------------------------------------------
# decode + NMS on synthetic outputs
# ---------------------------------------------------------------------------------------------------------------


def _letterbox_meta(tmp_path, h0=240, w0=320):
    """Geometry of a real letterboxed 320x240 image into 640x640: ratio 2, 80 px padding top and bottom."""
    f = tmp_path / "img.jpg"
    cv2.imwrite(str(f), np.full((h0, w0, 3), 90, np.uint8))
    _, meta = ImagePreprocess(640, 640, resize="letterbox").pixels(f)
    return meta


def _to_input(xyxy_orig, meta):
    """Original-image xyxy -> model-input cx, cy, w, h (what the head emits)."""
    r, (pw, ph) = meta["ratio"][0], meta["pad"]
    x1, y1, x2, y2 = xyxy_orig
    x1, x2, y1, y2 = x1 * r + pw, x2 * r + pw, y1 * r + ph, y2 * r + ph
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def test_yolov8_decode_maps_boxes_back_and_nms_is_class_aware(tmp_path):
    meta = _letterbox_meta(tmp_path)
    assert meta["ratio"] == (2.0, 2.0) and meta["pad"] == (0.0, 80.0)
    out = np.zeros((1, 84, 8400), np.float32)
    a, b = (10, 20, 110, 70), (200, 100, 300, 230)
    out[0, :4, 5], out[0, 4 + 3, 5] = _to_input(a, meta), 0.9          # A: class 3
    out[0, :4, 100], out[0, 4 + 7, 100] = _to_input(b, meta), 0.8      # B: class 7, elsewhere
    dup = _to_input((12, 21, 112, 71), meta)                            # A shifted 2 px: IoU ~0.95 with A
    out[0, :4, 6], out[0, 4 + 3, 6] = dup, 0.6                          # same class -> suppressed
    out[0, :4, 7], out[0, 4 + 10, 7] = dup, 0.5                         # other class -> kept
    out[0, :4, 8], out[0, 4 + 1, 8] = _to_input(b, meta), 0.0009        # below conf 0.001
    boxes, scores, cls = postprocess(out, "yolov8", conf=0.001, iou=0.7, max_det=300, meta=meta)
    assert cls.tolist() == [3, 7, 10]
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.5], rtol=1e-6)
    np.testing.assert_allclose(boxes, [a, b, (12, 21, 112, 71)], atol=1e-3)
    # Without meta the boxes stay in model-input pixels.
    boxes_in, _, _ = postprocess(out, "yolov8", meta=None)
    np.testing.assert_allclose(boxes_in[0], [20, 120, 220, 220], atol=1e-3)


def test_yolov5_decode_uses_objectness_times_class_and_multi_label(tmp_path):
    meta = _letterbox_meta(tmp_path)
    out = np.zeros((1, 25200, 85), np.float32)
    a, b = (30, 40, 90, 100), (150, 10, 310, 200)
    out[0, 0, :4], out[0, 0, 4] = _to_input(a, meta), 0.9
    out[0, 0, 5 + 2], out[0, 0, 5 + 5] = 0.8, 0.5                      # two classes above conf: two candidates
    out[0, 1, :4], out[0, 1, 4], out[0, 1, 5 + 9] = _to_input(b, meta), 0.5, 0.0015  # 0.5*0.0015 < conf
    out[0, 2, :4], out[0, 2, 4], out[0, 2, 5 + 1] = _to_input(b, meta), 0.0009, 1.0  # objectness gate
    boxes, scores, cls = postprocess(out, "yolov5", conf=0.001, meta=meta)
    assert cls.tolist() == [2, 5]
    np.testing.assert_allclose(scores, [0.72, 0.45], rtol=1e-6)
    np.testing.assert_allclose(boxes, [a, a], atol=1e-3)


def _reference_nms(boxes_xywh, scores, classes, iou_thr, max_det):
    """Ultralytics/torchvision semantics, written as the plain greedy loop (fine for a test)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    for i in order:
        ok = True
        for k in keep:
            if classes[k] != classes[i]:
                continue
            x1 = max(boxes_xywh[i, 0], boxes_xywh[k, 0])
            y1 = max(boxes_xywh[i, 1], boxes_xywh[k, 1])
            x2 = min(boxes_xywh[i, 0] + boxes_xywh[i, 2], boxes_xywh[k, 0] + boxes_xywh[k, 2])
            y2 = min(boxes_xywh[i, 1] + boxes_xywh[i, 3], boxes_xywh[k, 1] + boxes_xywh[k, 3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            union = boxes_xywh[i, 2] * boxes_xywh[i, 3] + boxes_xywh[k, 2] * boxes_xywh[k, 3] - inter
            if inter / union > iou_thr:
                ok = False
                break
        if ok:
            keep.append(i)
            if len(keep) == max_det:
                break
    return np.array(keep)


@pytest.mark.parametrize("max_det", [300, 40])
def test_nms_matches_reference_greedy_including_prefix_growth(max_det):
    rng = np.random.default_rng(1)
    # 40 objects x 150 jittered duplicates (high scores) + 2000 scattered boxes (low scores), 5 classes:
    # the top 3072 candidates hold < 300 survivors, so the NMS prefix must grow.
    centers = rng.uniform(50, 590, (40, 2))
    dup = np.repeat(centers, 150, 0) + rng.normal(0, 2, (6000, 2))
    wh_dup = np.repeat(rng.uniform(20, 120, (40, 2)), 150, 0)
    scattered = rng.uniform(20, 620, (2000, 2))
    cxcywh = np.concatenate([np.c_[dup, wh_dup], np.c_[scattered, rng.uniform(5, 60, (2000, 2))]]).astype(np.float32)
    scores = np.concatenate([rng.uniform(0.3, 0.99, 6000), rng.uniform(0.002, 0.29, 2000)]).astype(np.float32)
    classes = rng.integers(0, 5, 8000)
    out = np.zeros((9, 8000), np.float32)
    out[:4] = cxcywh.T
    out[4 + classes, np.arange(8000)] = scores
    boxes, got_scores, got_cls = postprocess(out, "yolov8", conf=0.001, iou=0.7, max_det=max_det)
    xywh = np.c_[cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, 2:]].astype(np.float64)
    ref = _reference_nms(xywh, scores, classes, 0.7, max_det)
    assert len(ref) == max_det  # the case really needs max_det survivors
    np.testing.assert_array_equal(got_scores, scores[ref])
    np.testing.assert_array_equal(got_cls, classes[ref])
    np.testing.assert_allclose(boxes[:, :2], xywh[ref, :2], atol=1e-4)


def test_max_nms_keeps_only_top_candidates():
    out = np.zeros((1, 6, 10), np.float32)  # 2 classes, 10 disjoint boxes
    out[0, 0] = np.arange(10) * 60 + 30
    out[0, 1], out[0, 2:4] = 30, 20
    out[0, 4] = np.linspace(0.1, 0.9, 10)
    _, scores, _ = postprocess(out, "yolov8", max_nms=3)
    np.testing.assert_allclose(scores, [0.9, 0.8111111, 0.7222222], rtol=1e-5)


def test_detect_layout_from_shape_and_metadata():
    assert detect_layout((25200, 85), {"stride": "32", "names": str({i: str(i) for i in range(80)})}) == "yolov5"
    assert detect_layout((84, 8400), {"task": "detect", "version": "8.4.190", "stride": "32"}) == "yolov8"
    assert detect_layout((8400, 84), {"names": str({i: str(i) for i in range(80)})}) == "yolov8"  # transposed v8
    assert detect_layout((84, 8400)) == "yolov8"
    assert detect_layout((25200, 85)) == "yolov5"
    with pytest.raises(SensqError, match="not detection"):
        detect_layout((116, 8400), {"task": "segment"})


# ---------------------------------------------------------------------------------------------------------------
# the array COCO metric == stock pycocotools
# ---------------------------------------------------------------------------------------------------------------


def _synthetic_coco(seed):
    rng = np.random.default_rng(seed)
    cats = [1, 3, 7, 9]  # non-contiguous ids; 9 never has ground truth
    images = [{"id": int(i), "file_name": f"{i}.jpg", "width": 400, "height": 300} for i in (5, 11, 12, 40, 41, 77, 90, 91)]
    anns, dets = [], []
    for img in images:
        if img["id"] == 12:
            continue  # an image without objects
        for _ in range(rng.integers(1, 9)):
            w, h = rng.uniform(4, 200, 2)
            x, y = rng.uniform(0, 200), rng.uniform(0, 150)
            area = float(rng.choice([w * h * rng.uniform(0.4, 1.0), 32.0 ** 2, 96.0 ** 2]))  # bucket edges too
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.choice(cats[:3])),
                         "bbox": [x, y, w, h], "area": area, "iscrowd": int(rng.random() < 0.15)})
    for a in anns:  # noisy copies of each object, some with tied scores
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = np.array(a["bbox"]) + rng.normal(0, 6, 4)
            s = float(rng.choice([0.5, rng.random()]))
            dets.append([a["image_id"], x, y, max(w, 1), max(h, 1), s, a["category_id"]])
    for _ in range(150):  # false positives, incl. the category without ground truth and > 100 per (image, category)
        img = int(rng.choice([5, 12, 40])) if rng.random() < 0.5 else 41
        dets.append([img, *rng.uniform(0, 250, 2), *rng.uniform(2, 120, 2), float(rng.random()), int(rng.choice(cats))])
    dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
    return dataset, np.array(dets, np.float64)


@pytest.mark.parametrize("seed", range(4))
def test_array_metric_is_identical_to_pycocotools(seed):
    dataset, dets = _synthetic_coco(seed)
    gt = GroundTruth(json.loads(json.dumps(dataset)))
    img_ids = [5, 11, 12, 40, 41, 77] if seed % 2 else [i["id"] for i in dataset["images"]]  # a subset, or all
    stats_ref, prec_ref, rec_ref = pycocotools_eval(gt, dets, img_ids)
    prec, rec = coco_eval_arrays(gt, dets, img_ids)
    np.testing.assert_array_equal(prec, prec_ref)
    np.testing.assert_array_equal(rec, rec_ref)
    np.testing.assert_array_equal(coco_stats(gt, dets, img_ids), stats_ref)
    assert stats_ref[0] > 0  # the synthetic case is not degenerate


def test_array_metric_without_detections_matches_pycocotools():
    dataset, _ = _synthetic_coco(0)
    gt = GroundTruth(dataset)
    ids = [i["id"] for i in dataset["images"]]
    np.testing.assert_array_equal(coco_stats(gt, np.zeros((0, 7)), ids), pycocotools_eval(gt, np.zeros((0, 7)), ids)[0])


# ---------------------------------------------------------------------------------------------------------------
# real model: acceptance and YOLO-layout equivalence
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_eval(coco_dir, yolov5n):
    return make_coco_evaluator(coco_dir)


@pytest.mark.data
@pytest.mark.slow
def test_yolov5n_acceptance_map_on_206_images(yolov5n_coco_fp32):
    coco_eval, r, d = yolov5n_coco_fp32  # coco_eval.evaluate(yolov5n) on every image, run once per session
    assert r.n_samples == 206 and r.primary == "mAP50-95"
    assert abs(r.metrics["mAP50-95"] - 0.3045) <= 0.003
    assert abs(r.metrics["mAP50"] - 0.4825) <= 0.003
    assert list(r.extra["coco_stats"]) == COCO_STAT_NAMES
    assert r.extra["layout"] == "yolov5"
    assert 0 < r.inference_seconds < r.seconds
    # The default array metric and stock pycocotools agree on these very detections.
    stats, _, _ = pycocotools_eval(coco_eval.data.gt, d, coco_eval.data.image_ids)
    np.testing.assert_array_equal([r.extra["coco_stats"][k] for k in COCO_STAT_NAMES], stats)
    # Detections are in original-image coordinates, with COCO category ids.
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco_eval.data.gt.dataset["images"]}
    w_max = np.array([sizes[int(i)][0] for i in d[:, 0]])
    assert (d[:, 1] >= 0).all() and (d[:, 1] + d[:, 3] <= w_max + 1e-6).all()
    assert set(d[:, 6].astype(int)) <= set(COCO80_TO_91)
    assert coco_eval.data.category_map(80).tolist() == COCO80_TO_91  # sorted ids of the 80 categories == 80->91 map
    assert np.bincount(d[:, 0].astype(int)).max() <= 300


@pytest.mark.data
def test_limit_scores_only_the_first_images(coco_eval, yolov5n):
    r = coco_eval.evaluate(yolov5n, limit=12, progress=False)
    first = coco_eval.data.image_ids[:12]
    assert r.n_samples == 12 and first == sorted(first)
    assert set(coco_eval.last_detections[:, 0].astype(int)) <= set(first)
    stats, _, _ = pycocotools_eval(coco_eval.data.gt, coco_eval.last_detections, first)
    assert r.metrics["mAP50-95"] == stats[0]


def _crowd_free_subsets(coco_dir, tmp_path, n):
    """The first n crowd-free val images as a COCO folder and as a YOLO folder (symlinked images)."""
    src = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    crowd = {a["image_id"] for a in src["annotations"] if a["iscrowd"]}
    images = sorted((i for i in src["images"] if i["id"] not in crowd), key=lambda i: i["id"])[:n]
    ids = {i["id"] for i in images}
    anns = [a for a in src["annotations"] if a["image_id"] in ids]
    cats = sorted(src["categories"], key=lambda c: c["id"])
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps({**src, "images": images, "annotations": anns}))
    yolo = tmp_path / "yolo"
    (yolo / "images" / "val").mkdir(parents=True)
    (yolo / "labels" / "val").mkdir(parents=True)
    cls_of = {c["id"]: i for i, c in enumerate(cats)}
    for img in images:
        for folder in (coco / "val2017", yolo / "images" / "val"):
            (folder / img["file_name"]).symlink_to(coco_dir / "val2017" / img["file_name"])
        lines = []
        for a in (a for a in anns if a["image_id"] == img["id"]):
            x, y, w, h = a["bbox"]
            W, H = img["width"], img["height"]
            lines.append(f"{cls_of[a['category_id']]} {(x + w / 2) / W:.12f} {(y + h / 2) / H:.12f} {w / W:.12f} {h / H:.12f}")
        (yolo / "labels" / "val" / (img["file_name"].rsplit(".", 1)[0] + ".txt")).write_text("\n".join(lines))
    (yolo / "data.yaml").write_text(yaml.safe_dump({"path": str(yolo), "val": "images/val", "names": [c["name"] for c in cats]}))
    return coco, yolo


@pytest.mark.data
def test_yolo_layout_gives_the_same_map_as_coco_json(coco_dir, yolov5n, tmp_path):
    coco, yolo = _crowd_free_subsets(coco_dir, tmp_path, 24)
    r_coco = make_coco_evaluator(coco).evaluate(yolov5n, progress=False)
    ev_yolo = make_yolo_evaluator(yolo)
    assert ev_yolo.name == "yolo" and len(ev_yolo) == 24
    r_yolo = ev_yolo.evaluate(yolov5n, progress=False)
    assert r_coco.n_samples == r_yolo.n_samples == 24
    for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):  # the size buckets use different areas by design
        assert math.isclose(r_coco.extra["coco_stats"][k], r_yolo.extra["coco_stats"][k], abs_tol=1e-9), k
    assert r_coco.metrics["mAP50-95"] > 0.1


@pytest.mark.data
def test_yolov8_layout_runs_end_to_end_on_random_weights(coco_dir, yolov8n_random):
    ev = make_coco_evaluator(coco_dir, conf=1e-5)  # random weights: class scores < 2e-4, so go below the default conf
    r = ev.evaluate(yolov8n_random, limit=3, progress=False)
    assert r.extra["layout"] == "yolov8" and r.n_samples == 3
    assert r.extra["n_detections"] > 0
    assert all(math.isfinite(v) for v in r.metrics.values())
    assert all(math.isfinite(v) for v in r.extra["coco_stats"].values())
    assert 0 <= r.metrics["mAP50-95"] < 0.05


# ---------------------------------------------------------------------------------------------------------------
# YOLO-layout parsing and input errors
# ---------------------------------------------------------------------------------------------------------------


def _tiny_yolo(tmp_path, names=("a", "b"), labels=None):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    for stem in ("x1", "x2"):
        cv2.imwrite(str(tmp_path / "images" / "val" / f"{stem}.jpg"), np.zeros((100, 200, 3), np.uint8))
    for stem, text in (labels or {}).items():
        (tmp_path / "labels" / "val" / f"{stem}.txt").write_text(text)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": ".", "val": "images/val", "names": list(names)}))
    return tmp_path


def test_yolo_labels_boxes_polygons_and_background(tmp_path):
    root = _tiny_yolo(tmp_path, labels={"x1": "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n"})
    ds = load_yolo(root, progress=False)
    assert [f.name for f in ds.files] == ["x1.jpg", "x2.jpg"] and ds.image_ids == [1, 2]
    anns = ds.gt.dataset["annotations"]
    assert [a["category_id"] for a in anns] == [2, 1]
    np.testing.assert_allclose(anns[0]["bbox"], [80, 30, 40, 40])
    np.testing.assert_allclose(anns[1]["bbox"], [20, 10, 40, 20])  # polygon -> its bounding box
    assert anns[0]["area"] == pytest.approx(1600) and anns[0]["iscrowd"] == 0
    assert ds.category_map(2).tolist() == [1, 2]
    with pytest.raises(SensqError, match="predicts 80 classes but data.yaml names 2"):
        ds.category_map(80)


def test_yolo_label_errors(tmp_path):
    root = _tiny_yolo(tmp_path, labels={"x1": "5 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(SensqError, match="outside 0..1"):
        load_yolo(root)
    (root / "labels" / "val" / "x1.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(SensqError, match="3 values"):
        load_yolo(root)
    (root / "data.yaml").write_text(yaml.safe_dump({"val": "images/val"}))
    with pytest.raises(SensqError, match="no 'names'"):
        load_yolo(root)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["a"], "val": "images/nope"}))
    with pytest.raises(SensqError, match="image folder not found"):
        load_yolo(root)


def test_coco_input_errors(tmp_path, coco_dir):
    with pytest.raises(SensqError, match="data folder not found"):
        load_coco(tmp_path / "missing")
    with pytest.raises(SensqError, match="no COCO annotations"):
        load_coco(tmp_path)
    (tmp_path / "annotations").mkdir()
    src = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({**src, "images": src["images"][:3]}))
    with pytest.raises(SensqError, match="no image folder"):
        load_coco(tmp_path)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(SensqError, match="3 of 3 images .* are missing"):
        load_coco(tmp_path)
    with pytest.raises(SensqError, match="annotations file not found"):
        load_coco(annotations=tmp_path / "x.json", images=tmp_path)
    with pytest.raises(SensqError, match="unknown detection layout"):
        DetectionEvaluator(load_coco(coco_dir), layout="ssd")
