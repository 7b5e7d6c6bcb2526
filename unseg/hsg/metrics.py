"""NFCovering (HSG Sec. 4): how well a segmentation covers the ground truth's foreground regions."""

from __future__ import annotations

import numpy as np


def nf_covering(gt: np.ndarray, segments: np.ndarray, ignore: int | None = 255) -> float | None:
    """Mean over the ground-truth foreground regions (ids other than 0 and ``ignore``) of the best IoU of any
    predicted segment with that region, the seed's formula. Ignored pixels count in neither. None when
    there is no foreground region."""
    gt, seg = np.asarray(gt).reshape(-1), np.asarray(segments).reshape(-1)
    if ignore is not None:
        keep = gt != ignore
        gt, seg = gt[keep], seg[keep]
    regions = np.unique(gt[gt != 0])
    if not len(regions):
        return None
    _, seg_ids = np.unique(seg, return_inverse=True)
    _, gt_ids = np.unique(gt, return_inverse=True)
    table = np.zeros((gt_ids.max() + 1, seg_ids.max() + 1), np.int64)
    np.add.at(table, (gt_ids, seg_ids), 1)
    gt_size, seg_size = table.sum(1, keepdims=True), table.sum(0, keepdims=True)
    iou = table / (gt_size + seg_size - table)
    rows = np.searchsorted(np.unique(gt), regions)
    return float(iou[rows].max(1).mean())
