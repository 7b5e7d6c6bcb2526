"""Foreground IoU of binary masks against the ground-truth foreground, summed over a split
(the confusion matrices, cluster-to-class mappings and IoU live in :mod:`unseg.matching`)."""

from __future__ import annotations

import numpy as np

from unseg.errors import UserError


class ForegroundIoU:
    """Dataset-level IoU of binary foreground predictions against the GT foreground.

    GT foreground = pixels whose label is neither ``background_index`` nor ``ignore_index``; ignored
    pixels are removed from the prediction too. Over the split:
    IoU = Σ|P∩G| / Σ|P∪G|, precision = Σ|P∩G| / Σ|P|, recall = Σ|P∩G| / Σ|G|
    (``None`` when a denominator is 0).
    """

    def __init__(self, background_index: int = 0, ignore_index: int | None = 255):
        self.background_index = background_index
        self.ignore_index = ignore_index
        self.intersection = 0
        self.union = 0
        self.pred_area = 0
        self.gt_area = 0

    def update(self, pred_mask: np.ndarray, gt: np.ndarray) -> None:
        pred_mask = np.asarray(pred_mask).astype(bool)
        gt = np.asarray(gt)
        if pred_mask.shape != gt.shape:
            raise UserError(f"foreground mask shape {pred_mask.shape} differs from ground-truth shape {gt.shape}")
        valid = gt != self.ignore_index if self.ignore_index is not None else np.ones(gt.shape, bool)
        gt_fg = valid & (gt != self.background_index)
        pred_fg = pred_mask & valid
        self.intersection += int(np.count_nonzero(pred_fg & gt_fg))
        self.union += int(np.count_nonzero(pred_fg | gt_fg))
        self.pred_area += int(np.count_nonzero(pred_fg))
        self.gt_area += int(np.count_nonzero(gt_fg))

    def result(self) -> dict:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b > 0 else None

        return {
            "iou": ratio(self.intersection, self.union),
            "precision": ratio(self.intersection, self.pred_area),
            "recall": ratio(self.intersection, self.gt_area),
        }
