"""COCO bbox metric: pycocotools COCOeval.evaluate() + accumulate() as array code (same numbers); summarize() and
the stock end-to-end path come from pycocotools itself.

pycocotools' own evaluate()+accumulate() are pure Python and take longer than the inference they score (~8 s for
206 images), so `coco_eval_arrays` re-implements those two steps with numpy, bit-identical to pycocotools (tests
compare the full precision/recall arrays against pycocotools on real detections and on synthetic edge cases).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sensq.errors import SensqError

from .dataset import GroundTruth, quiet

COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]

# ----------------------------------------------------------------------------------------------------------------
# Metric: pycocotools COCOeval.evaluate() + accumulate() as array code (same numbers), summarize() from pycocotools
# ----------------------------------------------------------------------------------------------------------------

def _bbox_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Pairwise rows of maskApi.c bbIou (xywh boxes; a crowd gt's union is the detection's area)."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = inter / union
    return np.where((w > 0) & (h > 0), out, 0.0)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)


@dataclass
class Matches:
    """pycocotools' evaluate() output as arrays: per detection (rank < maxDets[-1] within its image and category)
    its image, category, rank and score, and per area range and IoU threshold whether it matched / is ignored;
    per ground truth its image, category and ignore flag per area range. Image and category are positions in
    `img_ids` / `cat_ids`."""

    img_ids: np.ndarray
    cat_ids: np.ndarray
    d_img: np.ndarray
    d_cat: np.ndarray
    d_rank: np.ndarray
    d_score: np.ndarray
    dt_m: np.ndarray  # [A, T, D] matched
    dt_ig: np.ndarray  # [A, T, D] ignored
    g_img: np.ndarray
    g_cat: np.ndarray
    g_ign: np.ndarray  # [A, G]


def match(gt: GroundTruth, dets: np.ndarray, img_ids, all_areas: bool = True) -> Matches:
    """pycocotools COCOeval(iouType='bbox').evaluate() on `img_ids` as arrays.

    dets: rows [image_id, x, y, w, h, score, category_id]; their order breaks score ties, as in COCO.loadRes.
    all_areas=False matches for the area range "all" only (A = 1): what mAP50-95 and mAP50 read, at a quarter of
    the memory and time (kept per model for the bootstrap, see evaluators/samples.py).
    """
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    img_ids = np.unique(np.asarray(img_ids, np.int64))
    cat_ids = np.asarray(gt.cat_ids, np.int64)
    K = len(cat_ids)
    ranges = p.areaRng if all_areas else p.areaRng[:1]  # areaRng[0] is "all"
    lo = np.array([r[0] for r in ranges], np.float64)[:, None]
    hi = np.array([r[1] for r in ranges], np.float64)[:, None]
    thr = np.minimum(p.iouThrs, 1 - 1e-10)

    # Ground truth of the evaluated images, in annotation order (pycocotools' order within an image).
    gsel = np.isin(gt.img, img_ids) & np.isin(gt.cat, cat_ids)
    g_img, g_cat = np.searchsorted(img_ids, gt.img[gsel]), np.searchsorted(cat_ids, gt.cat[gsel])
    g_box, g_area, g_crowd = gt.box[gsel], gt.area[gsel], gt.crowd[gsel]
    g_ign = g_crowd[None] | (g_area[None] < lo) | (g_area[None] > hi)  # [A, G]: pycocotools' _ignore per area range

    # Detections: per (image, category) sorted by score (stable), truncated to maxDets[-1].
    dets = np.asarray(dets, np.float64).reshape(-1, 7)
    dsel = np.isin(dets[:, 0].astype(np.int64), img_ids) & np.isin(dets[:, 6].astype(np.int64), cat_ids)
    if not dsel.all():  # usually all are: no copy of every detection
        dets = dets[dsel]
    d_img = np.searchsorted(img_ids, dets[:, 0].astype(np.int64))
    d_cat = np.searchsorted(cat_ids, dets[:, 6].astype(np.int64))
    order = np.lexsort((-dets[:, 5], d_cat, d_img))  # stable: ties keep insertion order
    key = (d_img * K + d_cat)[order]
    starts = _group_starts(key)
    rank = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    order, key, rank = order[rank < p.maxDets[-1]], key[rank < p.maxDets[-1]], rank[rank < p.maxDets[-1]]
    d_img, d_cat, d_box, d_score = d_img[order], d_cat[order], dets[order, 1:5], dets[order, 5]
    D, G = len(order), len(g_box)
    d_out = ((d_box[:, 2] * d_box[:, 3])[None] < lo) | ((d_box[:, 2] * d_box[:, 3])[None] > hi)  # [A, D]

    pair_d, pair_g, pair_iou = _candidate_pairs(key, g_img * K + g_cat, d_box, g_box, g_crowd, thr.min())
    dt_m, dt_ig = _greedy_match(pair_d, pair_g, pair_iou, rank, g_ign, g_crowd, thr, D, G)
    dt_ig |= ~dt_m & d_out[:, None, :]  # unmatched detections outside the area range are ignored
    return Matches(img_ids, cat_ids, d_img, d_cat, rank, d_score, dt_m, dt_ig, g_img, g_cat, g_ign)


PAIR_BLOCK = 1 << 19  # candidate (detection, gt) pairs per round: bounds the pairwise IoU temporaries


def _candidate_pairs(d_key, g_key, d_box, g_box, g_crowd, min_iou: float):
    """(det, gt) pairs in the same image and category (equal keys) with IoU >= min_iou, and their IoU; in detection
    order, then gt order. Worked through in rounds of about PAIR_BLOCK pairs (a full-size set has millions)."""
    g_order = np.argsort(g_key, kind="stable")
    g_sorted = g_key[g_order]
    first, last = np.searchsorted(g_sorted, d_key, "left"), np.searchsorted(g_sorted, d_key, "right")
    cnt = last - first
    ends = np.cumsum(cnt)
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]
    s = 0
    while s < len(d_key):
        # detections s..e-1 hold at most PAIR_BLOCK pairs (at least one detection per round)
        e = max(s + 1, int(np.searchsorted(ends, (ends[s - 1] if s else 0) + PAIR_BLOCK, "right")))
        c = cnt[s:e]
        pair_d = np.repeat(np.arange(s, e), c)
        pair_g = g_order[np.repeat(first[s:e], c) + np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)]
        pair_iou = _bbox_iou(d_box[pair_d], g_box[pair_g], g_crowd[pair_g])
        ok = pair_iou >= min_iou
        parts.append((pair_d[ok], pair_g[ok], pair_iou[ok]))
        s = e
    return tuple(np.concatenate(x) for x in zip(*parts))


def _greedy_match(pair_d, pair_g, pair_iou, d_rank, g_ign, g_crowd, thr, D: int, G: int):
    """pycocotools' greedy matching -> (matched [A, T, D], ignored [A, T, D]).

    In detection rank order, for every (image, category) problem at once: at rank r each problem has at most one
    detection, and problems share no gt, so one vector step per rank is exact. A detection takes, among gts not yet
    matched (crowd gts always available) with IoU >= t: the non-ignored gt of highest IoU if any, else the ignored
    one of highest IoU; equal IoU -> the later gt (pycocotools' scan)."""
    A, T = g_ign.shape[0], len(thr)
    perms = [np.lexsort((pair_g, pair_iou, ~g_ign[a][pair_g], pair_d, d_rank[pair_d])) for a in range(A)]
    PG = np.stack([pair_g[pm] for pm in perms]) if len(pair_g) else np.zeros((A, 0), np.int64)
    PI = np.stack([pair_iou[pm] for pm in perms]) if len(pair_g) else np.zeros((A, 0))
    PD = pair_d[perms[0]] if len(pair_g) else np.zeros(0, np.int64)
    g_matched = np.zeros((A, T, G), bool)
    dt_m = np.zeros((A, T, D), bool)
    dt_ig = np.zeros((A, T, D), bool)
    ai_, ti_ = np.arange(A)[:, None, None], np.arange(T)[None, :, None]
    step_starts = _group_starts(d_rank[PD])
    for s, e in zip(step_starts, np.r_[step_starts[1:], len(PD)]):
        g, iou, dd = PG[:, s:e], PI[:, s:e], PD[s:e]
        seg = _group_starts(dd)
        elig = (iou[:, None, :] >= thr[None, :, None]) & (g_crowd[g][:, None, :] | ~g_matched[ai_, ti_, g[:, None, :]])
        best = np.maximum.reduceat(np.where(elig, np.arange(1, e - s + 1), 0), seg, axis=2)  # last eligible + 1
        a, t, k = np.nonzero(best)
        gm = g[a, best[a, t, k] - 1]
        g_matched[a, t, gm] = True
        dt_m[a, t, dd[seg[k]]] = True
        dt_ig[a, t, dd[seg[k]]] = g_ign[a, gm]
    return dt_m, dt_ig


def coco_eval_arrays(gt: GroundTruth, dets: np.ndarray, img_ids) -> tuple[np.ndarray, np.ndarray]:
    """precision [T,R,K,A,M] and recall [T,K,A,M] exactly as COCOeval(iouType='bbox') evaluate()+accumulate()."""
    return accumulate(match(gt, dets, img_ids))


def accumulate(mt: Matches) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools COCOeval.accumulate() over Matches: precision [T,R,K,A,M] and recall [T,K,A,M]."""
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    K, A, T, R, M = len(mt.cat_ids), len(p.areaRng), len(p.iouThrs), len(p.recThrs), len(p.maxDets)
    d_img, d_cat, d_rank, d_score, dt_m, dt_ig = mt.d_img, mt.d_cat, mt.d_rank, mt.d_score, mt.dt_m, mt.dt_ig
    g_cat, g_ign = mt.g_cat, mt.g_ign

    # accumulate(): per category and maxDets, detections of all images (image order, then rank) sorted by score.
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    npig = np.stack([np.bincount(g_cat[~g_ign[a]], minlength=K) for a in range(A)], 1)  # [K, A]
    corder = np.lexsort((d_rank, d_img, d_cat))
    cstart = np.searchsorted(d_cat[corder], np.arange(K + 1))
    for k in range(K):
        if not npig[k].any():
            continue
        idx_k = corder[cstart[k]:cstart[k + 1]]
        for m, max_det in enumerate(p.maxDets):
            idx = idx_k[d_rank[idx_k] < max_det]
            idx = idx[np.argsort(-d_score[idx], kind="mergesort")]
            nd = len(idx)
            m_, ig = dt_m[:, :, idx], dt_ig[:, :, idx]
            tp = np.cumsum(m_ & ~ig, axis=2).astype(float)
            fp = np.cumsum(~m_ & ~ig, axis=2).astype(float)
            for a in range(A):
                if npig[k, a] == 0:
                    continue
                rc = tp[a] / npig[k, a]
                pr = tp[a] / (fp[a] + tp[a] + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
                q = np.zeros((T, R))
                for t in range(T):
                    ri = np.searchsorted(rc[t], p.recThrs, side="left")
                    valid = ri < nd
                    q[t, valid] = pr[t, ri[valid]]
                precision[:, :, k, a, m] = q
    return precision, recall


BLOCK = 1 << 22  # elements of one temporary [rows x detections] block: bounded memory at any dataset size
AP_BLOCK = 1 << 20  # elements of one [rows x true positives] block; _weighted_ap holds ~8 such temporaries
MATMUL_FACTOR = 64  # per-image counts x weights (BLAS) while images x TPs <= this x FPs: the measured crossover
MATMUL_ELEMENTS = 1 << 22  # ... and while that [TPs x images] count matrix stays small


class _FalsePositivesBefore:
    """Weighted count of false positives ranked before each true positive ([B, n_tp] for B weight rows), for one
    category and IoU threshold: prepared once, then applied to each block of weight rows.

    Two exact ways, the cheaper one chosen: per-image counts before each TP times the weights (a small matmul when
    images are few), or the weights of the individual FPs summed per TP segment (linear in the FPs when images are
    many). FPs after the last TP never reach a recall threshold and are left out of both."""

    def __init__(self, n_images: int, tp_pos: np.ndarray, fp_pos: np.ndarray, fp_img: np.ndarray):
        N, n_tp = n_images, len(tp_pos)
        self.n_tp = n_tp
        self.n_before = np.searchsorted(fp_pos, tp_pos)  # FPs ranked before each TP
        self.fp_img = fp_img[: self.n_before[-1]]  # FPs after the last TP never reach a recall threshold
        self.counts = None  # [N, n_tp] cumulative per-image FP counts before each TP (the matmul way)
        if N * n_tp <= min(MATMUL_FACTOR * len(self.fp_img), MATMUL_ELEMENTS):
            seg = np.searchsorted(tp_pos, fp_pos[: len(self.fp_img)])  # the first TP each FP precedes
            before = np.bincount(seg * N + self.fp_img, minlength=n_tp * N).reshape(n_tp, N).astype(np.float64)
            self.counts = np.cumsum(before, axis=0).T

    def __call__(self, w: np.ndarray) -> np.ndarray:
        if self.counts is not None:
            return w @ self.counts
        out = np.zeros((w.shape[0], self.n_tp))
        has = self.n_before > 0
        rows = max(1, BLOCK // max(len(self.fp_img), 1))
        for r in range(0, w.shape[0], rows):  # running sum of the FP weights, read where each TP stands
            cum = np.cumsum(w[r:r + rows, self.fp_img], axis=1)
            out[r:r + rows, has] = cum[:, self.n_before[has] - 1]
        return out


def _weighted_ap(w: np.ndarray, tp_img: np.ndarray, fp: np.ndarray, npig_b: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """AP of one category at one IoU threshold for each weight row: the mean over recall thresholds of the
    precision envelope, as pycocotools accumulate() computes it on a dataset where image i appears w[b, i] times.

    tp_img: image of each true positive in score order; fp: [B, n_tp] weighted false positives ranked before each
    (_FalsePositivesBefore); npig_b: [B] non-ignored ground truths per weight row (> 0).
    pycocotools reads the envelope at the first detection whose recall reaches each threshold; recall only rises at
    true positives, so threshold r lands on true positive m exactly when rc[m-1] < r <= rc[m]: AP is the sum over
    true positives of envelope x (number of thresholds in that interval) / R."""
    if len(tp_img) == 0:
        return np.zeros(w.shape[0])
    tp = np.cumsum(w[:, tp_img], axis=1)  # [B, n_tp], integer-valued like pycocotools' cumsum
    pr = tp / (fp + tp + np.spacing(1))  # the same float expression as pycocotools
    env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    rc = tp / npig_b[:, None]
    reached = np.searchsorted(rec_thrs, rc.ravel(), side="right").reshape(rc.shape)  # thresholds r <= rc
    counts = np.diff(reached, axis=1, prepend=0)
    return (env * counts).sum(axis=1) / len(rec_thrs)


def weighted_map(mt: Matches, weights: np.ndarray, max_det: int = 100) -> dict[str, np.ndarray]:
    """mAP50-95 and mAP50 (area all, maxDets 100) for each row of `weights` ([B, n images], in mt.img_ids order):
    the value pycocotools reports on a dataset holding image i weights[b, i] times.

    The per-image matching is reused as is (it does not depend on which other images are evaluated); only the
    accumulation is redone, vectorised over the rows. Exact-score ties between two detections of one image and
    category are ordered copy-major by pycocotools and detection-major here (they never occur with float scores in
    practice)."""
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    w = np.atleast_2d(np.asarray(weights, np.float64))
    B, N = w.shape
    K, T = len(mt.cat_ids), len(p.iouThrs)
    rec_thrs = np.asarray(p.recThrs, np.float64)
    keep = mt.d_rank < max_det
    g_ok = ~mt.g_ign[0]  # area "all"
    npig_img = np.zeros((K, N))
    np.add.at(npig_img, (mt.g_cat[g_ok], mt.g_img[g_ok]), 1.0)
    npig = w @ npig_img.T  # [B, K]
    ap = np.zeros((B, K, T))
    corder = np.lexsort((mt.d_rank, mt.d_img, mt.d_cat))
    corder = corder[keep[corder]]
    cstart = np.searchsorted(mt.d_cat[corder], np.arange(K + 1))
    for k in range(K):
        if not npig_img[k].any():
            continue
        idx = corder[cstart[k]:cstart[k + 1]]
        idx = idx[np.argsort(-mt.d_score[idx], kind="mergesort")]
        img = mt.d_img[idx]
        safe = np.where(npig[:, k] > 0, npig[:, k], 1.0)
        for t in range(T):
            m, ig = mt.dt_m[0, t, idx], mt.dt_ig[0, t, idx]
            is_tp, is_fp = m & ~ig, ~m & ~ig
            tp_pos = np.flatnonzero(is_tp)
            tp_img = img[tp_pos]
            fp_before = _FalsePositivesBefore(N, tp_pos, np.flatnonzero(is_fp), img[is_fp]) if len(tp_pos) else None
            rows = max(1, AP_BLOCK // max(len(tp_pos), 1))  # bounded temporaries: blocks of weight rows
            for r in range(0, B, rows):
                wb = w[r:r + rows]
                fp = fp_before(wb) if fp_before is not None else None
                ap[r:r + rows, k, t] = _weighted_ap(wb, tp_img, fp, safe[r:r + rows], rec_thrs)
    valid = npig > 0  # a category with no ground truth in a resample is left out, as pycocotools does (-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m5095 = (ap.mean(axis=2) * valid).sum(axis=1) / valid.sum(axis=1)
        m50 = (ap[:, :, 0] * valid).sum(axis=1) / valid.sum(axis=1)
    return {"mAP50-95": np.where(valid.any(axis=1), m5095, -1.0), "mAP50": np.where(valid.any(axis=1), m50, -1.0)}


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The 12 standard stats, computed by pycocotools' own COCOeval.summarize()."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(iouType="bbox")
    ev.eval = {"precision": precision, "recall": recall}
    with quiet():
        ev.summarize()
    return np.asarray(ev.stats, np.float64)


def pycocotools_eval(gt: GroundTruth, dets: np.ndarray, img_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stock pycocotools COCOeval on the given image ids -> (stats[12], precision, recall)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = gt.coco()
    dets = np.asarray(dets, np.float64).reshape(-1, 7)
    with quiet():
        if len(dets):
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64), ev.eval["precision"], ev.eval["recall"]


def coco_stats(gt: GroundTruth, dets: np.ndarray, img_ids, metric: str = "fast") -> np.ndarray:
    """The 12 COCO bbox stats of `dets` over `img_ids` ('fast' array code or stock 'pycocotools')."""
    if metric == "pycocotools":
        return pycocotools_eval(gt, dets, img_ids)[0]
    if metric != "fast":
        raise SensqError(f"unknown COCO metric backend {metric!r}", "use metric='fast' or metric='pycocotools'")
    return summarize(*coco_eval_arrays(gt, dets, img_ids))
