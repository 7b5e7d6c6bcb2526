"""evaluate_backbone: CrOC's protocols and the front half of MaskDistill, against a random-init ViT.

Reads: params ``evaluate`` (and ``features``/``mining``/``cluster`` for the random-ViT chain); the index,
the backbone checkpoint, ``masks.zarr`` and ``features.zarr`` (geometry). Writes ``<out>`` (json):
for the pretrained ViT and for a randomly initialised ViT of the same shape, on the validation split:
dense K-means mIoU (k = classes, Hungarian), linear-probe mIoU (1x1 conv trained on the training
split's ground truth), DAVIS J&F by label propagation (generated videos or ``evaluate.video_root``),
and the foreground IoU of the mined masks; plus the whole front half (mine -> K-means) with the
random ViT as the baseline row of Table 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.data.transforms import token_mask_to_pixels
from unseg.errors import UserError
from unseg.evaluation import backbone as B
from unseg.evaluation.metrics import ForegroundIoU
from unseg.evaluation.report import score_label_maps
from unseg.evaluation.video import read_davis_sequences
from unseg.mining import MiningConfig
from unseg.models.vit import create_vit, load_vit_weights
from unseg.pipeline import cluster_mined, mine_images
from unseg.train.harness import resolve_device


def labelled(index: DatasetIndex, split: str | None) -> tuple[list, list]:
    entries = [e for e in index.split(split)] if split and index.has_ground_truth else []
    gts = [index.read_semantic(e) for e in entries]
    keep = [i for i, g in enumerate(gts) if g is not None]
    return [entries[i] for i in keep], [gts[i] for i in keep]


def mask_fg_iou(mined, gts) -> float | None:
    fg = ForegroundIoU()
    for m, gt in zip(mined, gts, strict=True):
        fg.update(token_mask_to_pixels(m.token_mask, m.geom), gt)
    return fg.result()["iou"]


def protocols(model, params, index, train, train_gts, val, val_gts, videos, device) -> dict:
    ev, f, m = params.evaluate, params.features, params.mining
    n, ignore = len(index.classes), index.ignore_index
    val_feats, val_geoms = B.dense_features(model, val, f.short_side, f.fit, device, f.batch_size)
    out = {"dense_kmeans_miou": B.dense_kmeans_miou(val_feats, val_geoms, val_gts, n, ignore, ev.seed)["miou"]}
    train_feats, _ = B.dense_features(model, train, f.short_side, f.fit, device, f.batch_size)
    out["linear_probe_miou"] = B.linear_probe_miou(
        train_feats, train_gts, val_feats, val_gts, n, ignore, ev.probe_epochs, ev.probe_lr, ev.seed, device
    )["miou"]
    if videos:
        out["davis_jf"] = B.video_jf(
            model,
            videos,
            f.short_side,
            device,
            ev.video_topk,
            ev.video_last_frames,
            ev.video_neighborhood,
            ev.video_temperature,
        )["JF"]
    if index.classes[0].lower() == "background":
        mined = mine_images(
            model,
            val,
            f.short_side,
            f.fit,
            MiningConfig(m.heads, m.cls_mass, m.topk_fraction, m.keep_component),
            device,
            f.batch_size,
        )
        out["mask_fg_iou"] = mask_fg_iou(mined, val_gts)
    return out


def main(args, params) -> None:
    ev, b, f, m, c = params.evaluate, params.backbone, params.features, params.mining, params.cluster
    index = DatasetIndex.load(args.index)
    val, val_gts = labelled(index, params.data.val_split)
    train, train_gts = labelled(index, params.data.train_split)
    if not val or not train:
        note = "no ground truth on the training and validation splits: nothing to score"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"note": note}) + "\n")
        log("evaluate_backbone", note)
        return
    device = resolve_device(ev.device)
    root = Path(ev.video_root) if ev.video_root else args.index.parent / "video"
    videos = read_davis_sequences(root) if root.is_dir() else []
    if ev.video_root and not videos:
        raise UserError(f"evaluate.video_root: no DAVIS sequences under {root}")
    pretrained = create_vit(b.arch, b.patch_size, b.depth)
    load_vit_weights(pretrained, args.backbone)
    torch.manual_seed(ev.seed)
    random_vit = create_vit(b.arch, b.patch_size, b.depth)
    result = {}
    for name, model in (("pretrained", pretrained), ("random_init", random_vit)):
        model.eval().to(device)
        result[name] = protocols(model, params, index, train, train_gts, val, val_gts, videos, device)
        log("evaluate_backbone", f"{name}: {json.dumps(result[name])}")
    # the Table-1 baseline: the whole front half with the random ViT
    k = c.classes * c.overcluster
    mined = mine_images(
        random_vit,
        val,
        f.short_side,
        f.fit,
        MiningConfig(m.heads, m.cls_mass, m.topk_fraction, m.keep_component),
        device,
        f.batch_size,
    )
    by_image = {
        lm.image_id: lm
        for lm in cluster_mined(random_vit, mined, c.input, k, c.seed, device, c.whiten, c.algorithm, m.upsample)
    }

    def pred(e):
        lab = np.zeros((e.height, e.width), np.int64)
        if e.id in by_image:
            lab[by_image[e.id].pixel_mask] = by_image[e.id].cluster + 1
        return lab

    chain = score_label_maps(
        ((pred(e), g) for e, g in zip(val, val_gts, strict=True)), k + 1, len(index.classes), index.ignore_index
    )
    chain.pop("per_class_iou")
    result["random_init_front_half"] = chain
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_stage("evaluate_backbone", main, parser(__doc__, "index", "backbone", "out"))
