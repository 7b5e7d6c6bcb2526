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

from collections.abc import Sequence

import numpy as np
import torch

from unseg.data.index import ImageEntry
from unseg.data.transforms import Geometry, geometry, token_map_to_pixels, vit_input
from unseg.evaluation.dense import dense_kmeans_labels
from unseg.evaluation.probe import predict_probe, train_linear_probe
from unseg.evaluation.report import score_label_maps
from unseg.evaluation.video import evaluate_sequence, propagate_labels, read_annotation, read_frame, summarize_davis
from unseg.features import geometries, iterate_batches, plan_batches, plan_order


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
    patch = int(model.patch_embed.patch_size[0])
    geoms = geometries(entries, short_side, patch, fit)
    order = plan_order(geoms)
    batches = plan_batches(geoms, order, batch_size)
    out: list[np.ndarray | None] = [None] * len(entries)
    prefix = int(model.num_prefix_tokens)
    for k, images in iterate_batches(entries, geoms, order, batches):
        tokens = model.forward_features(images.to(device))[:, prefix:].float().cpu().numpy()
        for row, pos in enumerate(batches[k]):
            i = int(order[pos])
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
    train_gts: list[np.ndarray],
    val_feats: list[np.ndarray],
    val_gts: list[np.ndarray],
    n_classes: int,
    ignore_index: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> dict:
    """1x1 conv on frozen tokens (trained on the train split's GT), mIoU on the validation split.

    Logits on the token grid are upsampled bilinearly to the label size, in training and prediction.
    The probe predicts classes, so Hungarian matching finds the identity unless the probe is poor.
    """
    to_chw = [torch.from_numpy(f).permute(2, 0, 1).contiguous() for f in train_feats]
    milestones = (max(1, int(epochs * 25 / 45)),)
    conv = train_linear_probe(
        to_chw,
        list(train_gts),
        n_classes,
        epochs=epochs,
        lr=lr,
        milestones=milestones,
        ignore_index=ignore_index,
        seed=seed,
        device=str(device),
        label_size=None,
    )
    preds = [
        predict_probe(conv, torch.from_numpy(f).permute(2, 0, 1), tuple(gt.shape))
        for f, gt in zip(val_feats, val_gts, strict=True)
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
