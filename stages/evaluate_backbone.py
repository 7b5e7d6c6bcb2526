"""evaluate_backbone: CrOC's protocols and the front half of MaskDistill, against a random-init ViT.

Reads: params ``evaluate`` (probe, video, seed, device), ``features``, ``mining`` and ``cluster`` (to run
the front half in memory); the image index and the backbone checkpoint. Writes ``<out>`` (json): for
the pretrained ViT and for a randomly initialised ViT of the same shape, on the validation split,
dense K-means mIoU (k = number of classes, Hungarian), linear-probe mIoU (1x1 conv trained on the
training split's ground truth), DAVIS J&F by label propagation (the generated videos or
``evaluate.video_root``) and the foreground IoU of the mined masks; plus the whole front half
(mine -> K-means) with the random ViT, the baseline row of Table 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unseg.cli import log, parser, run_stage, write_text
from unseg.coco import group_by_image
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.evaluation import backbone as B
from unseg.evaluation.probe import images_within_budget
from unseg.evaluation.report import rasterise_annotations, score_label_maps
from unseg.evaluation.video import read_davis_sequences
from unseg.features import geometries
from unseg.mining import MiningConfig
from unseg.models.vit import create_vit, load_vit_weights
from unseg.params import config_from
from unseg.pipeline import cluster_mined, mine_images
from unseg.train.harness import resolve_device


def protocols(model, params, index, train, train_gts, val, val_gts, videos, device) -> tuple[dict, list]:
    """The four backbone scores, and the mined masks of the validation images."""
    ev, f, m = params.evaluate, params.features, params.mining
    n, ignore = len(index.classes), index.ignore_index
    val_feats, val_geoms = B.dense_features(model, val, f.short_side, f.fit, device, f.batch_size)
    out = {"dense_kmeans_miou": B.dense_kmeans_miou(val_feats, val_geoms, val_gts, n, ignore, ev.seed)["miou"]}
    tokens = [g.grid[0] * g.grid[1] for g in geometries(train, f.short_side, params.backbone.patch_size, f.fit)]
    keep = images_within_budget(tokens, 4 * model.embed_dim, ev.probe_memory_mb * 2**20, ev.seed)
    if len(keep) < len(train):
        log("evaluate_backbone", f"linear probe: tokens of {len(keep)} of {len(train)} training images fit")
    train, train_gts = [train[i] for i in keep], [train_gts[i] for i in keep]
    train_feats, train_geoms = B.dense_features(model, train, f.short_side, f.fit, device, f.batch_size)
    out["linear_probe_miou"] = B.linear_probe_miou(
        train_feats,
        train_geoms,
        train_gts,
        val_feats,
        val_geoms,
        val_gts,
        n,
        ignore,
        ev.probe_epochs,
        ev.probe_lr,
        ev.seed,
        device,
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
    cfg = config_from(MiningConfig, m)
    if index.classes[0].lower() == "background":
        polarity, mined = B.mask_polarity(
            model, val, val_gts, f.short_side, f.fit, cfg, device, f.batch_size, m.upsample
        )
        out.update(polarity)
    else:
        mined = mine_images(model, val, f.short_side, f.fit, cfg, device, f.batch_size)
    return out, mined


def main(args, params) -> None:
    ev, b, f, m, c = params.evaluate, params.backbone, params.features, params.mining, params.cluster
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    train, train_gts = index.labelled(params.data.train_split)
    if not val or not train:
        note = "no ground truth on the training and validation splits: nothing to score"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps({"note": note}) + "\n")
        log("evaluate_backbone", note)
        return
    device = resolve_device(ev.device)
    root = Path(ev.video_root) if ev.video_root else args.index.parent / "video"
    videos = read_davis_sequences(root) if root.is_dir() else []
    if ev.video_root and not videos:
        raise UserError(f"evaluate.video_root: no DAVIS sequences under {root}")
    pretrained = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    load_vit_weights(pretrained, args.backbone)
    torch.manual_seed(ev.seed)
    random_vit = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    result, mined = {}, {}
    for name, model in (("pretrained", pretrained), ("random_init", random_vit)):
        model.eval().to(device)
        result[name], mined[name] = protocols(model, params, index, train, train_gts, val, val_gts, videos, device)
        log("evaluate_backbone", f"{name}: {json.dumps(result[name])}")
    # the Table-1 baseline: the whole front half (mine -> K-means) with the random ViT
    anns = cluster_mined(
        random_vit,
        mined["random_init"],
        c.input,
        c.classes * c.overcluster,
        c.seed,
        device,
        c.whiten,
        c.algorithm,
        m.upsample,
        f.batch_size,
        c.kmeans_batch_size,
    )
    by_image = group_by_image(anns)
    preds = (rasterise_annotations(by_image.get(e.id, []), e.height, e.width) for e in val)
    chain = score_label_maps(
        zip(preds, val_gts, strict=True), c.classes * c.overcluster + 1, len(index.classes), index.ignore_index
    )
    chain.pop("per_class_iou")
    result["random_init_front_half"] = chain
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_stage("evaluate_backbone", main, parser(__doc__, "index", "backbone", "out"))
