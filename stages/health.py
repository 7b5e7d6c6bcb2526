"""health: label-free figures of every stage, for a folder with no ground truth (and beside Table 1).

Reads: the mined masks, the pseudo-labels, the Mask R-CNN predictions, the semantic pseudo-ground-truth
and DeepLab's predictions. Writes ``<out>`` (``artifacts/metrics/health.json``): mask area and share
touching the border, cluster sizes, predictions per image and their scores, label shares of the
pseudo-ground-truth and of DeepLab, and a verdict: "failed" with one warning line per failed check
(masks the whole image, all on the border, one dominant cluster, predictions at the cap, DeepLab on one
class), else "ok". No label is read (unseg/evaluation/health.py says what each means and the thresholds).
"""

from __future__ import annotations

import json

from unseg import coco, store
from unseg.cli import log, parser, run_stage, write_text
from unseg.evaluation import health as H


def semantic_maps(path):
    s = store.RaggedStore(path)
    return (store.read_semantic_map(s, r) for r in range(len(s)))


def main(args, params) -> None:
    masks = store.RaggedStore(args.masks)
    grids = masks.read("grid")
    pseudo = coco.read_json(args.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])
    by_image = coco.group_by_image(coco.read_json(args.maskrcnn / "predictions.json"))
    image_ids = [int(i) for i in masks.read("image_id")]
    figures = {
        "mined_masks": H.mask_health(masks.rows("token_mask", i).reshape(grids[i]) for i in range(len(grids))),
        "clusters": H.cluster_sizes([a["category_id"] for a in pseudo["annotations"]], k),
        "maskrcnn": H.prediction_health([[p["score"] for p in by_image.get(i, [])] for i in image_ids]),
        "pseudo_ground_truth": H.label_fractions(semantic_maps(args.semantic), k + 1),
        "deeplab": H.label_fractions(semantic_maps(args.deeplab / "predictions.zarr"), k + 1),
    }
    figures.update(H.verdict(figures, params.distill.detections_per_image))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(figures, indent=2) + "\n")
    m, c = figures["mined_masks"], figures["clusters"]
    log(
        "health",
        f"masks: {100 * m['mask_area_fraction']:.0f} % of the image, {100 * m['touching_border_fraction']:.0f} % touch "
        f"the border; clusters {c['sizes']}; {figures['maskrcnn']['confident_per_image']:.1f} confident "
        f"predictions per image -> {args.out}",
    )
    for line in figures["failed"]:
        log("health", f"warning: {line}")
    log("health", f"verdict: {figures['verdict']}" + (" (this run did not find objects)" if figures["failed"] else ""))


if __name__ == "__main__":
    run_stage("health", main, parser(__doc__, "masks", "pseudo_labels", "maskrcnn", "semantic", "deeplab", "out"))
