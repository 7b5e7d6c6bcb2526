"""Turning label maps into the flat metrics rows that ``evaluate`` writes, and the markdown table."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from unseg import coco
from unseg.matching import ConfusionAccumulator, evaluate_clusters


def score_label_maps(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_pred: int, n_gt: int, ignore_index: int) -> dict:
    """Hungarian (one-to-one) and majority (many-to-one) mIoU / pixel accuracy over a whole split.

    ``pairs`` yields (prediction, ground truth) maps of one image at the original resolution.
    """
    acc = ConfusionAccumulator(n_pred, n_gt, ignore_index)
    images = 0
    for pred, gt in pairs:
        acc.update(pred, gt)
        images += 1
    res = evaluate_clusters(acc.matrix)
    h, m = res["hungarian"], res["majority"]
    return {
        "miou": h["miou"],
        "pixel_accuracy": h["pixel_accuracy"],
        "object_precision": object_precision(acc.matrix, h["mapping"]),
        "miou_majority": m["miou"],
        "pixel_accuracy_majority": m["pixel_accuracy"],
        "per_class_iou": h["per_class_iou"],
        "images": images,
    }


def object_precision(conf: np.ndarray, mapping) -> float | None:
    """Of the pixels given an object id (prediction id >= 1; 0 is background), the fraction whose matched
    class is right: sum_{p>=1} conf[p, mapping[p]] / sum_{p>=1} conf[p, :] (unmatched ids count as wrong).

    It is what the confidence filter claims to raise (MaskDistill Sec. 3.3: confident masks tend to be
    correct), while mIoU also pays for the objects it drops. None when no pixel has an object id.
    """
    conf = np.asarray(conf)
    labelled = conf[1:].sum()
    if labelled == 0:
        return None
    right = sum(conf[p, c] for p, c in enumerate(mapping) if p >= 1 and c >= 0)
    return float(right / labelled)


def rasterise_annotations(anns: list[dict], height: int, width: int) -> np.ndarray:
    """(H, W) label map from COCO annotations: 0 = background, ``category_id`` inside each mask.

    Annotations are painted from the least to the most confident, so where they overlap the most
    confident one ends on top (pseudo-labels all have the same score: the later one in the file wins).
    """
    lab = np.zeros((height, width), np.int64)
    for ann in sorted(anns, key=lambda a: a.get("score", 1.0)):
        lab[coco.decode_rle(ann["segmentation"])] = ann["category_id"]
    return lab


def markdown_table(rows: dict[str, dict], columns: list[tuple[str, str]], scale: float = 100.0) -> str:
    """A markdown table: one row per entry of ``rows``, ``columns`` = [(key, header)], values x ``scale``."""

    def cell(v):
        return "–" if v is None else f"{scale * v:.1f}"

    head = "| setup | " + " | ".join(h for _, h in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    body = [f"| {name} | " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for name, r in rows.items()]
    return "\n".join([head, sep, *body]) + "\n"


def evaluation_markdown(
    split: str,
    n_images: int,
    n_classes: int,
    k: int,
    rows: dict,
    baselines: dict,
    instances: dict,
    linear: dict,
    columns: list[tuple[str, str]],
) -> str:
    """``table.md`` of the evaluate stage: Table 1 with the baselines, mask AP, the linear protocols."""
    text = [
        f"Split `{split}`: {n_images} images, {n_classes} classes, k = {k} clusters; values in %.\n",
        "## Table 1 (clustering: Hungarian-matched mIoU)\n",
        markdown_table({**rows, **{f"baseline: {n}": r for n, r in baselines.items()}}, columns),
    ]
    if instances:
        text += [
            "\n## Class-agnostic mask AP\n",
            markdown_table(instances, [("AP", "AP"), ("AP50", "AP50")], scale=1.0),
        ]
    if linear:
        text += [
            "\n## Linear evaluation (1x1 conv trained with ground truth on frozen DeepLab features)\n",
            markdown_table(linear, [("miou", "mIoU"), ("pixel_accuracy", "pixel acc.")]),
        ]
    return "\n".join(text)
