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


# A run "did not find objects" when any of these holds (documented in the README; each check names its fix).
MASK_AREA_MAX = 0.9  # mined masks cover more than this share of the image on average: no object is separated
BORDER_SHARE_MAX = 0.95  # more than this share of the masks touch the image border: background, not objects
CLUSTER_SHARE_MAX = 0.5  # one K-means cluster holds more than max(this, 2 / k) of the masks
AT_CAP_SHARE = 0.95  # Mask R-CNN's predictions per image reach this share of distill.detections_per_image
ONE_LABEL_SHARE = 0.99  # one label takes this share of DeepLab's pixels: it predicts one class


def verdict(figures: dict, detections_per_image: int) -> dict:
    """``{"verdict": "ok" | "failed", "failed": [one line per failed check]}`` from the figures of a run
    (a figure missing from ``figures`` is not checked).

    Each check compares one health figure with a named threshold above; a failed line says what was seen
    and what to change. A run can pass every check and still be poor: they catch collapse, not quality."""
    failed = []
    empty = {"mask_area_fraction": 0.0, "touching_border_fraction": 0.0}
    m, c = figures.get("mined_masks", empty), figures.get("clusters", {"sizes": [], "largest_share": 0.0})
    if m["mask_area_fraction"] > MASK_AREA_MAX:
        failed.append(
            f"mined masks cover {100 * m['mask_area_fraction']:.1f} % of each image (> {100 * MASK_AREA_MAX:.0f} %): "
            "the affinity rule separates nothing; train the backbone longer or check mining.proposals"
        )
    if m["touching_border_fraction"] > BORDER_SHARE_MAX:
        failed.append(
            f"{100 * m['touching_border_fraction']:.1f} % of the mined masks touch the image border "
            f"(> {100 * BORDER_SHARE_MAX:.0f} %): they are background; check mining.proposals and mining.cls_mass"
        )
    k = len(c["sizes"])
    largest = max(CLUSTER_SHARE_MAX, 2 / max(k, 1))
    if k >= 2 and c["largest_share"] > largest:
        failed.append(
            f"one K-means cluster holds {100 * c['largest_share']:.0f} % of the masks (> {100 * largest:.0f} %): "
            "the CLS features carry little; train the backbone longer or lower cluster.classes"
        )
    per_image = figures.get("maskrcnn", {}).get("per_image", 0.0)
    if per_image >= AT_CAP_SHARE * detections_per_image:
        failed.append(
            f"Mask R-CNN predicts {per_image:.1f} instances per image, at its cap of {detections_per_image}: "
            "it fires everywhere; check the pseudo-labels (unseg inspect grid)"
        )
    fractions = figures.get("deeplab", {}).get("fractions", [])
    if fractions and max(fractions) >= ONE_LABEL_SHARE:
        top = int(np.argmax(fractions))
        failed.append(
            f"DeepLab predicts label {top} on {100 * max(fractions):.1f} % of the pixels: it learned one class; "
            "check the pseudo-ground-truth shares and filter.tau"
        )
    return {"verdict": "failed" if failed else "ok", "failed": failed}
