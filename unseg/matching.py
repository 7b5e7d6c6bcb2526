"""Matching predicted ids to ground-truth classes: confusion accumulation, Hungarian and majority
mappings, dataset-level IoU, box IoU.

The label-using math that evaluation shares with the reproduction-only switches of the training
stages (``cluster.align_to_gt``, ``deeplab.select_best_on_val``); everything else that scores or
reports (tables, mask AP, probes) lives in ``unseg/evaluation`` and no training stage imports it.


Every score here is computed from counts summed over the whole split (TP/FP/FN of each class
accumulated over all images, then one IoU per class), never as a mean of per-image scores: this
is what MaskDistill (``segmentation/utils/evaluate_utils.py``) and HSG (``benchmark_by_mIoU.py``)
do (reference.md §1 "Evaluation", §3.4, §4).

Conventions
-----------
- A confusion matrix ``conf`` has shape (n_pred, n_gt), int64: ``conf[p, c]`` = number of valid
  pixels predicted as cluster/class ``p`` whose ground truth is class ``c``. Pixels whose GT equals
  ``ignore_index`` (255 for VOC borders) are not counted.
- A mapping is an int array (n_pred,) sending each predicted cluster to a GT class, or to -1 when the
  cluster is left unmatched (Hungarian with more clusters than classes). Pixels of an unmatched
  cluster are wrong: they are false negatives of their GT class and false positives of no class.
- Hungarian (one-to-one) and majority (many-to-one) results are always reported under separate
  names: over-clustering inflates the majority score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from unseg.errors import UserError


class ConfusionAccumulator:
    """Accumulates the (n_pred, n_gt) confusion matrix of label maps over a dataset.

    ``update(pred, gt)`` takes (H, W) integer maps of the same shape; ``pred`` values must lie in
    [0, n_pred) and ``gt`` values in [0, n_gt) or equal ``ignore_index`` (those pixels are skipped).
    One ``np.bincount`` over ``pred * n_gt + gt`` per call.
    """

    def __init__(self, n_pred: int, n_gt: int, ignore_index: int | None = 255):
        if n_pred < 1 or n_gt < 1:
            raise UserError(f"confusion matrix needs n_pred >= 1 and n_gt >= 1, got {n_pred} and {n_gt}")
        self.n_pred = int(n_pred)
        self.n_gt = int(n_gt)
        self.ignore_index = ignore_index
        self._matrix = np.zeros((self.n_pred, self.n_gt), dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """(n_pred, n_gt) int64 counts accumulated so far (a copy)."""
        return self._matrix.copy()

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise UserError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
        gt = gt.ravel().astype(np.int64)
        pred = pred.ravel().astype(np.int64)
        if self.ignore_index is not None:
            valid = gt != self.ignore_index
            gt, pred = gt[valid], pred[valid]
        _check_range(pred, self.n_pred, "predicted label")
        _check_range(gt, self.n_gt, "ground-truth label")
        counts = np.bincount(pred * self.n_gt + gt, minlength=self.n_pred * self.n_gt)
        self._matrix += counts.reshape(self.n_pred, self.n_gt)


def _check_range(values: np.ndarray, n: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= n):
        bad = values[(values < 0) | (values >= n)][0]
        raise UserError(f"{what} {int(bad)} is outside [0, {n})")


def _check_conf(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise UserError(f"confusion matrix must be 2-D (n_pred, n_gt), got shape {conf.shape}")
    return conf.astype(np.int64)


def hungarian_mapping(conf: np.ndarray) -> np.ndarray:
    """One-to-one cluster→class mapping maximising the number of matched pixels.

    argmax over injective maps m of Σ_p conf[p, m(p)], solved by ``scipy.optimize.linear_sum_assignment``
    (the rule of IIC / MaskDistill's ``_hungarian_match``, reference.md §1.1 "Clustering of masks").
    With n_pred > n_gt the n_pred − n_gt left-over clusters map to -1; with n_pred < n_gt some classes
    get no cluster. Returns (n_pred,) int64.
    """
    conf = _check_conf(conf)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_mapping(conf: np.ndarray) -> np.ndarray:
    """Many-to-one mapping: each cluster → its most frequent GT class (first on ties); empty clusters → -1.

    MaskDistill's ``_majority_match`` for over-clustering (reference.md §1.1). Returns (n_pred,) int64.
    """
    conf = _check_conf(conf)
    mapping = conf.argmax(axis=1).astype(np.int64)
    mapping[conf.sum(axis=1) == 0] = -1
    return mapping


def identity_mapping(n_pred: int, n_gt: int) -> np.ndarray:
    """Prediction id p → class p (p < n_gt), else -1: for predictions whose ids already are GT ids
    (MaskDistill's direct evaluation, reference.md §1 "Evaluation": no pixel-level Hungarian)."""
    mapping = np.arange(n_pred, dtype=np.int64)
    mapping[mapping >= n_gt] = -1
    return mapping


def class_counts(conf: np.ndarray, mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN), each (n_gt,) int64, of the prediction relabelled by ``mapping``.

    TP_c = Σ_{p: m(p)=c} conf[p, c];  FP_c = Σ_{p: m(p)=c} Σ_{c'≠c} conf[p, c'];
    FN_c = Σ_p conf[p, c] − TP_c (includes pixels of clusters mapped to other classes or to -1).
    """
    conf = _check_conf(conf)
    mapping = np.asarray(mapping, dtype=np.int64)
    n_pred, n_gt = conf.shape
    if mapping.shape != (n_pred,):
        raise UserError(f"mapping has shape {mapping.shape}, expected ({n_pred},)")
    _check_range(mapping[mapping != -1], n_gt, "mapped class")
    # merged[c, c'] = pixels predicted (after mapping) as c with GT c'; rows for -1 are dropped.
    matched = mapping >= 0
    merged = np.zeros((n_gt, n_gt), dtype=np.int64)
    np.add.at(merged, mapping[matched], conf[matched])
    tp = np.diag(merged).copy()
    fp = merged.sum(axis=1) - tp
    fn = conf.sum(axis=0) - tp
    return tp, fp, fn


def scores(conf: np.ndarray, mapping: np.ndarray, absent: str = "exclude") -> dict:
    """mIoU, pixel accuracy and per-class IoU of the prediction relabelled by ``mapping``.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) from dataset-level counts (see :func:`class_counts`);
    pixel_accuracy = Σ_c TP_c / Σ conf (all valid pixels, those of unmatched clusters included).

    ``absent`` says what happens to a class with TP+FP+FN = 0 (absent from both GT and prediction):
    ``"exclude"`` (default) reports its IoU as ``None`` and leaves it out of the mean, so the result
    is NaN-free; ``"zero"`` counts it as IoU 0 in the mean (the official MaskDistill/HSG rule,
    ``TP / max(TP+FP+FN, 1e-8)`` averaged over all classes). Both agree when every class occurs,
    as on VOC val. Returns ``{"miou", "pixel_accuracy", "per_class_iou", "n_classes"}`` where
    ``n_classes`` is the number of classes in the mean; ``miou`` is ``None`` if that number is 0.
    """
    if absent not in ("exclude", "zero"):
        raise UserError(f"absent must be 'exclude' or 'zero', got {absent!r}")
    tp, fp, fn = class_counts(conf, mapping)
    denom = tp + fp + fn
    per_class: list[float | None] = [
        float(t / d) if d > 0 else (0.0 if absent == "zero" else None) for t, d in zip(tp, denom, strict=True)
    ]
    counted = [v for v in per_class if v is not None]
    total = int(np.asarray(conf).sum())
    return {
        "miou": float(np.mean(counted)) if counted else None,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "per_class_iou": per_class,
        "n_classes": len(counted),
    }


def evaluate_clusters(conf: np.ndarray, absent: str = "exclude") -> dict:
    """Both protocols on one confusion matrix: ``{"hungarian": scores(...), "majority": scores(...)}``,
    each with its ``"mapping"`` (list, -1 = unmatched) added."""
    out = {}
    for name, rule in (("hungarian", hungarian_mapping), ("majority", majority_mapping)):
        mapping = rule(conf)
        out[name] = {**scores(conf, mapping, absent=absent), "mapping": mapping.tolist()}
    return out


def relabel(pred: np.ndarray, mapping: Sequence[int] | np.ndarray, unmatched: int = 255) -> np.ndarray:
    """Apply a cluster→class mapping to a label map; unmatched clusters (-1) become ``unmatched``."""
    lut = np.asarray(mapping, dtype=np.int64).copy()
    lut[lut < 0] = unmatched
    return lut[np.asarray(pred, dtype=np.int64)]


def box_iou_xyxy(box: np.ndarray, boxes: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """IoU of one XYXY box (4,) with boxes (n, 4): |∩| / (|a| + |b| − |∩|), ``eps`` as in ``iou_box``."""
    iw = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(min=0)
    ih = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(min=0)
    inter = iw * ih
    area_a = (box[2] - box[0]) * (box[3] - box[1] + eps)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1] + eps)
    return inter / (area_a + area_b - inter + eps)
