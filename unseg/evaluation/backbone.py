"""CrOC's evaluation protocols for a ViT backbone (the released CrOC code has none; built from the paper).

- dense K-means: K-means with as many centroids as classes over the L2-normalised last-layer patch
  tokens of the whole split, upsampled (nearest) to the original resolution, Hungarian-matched mIoU;
- linear probe: a 1x1 conv on the frozen patch tokens, trained with GT labels on the training split,
  mIoU on the validation split;
- video label propagation (DAVIS protocol): J&F of the first frame's objects propagated by
  nearest neighbours in feature space.
Features are the last layer's normalised patch tokens at the same geometry as mask mining.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from unseg.coco import group_by_image
from unseg.data.index import ImageEntry
from unseg.data.transforms import (
    Geometry,
    canvas_to_original,
    geometry,
    original_to_canvas,
    token_map_to_pixels,
    token_mask_to_pixels,
    vit_input,
)
from unseg.evaluation.dense import dense_kmeans_labels
from unseg.evaluation.metrics import ForegroundIoU
from unseg.evaluation.probe import images_within_budget, predict_probe, train_linear_probe
from unseg.evaluation.report import rasterise_annotations, score_label_maps
from unseg.evaluation.video import evaluate_sequence, propagate_labels, read_annotation, read_frame, summarize_davis
from unseg.features import forward_images, geometries
from unseg.mining import MiningConfig
from unseg.params import Params, config_from
from unseg.pipeline import MinedImage, cluster_mined, mine_images


@torch.no_grad()
def dense_features(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    short_side: int,
    fit: str,
    device: torch.device,
    batch_size: int = 32,
) -> tuple[list[np.ndarray], list[Geometry]]:
    """Per image: (h, w, D) float32 last-layer patch tokens (after the final norm), and the geometry."""
    geoms = geometries(entries, short_side, int(model.patch_embed.patch_size[0]), fit)
    out: list[np.ndarray | None] = [None] * len(entries)
    for batch in forward_images(model, entries, geoms, batch_size, device):
        tokens = batch.out.patch_tokens.float().cpu().numpy()
        for row, i in enumerate(batch.indices):
            out[i] = tokens[row].reshape(*geoms[i].grid, -1)
    return out, geoms  # type: ignore[return-value]


def dense_kmeans_miou(
    feats: list[np.ndarray], geoms: list[Geometry], gts: list[np.ndarray], n_classes: int, ignore_index: int, seed: int
) -> dict:
    """K-means (k = number of classes) over all tokens of the split, Hungarian mIoU at full resolution."""
    labels = dense_kmeans_labels(feats, n_classes, seed)
    preds = (token_map_to_pixels(lab.astype(np.int64), g) for lab, g in zip(labels, geoms, strict=True))
    return score_label_maps(zip(preds, gts, strict=True), n_classes, n_classes, ignore_index)


def linear_probe_miou(
    train_feats: list[np.ndarray],
    train_geoms: list[Geometry],
    train_gts: list[np.ndarray],
    val_feats: list[np.ndarray],
    val_geoms: list[Geometry],
    val_gts: list[np.ndarray],
    n_classes: int,
    ignore_index: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> dict:
    """1x1 conv on frozen tokens (trained on the train split's GT), mIoU on the validation split.

    Labels are brought onto each image's canvas (the padded/cropped ViT input; padding ignored), where the
    token grid's upsampled logits live; predictions go back to the original resolution the same way the
    mined masks do. The probe predicts classes, so Hungarian matching finds the identity unless it is poor.
    """
    to_chw = [torch.from_numpy(f).permute(2, 0, 1).contiguous() for f in train_feats]
    labels = [
        original_to_canvas(g.astype(np.int64), geom, ignore_index)
        for g, geom in zip(train_gts, train_geoms, strict=True)
    ]
    conv = train_linear_probe(
        to_chw, labels, n_classes, epochs=epochs, lr=lr, ignore_index=ignore_index, seed=seed, device=str(device)
    )
    preds = [
        canvas_to_original(predict_probe(conv, torch.from_numpy(f).permute(2, 0, 1), geom.canvas), geom)
        for f, geom in zip(val_feats, val_geoms, strict=True)
    ]
    return score_label_maps(zip(preds, val_gts, strict=True), n_classes, n_classes, ignore_index)


@torch.no_grad()
def video_jf(
    model: torch.nn.Module,
    sequences,
    short_side: int,
    device: torch.device,
    topk: int = 5,
    n_last_frames: int = 7,
    neighborhood: int = 12,
    temperature: float = 0.1,
) -> dict:
    """DAVIS semi-supervised J&F by label propagation with the backbone's patch tokens."""
    patch = int(model.patch_embed.patch_size[0])
    prefix = int(model.num_prefix_tokens)
    results = []
    for seq in sequences:
        frames = [read_frame(p) for p in seq.frames]
        gts = [read_annotation(p) for p in seq.annotations]
        h, w = frames[0].shape[:2]
        g = geometry(h, w, short_side, patch, "crop")
        feats = []
        for fr in frames:
            x = vit_input(fr, g)[None].to(device)
            tok = model.forward_features(x)[0, prefix:].float().cpu()
            feats.append(tok.reshape(*g.grid, -1))
        pred = propagate_labels(feats, gts[0], n_last_frames, topk, temperature, neighborhood, out_size=(h, w))
        results.append(evaluate_sequence(pred, gts))
    summary = summarize_davis(results)
    return {"J": summary["J"], "F": summary["F"], "JF": summary["JF"], "sequences": len(results)}


def _fg_ious(mined: Sequence[MinedImage], gts: Sequence[np.ndarray], upsample: str) -> tuple[float | None, np.ndarray]:
    """Dataset-level foreground IoU of the mined masks, and each image's own IoU (0 when undefined)."""
    total, per_image = ForegroundIoU(), []
    for m, gt in zip(mined, gts, strict=True):
        pixels = token_mask_to_pixels(m.token_mask, m.geom, upsample)
        total.update(pixels, gt)
        one = ForegroundIoU()
        one.update(pixels, gt)
        per_image.append(one.result()["iou"] or 0.0)
    return total.result()["iou"], np.array(per_image)


def mask_polarity(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    gts: Sequence[np.ndarray],
    short_side: int,
    fit: str,
    cfg: MiningConfig,
    device: torch.device,
    batch_size: int = 32,
    upsample: str = "nearest",
) -> tuple[dict, list[MinedImage]]:
    """Foreground IoU of the masks mined by ``cfg`` and by each fixed side of a_CLS (``top``: the paper's rule,
    ``bottom``), and ``polarity_accuracy``: the fraction of images on which the side ``cfg`` used gives a
    mask whose foreground IoU is at least the other side's (ground truth decides which side holds the
    objects). Returns the scores and the masks mined by ``cfg``."""
    mined = {
        side: mine_images(model, entries, short_side, fit, replace(cfg, proposals=side), device, batch_size)
        for side in ("top", "bottom")
    }
    chosen = mined[cfg.proposals] if cfg.proposals in mined else None
    if chosen is None:
        chosen = mine_images(model, entries, short_side, fit, cfg, device, batch_size)
    out, per_image = {}, {}
    for side, masks in mined.items():
        out[f"mask_fg_iou_{side}"], per_image[side] = _fg_ious(masks, gts, upsample)
    out["mask_fg_iou"], _ = _fg_ious(chosen, gts, upsample)
    bottom = np.array([m.bottom for m in chosen])
    own = np.where(bottom, per_image["bottom"], per_image["top"])
    other = np.where(bottom, per_image["top"], per_image["bottom"])
    out["polarity_accuracy"] = float(np.mean(own >= other)) if len(own) else None
    return out, chosen


# ---------------------------------------------------------------- the evaluate_backbone stage's suite


def backbone_suite(
    model, params: Params, index, splits, videos, device, log: Callable[[str], None]
) -> tuple[dict, list]:
    """Dense K-means, linear probe, DAVIS J&F and mined-mask polarity of ``model``; and its mined val masks.

    ``splits`` = (train, train_gts, val, val_gts)."""
    train, train_gts, val, val_gts = splits
    ev, f, m = params.evaluate, params.features, params.mining
    n, ignore = len(index.classes), index.ignore_index
    val_feats, val_geoms = dense_features(model, val, f.short_side, f.fit, device, f.batch_size)
    out = {"dense_kmeans_miou": dense_kmeans_miou(val_feats, val_geoms, val_gts, n, ignore, ev.seed)["miou"]}
    tokens = [g.grid[0] * g.grid[1] for g in geometries(train, f.short_side, params.backbone.patch_size, f.fit)]
    keep = images_within_budget(tokens, 4 * model.embed_dim, ev.probe_memory_mb * 2**20, ev.seed)
    if len(keep) < len(train):
        log(f"linear probe: tokens of {len(keep)} of {len(train)} training images fit")
    train, train_gts = [train[i] for i in keep], [train_gts[i] for i in keep]
    train_feats, train_geoms = dense_features(model, train, f.short_side, f.fit, device, f.batch_size)
    probe = linear_probe_miou(
        train_feats, train_geoms, train_gts, val_feats, val_geoms, val_gts, n, ignore,
        ev.probe_epochs, ev.probe_lr, ev.seed, device,
    )  # fmt: skip
    out["linear_probe_miou"] = probe["miou"]
    if videos:
        out["davis_jf"] = video_jf(
            model, videos, f.short_side, device,
            ev.video_topk, ev.video_last_frames, ev.video_neighborhood, ev.video_temperature,
        )["JF"]  # fmt: skip
    cfg = config_from(MiningConfig, m)
    if index.classes[0].lower() == "background":
        polarity, mined = mask_polarity(model, val, val_gts, f.short_side, f.fit, cfg, device, f.batch_size, m.upsample)
        out.update(polarity)
    else:
        mined = mine_images(model, val, f.short_side, f.fit, cfg, device, f.batch_size)
    return out, mined


def front_half_row(model, mined: list, params: Params, index, val, val_gts, device) -> dict:
    """Table 1's first row for ``model``'s mined masks (K-means on its CLS features), scored on val (k capped
    at the number of masks)."""
    c, m, f = params.cluster, params.mining, params.features
    masks = sum(int(mask.any()) for image in mined for mask in image.masks())
    # the validation split alone may hold fewer masks than the pipeline's k (COCO-MINI: 79 masks, k = 80)
    k = min(c.classes * c.overcluster, masks - c.background_clusters)
    if k <= 0:
        return {"note": "the random-init ViT mined too few masks on the validation split"}
    anns = cluster_mined(
        model, mined, c.input, k, c.seed, device, c.whiten, c.algorithm, m.upsample, f.batch_size,
        c.kmeans_batch_size, c.background_clusters,
    )  # fmt: skip
    by_image = group_by_image(anns)
    preds = (rasterise_annotations(by_image.get(e.id, []), e.height, e.width) for e in val)
    row = score_label_maps(zip(preds, val_gts, strict=True), k + 1, len(index.classes), index.ignore_index)
    row.pop("per_class_iou")
    return row
