"""Per-sample results and the paired bootstrap: resampled COCO mAP equals stock pycocotools on the resampled dataset
(brute force, same resample indices); top-1 intervals equal a direct recomputation; pairing shares resamples."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from sensq.evaluators.coco import GroundTruth, pycocotools_eval
from sensq.evaluators.coco.metric import match, weighted_map
from sensq.evaluators.samples import (DetectionSamples, MeanSamples, PairedBootstrap, bca_interval,
                                      bootstrap_weights, jackknife_weights, percentile_interval, samples_from_arrays)


def _synthetic(seed: int = 0, n_img: int = 12, n_cat: int = 3):
    """Ground truth with crowd boxes and empty images, plus noisy detections (distinct float scores)."""
    rng = np.random.default_rng(seed)
    images, anns, rows = [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i * 10, "width": 200, "height": 200, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(0, 5))):
            x, y, w, h = rng.uniform(0, 120, 2).tolist() + rng.uniform(5, 70, 2).tolist()
            cat = int(rng.integers(1, n_cat + 1))
            anns.append({"id": len(anns) + 1, "image_id": i * 10, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            for _ in range(int(rng.integers(0, 3))):  # detections near the object, some with the wrong class
                jit = rng.normal(0, 6, 4)
                rows.append([i * 10, x + jit[0], y + jit[1], max(1, w + jit[2]), max(1, h + jit[3]), rng.random(),
                             cat if rng.random() < 0.8 else int(rng.integers(1, n_cat + 1))])
        for _ in range(int(rng.integers(0, 3))):  # background false positives
            rows.append([i * 10, *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2), rng.random(), int(rng.integers(1, n_cat + 1))])
    gt = GroundTruth({"images": images, "annotations": anns,
                      "categories": [{"id": c, "name": str(c)} for c in range(1, n_cat + 1)]})
    return gt, np.asarray(rows, np.float64).reshape(-1, 7)


def _resampled(gt: GroundTruth, dets: np.ndarray, image_ids: np.ndarray, draw: np.ndarray):
    """The dataset where the drawn images appear once per draw, each copy under a new id (ascending in draw order)."""
    draw = np.sort(draw)
    images, anns, rows = [], [], []
    by_img = {}
    for a in gt.dataset["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    for new_id, j in enumerate(draw, start=1):
        old = int(image_ids[j])
        images.append({"id": new_id, "width": 1, "height": 1, "file_name": f"{new_id}.jpg"})
        for a in by_img.get(old, []):
            b = copy.deepcopy(a)
            b["id"], b["image_id"] = len(anns) + 1, new_id
            anns.append(b)
        d = dets[dets[:, 0] == old].copy()
        d[:, 0] = new_id
        rows.append(d)
    new_gt = GroundTruth({"images": images, "annotations": anns, "categories": gt.dataset["categories"]})
    return new_gt, np.concatenate(rows) if rows else np.zeros((0, 7)), list(range(1, len(draw) + 1))


def _check_against_pycocotools(gt, dets, image_ids, n_draws=4, seed=3):
    idx = np.arange(len(image_ids))
    mt = match(gt, dets, image_ids)
    w = bootstrap_weights(len(idx), n_draws, seed)
    fast = weighted_map(mt, w)
    # the per-model matching kept for the bootstrap (area "all" only) gives the same numbers
    lean = weighted_map(match(gt, dets, image_ids, all_areas=False), w)
    assert all(np.array_equal(fast[k], lean[k]) for k in fast)
    unit = weighted_map(mt, np.ones((1, len(idx))))
    stats = pycocotools_eval(gt, dets, image_ids)[0]
    assert unit["mAP50-95"][0] == pytest.approx(stats[0], abs=1e-12) and unit["mAP50"][0] == pytest.approx(stats[1], abs=1e-12)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(idx), size=(n_draws, len(idx)))  # the same draws bootstrap_weights made
    for b in range(n_draws):
        assert np.array_equal(np.bincount(draws[b], minlength=len(idx)), w[b])
        rgt, rdets, rids = _resampled(gt, dets, image_ids, draws[b])
        ref = pycocotools_eval(rgt, rdets, rids)[0]
        assert fast["mAP50-95"][b] == pytest.approx(ref[0], abs=1e-12), b
        assert fast["mAP50"][b] == pytest.approx(ref[1], abs=1e-12), b


@pytest.mark.parametrize("way", ["matmul", "gather"])
def test_weighted_map_equals_pycocotools_on_resampled_synthetic_data(way, monkeypatch):
    """Both exact ways of counting the false positives before each true positive (small and large datasets)."""
    import sensq.evaluators.coco.metric as metric

    monkeypatch.setattr(metric, "MATMUL_FACTOR", 1e12 if way == "matmul" else 0)
    monkeypatch.setattr(metric, "MATMUL_ELEMENTS", 1e12)
    monkeypatch.setattr(metric, "BLOCK", 64)  # several blocks of weight rows even on a small case
    monkeypatch.setattr(metric, "AP_BLOCK", 8)
    monkeypatch.setattr(metric, "PAIR_BLOCK", 4)  # candidate pairs in many rounds
    for seed in range(3):
        gt, dets = _synthetic(seed)
        ids = np.array([im["id"] for im in gt.dataset["images"]])
        _check_against_pycocotools(gt, dets, ids, n_draws=5, seed=seed)


def test_weighted_map_drops_categories_absent_from_a_resample():
    gt, dets = _synthetic(7, n_img=6, n_cat=4)
    ids = np.array([im["id"] for im in gt.dataset["images"]])
    mt = match(gt, dets, ids)
    w = np.zeros((1, len(ids)))
    w[0, 0] = 3.0  # one image drawn three times: categories it lacks are not averaged in (pycocotools: -1)
    rgt, rdets, rids = _resampled(gt, dets, ids, np.array([0, 0, 0]))
    expected = pycocotools_eval(rgt, rdets, rids)[0][0]
    assert weighted_map(mt, w)["mAP50-95"][0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.data
def test_bootstrap_on_real_detections_equals_pycocotools(yolov5n_coco_fp32):
    ev, res, dets = yolov5n_coco_fp32  # yolov5n FP32 on every val image (scored once per session)
    ids = np.asarray(ev.data.image_ids[:40])
    dets = dets[np.isin(dets[:, 0], ids)]  # the first 40 images' detections
    _check_against_pycocotools(ev.data.gt, dets, ids, n_draws=3, seed=11)
    # the samples object scores subsets exactly as a fresh evaluation of that subset would
    sub = list(range(10, 30))
    assert res.samples.value(sub) == pytest.approx(pycocotools_eval(ev.data.gt, dets, ids[sub])[0][0], abs=1e-12)


def test_paired_difference_uses_the_same_resamples():
    rng = np.random.default_rng(0)
    idx = np.arange(50)
    a = MeanSamples(idx, {"top1": rng.random(50) < 0.8})
    b = MeanSamples(idx, {"top1": a.scores["top1"].copy()})
    b.scores["top1"][:5] = ~b.scores["top1"][:5]  # b differs from a on five samples only
    pb = PairedBootstrap(idx, n_boot=500, seed=1)
    d = pb.difference(a, b)
    w = bootstrap_weights(50, 500, 1)
    da = (w @ a.scores["top1"]) / 50 - (w @ b.scores["top1"]) / 50
    jw = jackknife_weights(50)
    ja = (jw @ a.scores["top1"]) / 50 - (jw @ b.scores["top1"]) / 50
    assert (d.lo, d.hi) == bca_interval(d.value, da, ja)
    assert d.value == pytest.approx(a.scores["top1"].mean() - b.scores["top1"].mean())
    # paired: the interval of the difference is far narrower than the two marginal intervals suggest
    ma, mb = pb.metric(a), pb.metric(b)
    assert (d.hi - d.lo) < 0.5 * ((ma.hi - ma.lo) + (mb.hi - mb.lo))


def test_samples_roundtrip_through_arrays(tmp_path):
    gt, dets = _synthetic(1)
    ids = np.array([im["id"] for im in gt.dataset["images"]])
    rows = {i: dets[dets[:, 0] == ids[i]] for i in range(len(ids))}
    s = DetectionSamples(gt, ids, rows)

    class Ev:  # what samples_from_arrays needs from an evaluator
        class data:
            pass

    Ev.data.gt, Ev.data.image_ids = gt, ids
    np.savez(tmp_path / "s.npz", **s.to_arrays())
    back = samples_from_arrays(dict(np.load(tmp_path / "s.npz")), Ev)
    assert back.value(range(len(ids))) == s.value(range(len(ids)))
    m = MeanSamples(np.array([3, 1]), {"top1": np.array([True, False])})
    np.savez(tmp_path / "m.npz", **m.to_arrays())
    back = samples_from_arrays(dict(np.load(tmp_path / "m.npz")), Ev)
    assert back.value([1]) == 0.0 and back.value([3]) == 1.0
    merged = back.merge(MeanSamples(np.array([5]), {"top1": np.array([True])}))
    assert merged.value([1, 3, 5]) == pytest.approx(2 / 3)


def test_bca_interval_covers_the_truth_at_the_stated_rate():
    """Coverage by simulation: Bernoulli(0.8) accuracy on 60 samples, 400 datasets; BCa's 95 % should cover p."""
    rng = np.random.default_rng(5)
    n, hits, trials = 60, 0, 400
    w, jw = bootstrap_weights(n, 400, 0), jackknife_weights(n)
    for _ in range(trials):
        x = (rng.random(n) < 0.8).astype(float)
        lo, hi = bca_interval(x.mean(), w @ x / n, jw @ x / n)
        hits += lo <= 0.8 <= hi
    assert 0.90 <= hits / trials <= 0.99


def test_bca_interval_agrees_with_scipy_on_a_skewed_mean():
    """scipy.stats.bootstrap(method="BCa") on the mean of 40 lognormal samples, where BCa and the percentile
    interval differ by 0.026 and 0.041: sensq's BCa from its own resamples and jackknife agrees with scipy's from
    other resamples to within the resampling error (~0.003 at 20,000 resamples)."""
    from scipy.stats import bootstrap

    x = np.random.default_rng(11).lognormal(0.0, 1.0, 40)
    n, b = len(x), 20000
    w = bootstrap_weights(n, b, 7)
    ours = bca_interval(float(x.mean()), w @ x / n, jackknife_weights(n) @ x / n)
    ref = bootstrap((x,), np.mean, method="BCa", n_resamples=b, random_state=np.random.default_rng(123)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.01)
    plo, phi = percentile_interval(w @ x / n)
    assert abs(plo - ref.low) > 0.02 and abs(phi - ref.high) > 0.02  # the comparison can tell BCa from percentile


def test_bca_corrects_an_upward_bootstrap_bias():
    """When resamples are biased upwards, the BCa interval sits lower than the percentile interval: as for the basic
    bootstrap, the estimate is taken to carry the same bias, so the interval centres near value - bias."""
    rng = np.random.default_rng(0)
    draws = 0.30 + 0.012 + 0.016 * rng.standard_normal(1000)  # like resampled mAP: mean 0.312 for a value of 0.300
    jack = 0.30 + 0.001 * rng.standard_normal(100)
    lo, hi = bca_interval(0.30, draws, jack)
    plo, phi = percentile_interval(draws)
    assert lo < plo and hi < phi and lo < 0.30 < hi
    assert (lo + hi) / 2 == pytest.approx(0.30 - 0.012, abs=0.008)


def test_matchings_are_bounded_over_all_models_and_plain_values_memoized(monkeypatch):
    """A search holds many models' per-sample results: at most MATCH_MEMORY matchings stay in memory whatever the
    number of models, an evicted matching gives the same numbers when recomputed, and a model that is gone takes
    its matchings with it (its id may be reused)."""
    import gc

    import sensq.evaluators.samples as samples_mod

    monkeypatch.setattr(samples_mod, "_matchings", samples_mod.OrderedDict())
    gt, _ = _synthetic(2)
    ids = np.array([im["id"] for im in gt.dataset["images"]])
    models = []
    for seed in range(5):  # five models' detections on the same images
        dets = _synthetic(2)[1].copy()
        dets[:, 5] = np.random.default_rng(seed).random(len(dets))
        models.append(DetectionSamples(gt, ids, {i: dets[dets[:, 0] == ids[i]] for i in range(len(ids))}))
    sub, w = np.arange(8), bootstrap_weights(8, 3, 1)
    first = [m.metric(sub, w) for m in models]
    assert len(samples_mod._matchings) == samples_mod.MATCH_MEMORY
    again = [m.metric(sub, w) for m in models]  # the first models' matchings were evicted and are recomputed
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    fresh = pycocotools_eval(gt, np.concatenate([models[0].rows[i] for i in range(8)]), ids[:8])[0][0]
    assert models[0].value(sub) == pytest.approx(fresh, abs=1e-12)
    samples_mod._matchings.clear()
    assert models[0].value(sub) == pytest.approx(fresh, abs=1e-12) and not samples_mod._matchings  # memoized
    models[-1].metric(sub, w)
    owner = id(models[-1])
    del models[-1], first, again
    gc.collect()
    assert not any(k[0] == owner for k in samples_mod._matchings)
