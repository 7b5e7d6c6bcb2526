"""evaluate_ceiling: the supervised ceiling's scores on the validation split (``ceiling/dvc.yaml``).

Reads: params ``evaluate.maskrcnn_score``, ``data.val_split``; the index, the Mask R-CNN and DeepLab
trained on ground truth (their ``predictions.json`` / ``predictions.zarr``). Writes ``<out>`` (json):
``deeplab_miou`` and ``deeplab_pixel_accuracy`` (Hungarian, as every Table-1 row), ``maskrcnn_miou``
(predictions with score >= ``evaluate.maskrcnn_score`` painted by confidence) and the class-agnostic mask
``maskrcnn_ap50`` / ``maskrcnn_ap`` (all detections), each the same measure as its Table-1 counterpart.
"""

from __future__ import annotations

import json

from unseg import coco
from unseg.cli import log, parser, run_stage, write_text
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.evaluation.table1 import (
    annotation_label_maps,
    ground_truth_subset,
    mask_ap_rows,
    score_split,
    stored_label_maps,
)


def main(args, params) -> None:
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    if not val:
        raise UserError(f"no ground truth in split {params.data.val_split!r}: the ceiling cannot be scored")
    gts = {e.id: g for e, g in zip(val, val_gts, strict=True)}
    n, ignore = len(index.classes), index.ignore_index
    deeplab = score_split(stored_label_maps(args.deeplab / "predictions.zarr", gts), val, gts, n, n, ignore)
    out = {"deeplab_miou": deeplab["miou"], "deeplab_pixel_accuracy": deeplab["pixel_accuracy"], "images": len(val)}
    preds_file = args.maskrcnn / "predictions.json"
    if index.instances and preds_file.exists():
        preds = coco.read_json(preds_file)
        confident = [p for p in preds if p["score"] >= params.evaluate.maskrcnn_score]
        out["maskrcnn_miou"] = score_split(annotation_label_maps(confident, val), val, gts, n, n, ignore)["miou"]
        ap = mask_ap_rows(ground_truth_subset(index, gts), {"maskrcnn": preds})["maskrcnn_multi"]
        out["maskrcnn_ap50"], out["maskrcnn_ap"] = ap["AP50"], ap["AP"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(out, indent=2) + "\n")
    log("evaluate_ceiling", json.dumps(out))


if __name__ == "__main__":
    run_stage("evaluate_ceiling", main, parser(__doc__, "index", "maskrcnn", "deeplab", "out"))
