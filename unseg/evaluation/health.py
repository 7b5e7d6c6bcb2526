"""Label-free health figures of a run: what a user with no ground truth can check about each stage.

Whether the mined masks look like objects (area, touching the image border, empty), whether K-means
made clusters of sensible sizes (one huge cluster means the CLS features carry little), how many
predictions Mask R-CNN makes and how confident they are, and what share of the pixels each label
takes in the pseudo-ground-truth and in DeepLab's predictions. Nothing here reads a label.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SCORE_BINS = np.linspace(0.0, 1.0, 11)


def mask_health(token_masks: Iterable[np.ndarray]) -> dict:
    """Mined masks, each an (h, w) bool token grid: mean area (share of the grid), share of the masks
    touching the grid border (a background mask usually does), share of empty masks."""
    areas, touching, empty, n = [], 0, 0, 0
    for m in token_masks:
        m = np.asarray(m, bool)
        n += 1
        if not m.any():
            empty += 1
            continue
        areas.append(float(m.mean()))
        touching += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    found = max(n - empty, 1)
    return {
        "images": n,
        "mask_area_fraction": float(np.mean(areas)) if areas else 0.0,
        "touching_border_fraction": touching / found,
        "empty_fraction": empty / max(n, 1),
    }


def cluster_sizes(category_ids: Sequence[int], k: int) -> dict:
    """Masks per K-means cluster (ids 1..k) and the share of the largest one (1/k when balanced)."""
    counts = np.bincount(np.asarray(category_ids, np.int64), minlength=k + 1)[1 : k + 1]
    return {"sizes": counts.tolist(), "largest_share": float(counts.max() / max(counts.sum(), 1))}


def prediction_health(scores_per_image: Sequence[Sequence[float]], threshold: float = 0.5) -> dict:
    """Mask R-CNN predictions: per image on average, at or above ``threshold``, and a 10-bin score histogram."""
    all_scores = np.concatenate([np.asarray(s, np.float64) for s in scores_per_image] or [np.zeros(0)])
    n = max(len(scores_per_image), 1)
    return {
        "per_image": len(all_scores) / n,
        "confident_per_image": float((all_scores >= threshold).sum()) / n,
        "images_without_prediction": sum(len(s) == 0 for s in scores_per_image),
        "score_histogram": np.histogram(all_scores, SCORE_BINS)[0].tolist(),
    }


def label_fractions(maps: Iterable[np.ndarray], n_labels: int, ignore: int = 255) -> dict:
    """Share of the pixels taken by each label 0..n_labels-1 (0 = background) and by ``ignore``."""
    counts, ignored, total = np.zeros(n_labels, np.int64), 0, 0
    for m in maps:
        m = np.asarray(m)
        ignored += int((m == ignore).sum())
        counts += np.bincount(m[m != ignore].ravel().astype(np.int64), minlength=n_labels)[:n_labels]
        total += m.size
    total = max(total, 1)
    return {"fractions": (counts / total).round(4).tolist(), "ignored": ignored / total}
