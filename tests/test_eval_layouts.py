"""Every YOLO output layout through DetectionEvaluator: tiny ONNX models that emit known boxes score a mAP computed by
hand; layout detection and class counts per layout."""
from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sensq.evaluators.coco import (
    COCO80_TO_91,
    DetectionEvaluator,
    GroundTruth,
    detect_layout,
    postprocess,
)
from sensq.evaluators.coco.dataset import DetectionSet
from sensq.evaluators.coco.decode import num_classes

from sensq.errors import SensqError

NAMES = {i: f"c{i}" for i in range(80)}
A = (10.0, 20.0, 110.0, 70.0)  # class 0, detected exactly
B = (150.0, 60.0, 250.0, 200.0)  # class 3, detected 16 px to the right
SHIFT = 16.0
FP = (20.0, 150.0, 60.0, 230.0)  # class 5: no ground truth of that class anywhere
# Hand computation. IoU of B and its shifted copy: (100 - 16) * 140 / ((100 + 16) * 140) = 0.724, so at IoU
# thresholds 0.50 ... 0.70 (5 of 10) B is found on both images (AP 1) and above them never (AP 0): class 3 has
# AP50-95 0.5, class 0 has 1.0, and class 5 has no ground truth, so COCO leaves it out of the mean.
EXPECTED_MAP, EXPECTED_MAP50 = (1.0 + 0.5) / 2, 1.0
DETECTIONS = [(A, 0, 0.9), ((B[0] + SHIFT, B[1], B[2] + SHIFT, B[3]), 3, 0.8), (FP, 5, 0.3)]


def _dataset(tmp_path) -> DetectionSet:
    """Two 320x240 images with the same two objects (letterboxed into 640: ratio 2, 80 px padding top and bottom)."""
    files = []
    for i in (1, 2):
        f = tmp_path / f"{i}.png"
        cv2.imwrite(str(f), np.full((240, 320, 3), 100, np.uint8))
        files.append(f)
    anns = [{"id": k + 1, "image_id": img, "category_id": COCO80_TO_91[c], "bbox": [x1, y1, x2 - x1, y2 - y1],
             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            for k, (img, ((x1, y1, x2, y2), c)) in enumerate((img, obj) for img in (1, 2) for obj in ((A, 0), (B, 3)))]
    gt = GroundTruth({"images": [{"id": i, "file_name": f"{i}.png", "width": 320, "height": 240} for i in (1, 2)],
                      "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in COCO80_TO_91]})
    return DetectionSet(files, [1, 2], gt, yolo_layout=False, source="synthetic")


def _to_input(box):
    """Original-image xyxy -> model-input xyxy under the letterbox above."""
    x1, y1, x2, y2 = box
    return 2 * x1, 2 * y1 + 80, 2 * x2, 2 * y2 + 80


def _head_output(layout: str) -> np.ndarray:
    n = 120  # more candidates than 4 + 80 fields, as in real heads (the layout is read from the shape)
    if layout == "end2end":
        out = np.zeros((1, 300, 6), np.float32)
        for r, (box, c, s) in enumerate(DETECTIONS):  # best first, as after the in-graph top-k
            out[0, r] = (*_to_input(box), s, c)
        return out
    rows = np.zeros((n, 85 if layout == "yolov5" else 84), np.float32)
    for r, (box, c, s) in enumerate(DETECTIONS):
        x1, y1, x2, y2 = _to_input(box)
        rows[r, :4] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        if layout == "yolov5":
            rows[r, 4], rows[r, 5 + c] = 1.0, s  # objectness x class probability = s
        else:
            rows[r, 4 + c] = s
    if layout == "yolov8":
        return np.ascontiguousarray(rows.T)[None]  # (4 + C) x N
    return rows[None]  # yolov5, and yolov8 transposed (N x (4 + C))


def _constant_model(path, out: np.ndarray, metadata: dict) -> str:
    """images [1,3,640,640] -> out (the same for every image: images * 0 is added so the input is used)."""
    nodes = [helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Add", ["head", "z"], ["output0"])]
    graph = helper.make_graph(nodes, "constant_head",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
                              [numpy_helper.from_array(out, "head"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return str(path)


CASES = [  # (layout of the output, metadata, the layout the evaluator must detect)
    ("yolov5", {"stride": "32", "names": str(NAMES)}, "yolov5"),
    ("yolov5", {}, "yolov5"),
    ("yolov8", {"task": "detect", "version": "8.4.190", "stride": "32", "names": str(NAMES)}, "yolov8"),
    ("yolov8_t", {"names": str(NAMES)}, "yolov8"),
    ("end2end", {"task": "detect", "version": "8.4.190", "end2end": "True", "names": str(NAMES)}, "end2end"),
    ("end2end", {"names": str(NAMES)}, "end2end"),
    ("end2end", {}, "end2end"),
]


@pytest.mark.parametrize("layout,metadata,expected", CASES)
@pytest.mark.parametrize("metric", ["fast", "pycocotools"])
def test_each_layout_scores_the_hand_computed_map(tmp_path, layout, metadata, expected, metric):
    model = _constant_model(tmp_path / "m.onnx", _head_output(layout), metadata)
    res = DetectionEvaluator(_dataset(tmp_path), metric=metric).evaluate(model, progress=False)
    assert res.extra["layout"] == expected
    assert res.metrics["mAP50-95"] == pytest.approx(EXPECTED_MAP, abs=1e-9)
    assert res.metrics["mAP50"] == pytest.approx(EXPECTED_MAP50, abs=1e-9)
    assert res.extra["n_detections"] == 2 * len(DETECTIONS)


def test_end2end_decode_keeps_the_graph_selection():
    out = _head_output("end2end")[0]
    out[3] = (*_to_input(A), 0.85, 0)  # a near duplicate of A: end-to-end heads are not suppressed again
    out[4] = (*_to_input(B), 0.0005, 3)  # below conf
    out[5] = (*_to_input(B), 0.7, 91)  # an index past the classes
    boxes, scores, cls = postprocess(out, "end2end", conf=0.001, nc=80)
    np.testing.assert_allclose(scores, [0.9, 0.85, 0.8, 0.3], rtol=1e-6)
    assert cls.tolist() == [0, 0, 3, 5]
    np.testing.assert_allclose(boxes[1], _to_input(A), atol=1e-4)
    assert len(postprocess(out, "end2end", conf=0.001, nc=80, max_det=2)[1]) == 2


def test_layout_detection_and_class_counts():
    names80 = {"names": str(NAMES)}
    assert detect_layout((300, 6), {"end2end": "True", "task": "detect"}) == "end2end"
    assert detect_layout((300, 6), {"task": "detect", "version": "8.1.0"}) == "end2end"  # YOLOv10 before the key
    assert detect_layout((300, 6), names80) == "end2end" and detect_layout((300, 6)) == "end2end"
    assert detect_layout((25200, 6)) == "yolov5"  # a one-class YOLOv5 grid, not a max_det list
    assert detect_layout((25200, 6), {"names": str({0: "a"})}) == "yolov5"
    assert detect_layout((8400, 6), {"names": str({0: "a", 1: "b"})}) == "yolov8"  # 2 classes, transposed
    with pytest.raises(SensqError, match="not K x 6"):
        detect_layout((84, 8400), {"end2end": "True"})
    assert num_classes("yolov5", (25200, 85), None) == 80
    assert num_classes("yolov8", (84, 8400), None) == 80 and num_classes("yolov8", (8400, 84), None) == 80
    assert num_classes("end2end", (300, 6), None) == 80
    assert num_classes("end2end", (300, 6), ["a", "b", "c"]) == 3
    with pytest.raises(SensqError, match="unknown detection layout"):
        num_classes("ssd", (10, 4), None)
