"""evaluate_hsg: the HSG FCN at every level of its hierarchy, against a random-init FCN of the same shape.

Reads: params ``hsg``, ``evaluate.seed``, the splits; the index and ``artifacts/hsg/resnet.pth``. Writes
``<out>`` (json): per network (``hsg``, ``random_init``) and level (pixels, segments, fine, coarse) the
K-means + Hungarian mIoU and pixel accuracy and NFCovering on the validation split, and the released kNN
segment-retrieval mIoU (``semi_supervised_knn_miou``: it uses training labels); ``<picture>``: the
hierarchy of four validation images (a DVC image plot).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from unseg import figures
from unseg.cli import log, parser, run_stage, write_text
from unseg.data.index import DatasetIndex, read_image
from unseg.hsg import evaluation as E
from unseg.hsg.objective import HSGConfig
from unseg.hsg.trainer import HSGTraining, build_models, load_exported
from unseg.models.resnet import read_trained_hsg
from unseg.params import config_from


def main(args, params) -> None:
    h = params.hsg
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    train, train_gts = index.labelled(params.data.train_split)
    if not val:
        write_text(args.out, json.dumps({"note": "no ground truth in the validation split"}) + "\n")
        return
    training = config_from(HSGTraining, h, lr_milestones=tuple(h.lr_milestones))
    cfg = config_from(HSGConfig, h, kmeans_grid=tuple(h.kmeans_grid), hierarchy=True)
    n, ignore, seed = len(index.classes), index.ignore_index, params.evaluate.seed
    torch.manual_seed(seed)
    state = read_trained_hsg(args.hsg, "hsg.train: auto and no backbone_weights is hsg:", "set hsg.train: always")
    test_stride = h.test_output_stride  # the same weights at a finer grid (released: trained at 16, tested at 8)
    nets = {"hsg": load_exported(build_models(training, test_stride), state),
            "random_init": build_models(training, test_stride)}  # fmt: skip
    result, shown = {}, {}
    for name, m in nets.items():
        for part in (m.net, m.fine, m.coarse):
            part.eval()

        def levels(entries, m=m):
            return [E.image_levels(m.net, m.fine, m.coarse, e, h.crop_size, cfg, h.superpixel_scale,
                                   h.superpixel_sigma, h.superpixel_min_size) for e in entries]  # fmt: skip

        val_levels = levels(val)
        result[name] = E.level_scores(val_levels, val_gts, n, ignore, seed)
        if train:
            result[name]["semi_supervised_knn_miou"] = E.knn_retrieval_miou(levels(train), train_gts, val_levels,
                                                                             val_gts, n, ignore)  # fmt: skip
        shown[name] = val_levels[:4]
        log("evaluate_hsg", f"{name}: {json.dumps(result[name])}")
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    panels = []
    for e, im, gt in zip(val[:4], shown["hsg"], val_gts[:4], strict=False):
        image = read_image(e)
        panels.append(figures.panel(image, f"image {e.id}"))
        for level in ("segments", "fine", "coarse"):
            units = E.upsample(im.units[level], im.size) + 1
            panels.append(figures.panel(figures.colour(units), f"HSG {level} ({len(np.unique(units))})"))
        panels.append(figures.panel(figures.blend(image, np.where(gt == ignore, 255, gt)), "ground truth"))
    args.picture.parent.mkdir(parents=True, exist_ok=True)
    figures.contact_sheet(panels, 5).save(args.picture)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage("evaluate_hsg", main, parser(__doc__, "index", "hsg", "out", "picture"))
