"""HSG's evaluations of a trained FCN (HSG Sec. 4; reference.md §3.4), on a split with ground truth.

At each level of the hierarchy (pixels, level-0 segments, fine groups, coarse groups):
- K-means + Hungarian: the level's units (pixels, or a segment / group as the mean embedding of its pixels)
  clustered into as many clusters as classes over the whole split, each pixel scored with its unit's
  cluster (dataset-level mIoU and pixel accuracy; not in the released code, which has no label-free metric);
- NFCovering: per image, the mean over ground-truth foreground regions of the best IoU with any unit,
  averaged over images (the seed's formula; not in the released code either).
And the released protocol, a *semi-supervised probe* since it uses training labels: every level-0 segment
of the training split gets the majority ground-truth label of its pixels; a val segment takes the majority
label of its ``topk`` nearest training segments (cosine), and the maps are scored by mIoU (no matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unseg.clustering import kmeans
from unseg.data.index import ImageEntry, read_image
from unseg.evaluation.report import score_label_maps
from unseg.hsg import grouping as G
from unseg.hsg.metrics import nf_covering
from unseg.hsg.model import ClusteringTransformer, EmbeddingFCN
from unseg.hsg.objective import HSGConfig, level0_segments
from unseg.matching import ConfusionAccumulator

LEVELS = ("pixels", "segments", "fine", "coarse")


@dataclass
class ImageLevels:
    """One image: (h, w) unit ids of each level on the embedding grid, the embeddings (h*w, d), its size."""

    units: dict[str, np.ndarray]
    embeddings: torch.Tensor
    size: tuple[int, int]


@torch.no_grad()
def image_levels(net: EmbeddingFCN, fine: ClusteringTransformer, coarse: ClusteringTransformer, entry: ImageEntry,
                 input_size: int, cfg: HSGConfig, superpixel_scale: float, sigma: float,
                 min_size: int) -> ImageLevels:  # fmt: skip
    """Embeddings of one image resized to ``input_size`` squared, and its units at every level."""
    array = read_image(entry)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    emb, pos = net(x)
    _, d, h, w = emb.shape
    sp = torch.from_numpy(G.superpixels(array, superpixel_scale, sigma, min_size))[None, None].float()
    regions = F.interpolate(sp, size=(h, w), mode="nearest")[0].long()
    seg = level0_segments(emb, regions, cfg)[0]  # (h*w,)
    pixels = emb[0].permute(1, 2, 0).reshape(-1, d)
    protos = G.prototypes(pixels, seg)
    seg_pos = G.segment_means(pos.permute(1, 2, 0).reshape(-1, d), seg)  # as in training
    f = fine(protos, seg_pos)
    onehot = F.one_hot(G.hard_groups(f.assign), f.assign.shape[0]).T.float()
    c = coarse(f.centroids, (onehot @ seg_pos) / onehot.sum(1, keepdim=True).clamp(min=1))
    p_fine, p_coarse = G.coarser_levels(f.assign, [c.assign])
    units = {
        "pixels": np.arange(h * w).reshape(h, w),
        "segments": seg.reshape(h, w).numpy(),
        "fine": G.hard_groups(p_fine)[seg].reshape(h, w).numpy(),
        "coarse": G.hard_groups(p_coarse)[seg].reshape(h, w).numpy(),
    }
    return ImageLevels(units, pixels, (entry.height, entry.width))


def upsample(units: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) ids -> (H, W) by nearest neighbour."""
    t = torch.from_numpy(units.astype(np.int64))[None, None].float()
    return F.interpolate(t, size=size, mode="nearest")[0, 0].long().numpy()


def unit_embeddings(levels: ImageLevels, level: str) -> tuple[np.ndarray, np.ndarray]:
    """(U, d) normalised mean embedding of each unit of ``level``, and the (h, w) map of unit indices 0..U-1."""
    ids = torch.from_numpy(levels.units[level].reshape(-1))
    ids = G.relabel(ids)
    return G.prototypes(levels.embeddings, ids).numpy(), ids.reshape(levels.units[level].shape).numpy()


def level_scores(images: Sequence[ImageLevels], gts: Sequence[np.ndarray], n_classes: int, ignore: int,
                 seed: int) -> dict[str, dict]:  # fmt: skip
    """Per level: K-means (k = classes) + Hungarian mIoU and pixel accuracy, and NFCovering (mean over images)."""
    out = {}
    for level in LEVELS:
        feats, maps = zip(*(unit_embeddings(im, level) for im in images), strict=True)
        counts = [len(f) for f in feats]
        k = min(n_classes, sum(counts))  # a coarse level of a few images may have fewer units than classes
        labels = kmeans(np.concatenate(feats), k, seed, "faiss", n_init=1).labels
        starts = np.cumsum([0, *counts])
        preds = [
            upsample(labels[starts[i] : starts[i + 1]][m], im.size)
            for i, (m, im) in enumerate(zip(maps, images, strict=True))
        ]
        row = score_label_maps(zip(preds, gts, strict=True), k, n_classes, ignore)
        covering = [nf_covering(gt, upsample(m, im.size), ignore) for m, im, gt in zip(maps, images, gts, strict=True)]
        covering = [c for c in covering if c is not None]
        out[level] = {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"],
                      "nf_covering": float(np.mean(covering)) if covering else None}  # fmt: skip
    return out


def majority_labels(segments: np.ndarray, gt: np.ndarray, n_classes: int, ignore: int) -> np.ndarray:
    """The majority ground-truth class of each segment id 0..S-1 (-1 where all its pixels are ignored)."""
    s, g = segments.reshape(-1), gt.reshape(-1)
    keep = g != ignore
    table = np.zeros((int(segments.max()) + 1, n_classes), np.int64)
    np.add.at(table, (s[keep], g[keep].astype(np.int64)), 1)
    return np.where(table.sum(1) > 0, table.argmax(1), -1)


def knn_retrieval_miou(train: Sequence[ImageLevels], train_gts, val: Sequence[ImageLevels], val_gts,
                       n_classes: int, ignore: int, topk: int = 20) -> float:  # fmt: skip
    """The released kNN segment-retrieval protocol (uses training labels: a semi-supervised probe)."""
    bank, bank_labels = [], []
    for im, gt in zip(train, train_gts, strict=True):
        feats, ids = unit_embeddings(im, "segments")
        lab = majority_labels(upsample(ids, im.size), gt, n_classes, ignore)
        bank.append(feats[lab >= 0])
        bank_labels.append(lab[lab >= 0])
    memory, memory_labels = torch.from_numpy(np.concatenate(bank)), torch.from_numpy(np.concatenate(bank_labels))
    k = min(topk, len(memory))
    acc = ConfusionAccumulator(n_classes, n_classes, ignore)
    for im, gt in zip(val, val_gts, strict=True):
        feats, ids = unit_embeddings(im, "segments")
        nearest = (torch.from_numpy(feats) @ memory.T).topk(k, dim=1).indices
        votes = F.one_hot(memory_labels[nearest], n_classes).sum(1).argmax(1).numpy()
        acc.update(upsample(votes[ids], im.size), gt)
    return _direct_miou(acc.matrix)


def _direct_miou(matrix: np.ndarray) -> float:
    """mIoU of labels that already are classes (no matching): mean over all classes of tp / (tp + fp + fn),
    a class absent from both counting 0 (as the released ``benchmark_by_mIoU.py``)."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(np.mean(np.where(union > 0, tp / np.maximum(union, 1), 0.0)))
