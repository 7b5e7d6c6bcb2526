"""The supervised ceiling: ground truth in the form the back half of the chain trains on.

MaskDistill's Mask R-CNN trains on COCO instances with cluster categories 1..k, and DeepLab on semantic
maps with 0 = background and c = category c. The same networks trained with the same budget on the
training split's *ground truth* in that form bound what the unsupervised chain can reach at this
budget; it uses labels, so it is a reference, never part of the label-free pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from unseg import coco
from unseg.data.index import DatasetIndex, ImageEntry


def components_as_instances(label: np.ndarray, image_id: int, min_area: int = 16) -> list[dict]:
    """COCO annotations (ids from 1) of the 4-connected components of every class c >= 1 of a label map
    (ignore 255 excluded), at least ``min_area`` pixels each: instances for a semantic-only dataset."""
    anns = []
    for c in np.unique(label):
        if c == 0 or c == 255:
            continue
        parts, n = ndimage.label(label == c)
        for j in range(1, n + 1):
            mask = parts == j
            if mask.sum() >= min_area:
                anns.append(coco.annotation(len(anns) + 1, image_id, int(c), mask))
    return anns


def ground_truth_instances(index: DatasetIndex, entries: Iterable[ImageEntry]) -> dict:
    """COCO instances of ``entries`` with the ground-truth classes 1..C-1 as categories.

    Crowd regions are left out (nothing to learn an instance from). A dataset without instance ground
    truth (CamVid, VOC semantic) gets the connected components of its label maps
    (:func:`components_as_instances`).
    """
    entries = list(entries)
    if index.instances:
        objects = [a for e in entries for a in index.gt_instances.get(e.id, []) if not a.get("iscrowd", 0)]
    else:
        objects = [a for e in entries for a in components_as_instances(index.read_semantic(e), e.id)]
    anns = [{**a, "id": n + 1} for n, a in enumerate(objects)]
    return {
        "images": [{"id": e.id, "file_name": e.file, "height": e.height, "width": e.width} for e in entries],
        "annotations": anns,
        "categories": [{"id": c, "name": name} for c, name in enumerate(index.classes or [], start=0) if c > 0],
    }


def ground_truth_semantic(index: DatasetIndex, entries: Iterable[ImageEntry]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image ids, label maps) of the entries that have semantic ground truth: 0..C-1, ignore kept as is.

    Label 0 plays the part of the pseudo-labels' background (it *is* background for the generated data,
    COCO and VOC; for CamVid it is the first class, sky).
    """
    pairs = [(e.id, index.read_semantic(e)) for e in entries]
    pairs = [(i, g) for i, g in pairs if g is not None]
    return np.array([i for i, _ in pairs], np.int64), [g for _, g in pairs]
