"""filter_confident: semantic pseudo-ground-truth from the confident Mask R-CNN predictions (Sec. 3.3).

Reads: params ``filter``; the image index and ``predictions.json``. Writes ``semantic.zarr`` (one uint8
map per image: 0 = background, c = pseudo-label category c) for every image, and a summary json.
Per image: keep predictions with score > tau (``filter.inclusive``: >=); if none passes, keep the most
confident one; where kept masks overlap the more confident wins (``filter.overlap: confidence``, the
paper; ``overwrite``/``released`` reproduce the released code, whose overlap check is broken). With
``filter.overlap_iou`` set, a kept mask whose IoU with a more confident kept one exceeds it is dropped whole.
"""

from __future__ import annotations

import json

import numpy as np

from unseg import store
from unseg.cli import log, parser, run_stage, write_text
from unseg.coco import group_by_image, read_json
from unseg.data.index import DatasetIndex
from unseg.filtering import IGNORE, filter_image
from unseg.progress import progress


def main(args, params) -> None:
    f = params.filter
    index = DatasetIndex.load(args.index)
    preds = group_by_image(read_json(args.predictions))
    labels, kept_counts = [], []
    for e in progress(index.images, desc="filter"):
        zero_based = [{**p, "category_id": int(p["category_id"]) - 1} for p in preds.get(e.id, [])]
        label, kept = filter_image(
            zero_based,
            e.height,
            e.width,
            tau=f.tau,
            inclusive=f.inclusive,
            overlap=f.overlap,
            uncertain_score=f.uncertain_score,
            overlap_iou=f.overlap_iou,
        )
        labels.append(label)
        kept_counts.append(len(kept))
    attrs = {
        "kind": "semantic pseudo-ground-truth",
        "background": 0,
        "tau": f.tau,
        "overlap": f.overlap,
        "overlap_iou": f.overlap_iou,
    }
    store.write_semantic(args.out, np.array([e.id for e in index.images]), labels, attrs)
    summary = {
        "images": len(labels),
        "kept_per_image": float(np.mean(kept_counts)),
        "labelled_pixel_fraction": float(np.mean([np.mean((lab > 0) & (lab != IGNORE)) for lab in labels])),
        "ignored_pixel_fraction": float(np.mean([np.mean(lab == IGNORE) for lab in labels])),
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.summary, json.dumps(summary, indent=2) + "\n")
    log("filter_confident", f"{summary['kept_per_image']:.2f} masks kept per image -> {args.out}")


if __name__ == "__main__":
    run_stage("filter_confident", main, parser(__doc__, "index", "predictions", "out", "summary"))
