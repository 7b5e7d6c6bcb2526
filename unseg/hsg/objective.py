"""One HSG objective evaluation on a batch of two-view images (HSG Sec. 3; reference.md §3.1).

Views 2i and 2i+1 are two augmentations of image i; ``regions`` carries, per view and embedding pixel, the id
of the low-level region (superpixel) the pixel came from, the same id in both views of an image, which is what
makes the cosegmentation multiview. Per view: level-0 segments = spherical K-means of the embeddings with
location features (no gradient through the assignment), intersected with the regions. Then

    L = w_E L_f(G_e) + w_F (L_f(G_fine) + L_f(G_coarse)) + w_G (L_g(P_fine) + L_g(P_coarse)) + w_C L_c

with L_f the SegSort+ loss whose positives are the segments of the same region of the same image in either
view (G_e) or of the same transformer group (G_l), L_g DMoN's 1 - modularity + collapse on a kNN graph of the
segments of each view, L_c the centroid contrast. ``hierarchy=False`` is the released first stage (SegSort
only, G_e).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.hsg import grouping as G
from unseg.hsg import losses as L
from unseg.hsg.model import ClusteringTransformer


@dataclass(frozen=True)
class HSGConfig:
    concentration: float = 16.0  # kappa of SegSort+ and the centroid contrast
    kmeans_grid: tuple[int, int] = (4, 4)  # level-0 spherical K-means grid initialisation (stage 1: 1x1)
    kmeans_iters: int = 15  # stage 1: 1
    knn: int = 2  # neighbours in the DMoN graph
    weight_region: float = 1.0  # w_E
    weight_levels: float = 0.1  # w_F, for each level
    weight_grouping: float = 1.0  # w_G
    weight_centroid: float = 1.0  # w_C
    collapse_nodes: int | None = None  # collapse divides by n (paper) or the padded count (released: 256)
    collapse_minus_one: bool = True  # DMoN's -1 (released: omitted)
    hierarchy: bool = True  # the transformer levels (stage 2); False: SegSort only (stage 1)


@torch.no_grad()
def level0_segments(emb: torch.Tensor, regions: torch.Tensor, cfg: HSGConfig) -> torch.Tensor:
    """(V, d, h, w) unit embeddings, (V, h, w) region ids -> (V, h*w) segment ids, consecutive per view."""
    out = []
    for e, r in zip(emb, regions, strict=True):
        h, w = r.shape
        init = G.grid_labels(h, w, *cfg.kmeans_grid, device=e.device)
        km = G.spherical_kmeans(G.with_location(e.permute(1, 2, 0)), init, cfg.kmeans_iters)
        out.append(G.intersect(km, r.reshape(-1)))
    return torch.stack(out)


def hsg_losses(
    emb: torch.Tensor, pos: torch.Tensor, regions: torch.Tensor, cfg: HSGConfig,
    fine: ClusteringTransformer | None = None, coarse: ClusteringTransformer | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{"loss", "region", "levels", "grouping", "centroid"}`` of a batch: emb (2B, d, h, w) unit embeddings,
    pos (d, h, w) positional embedding, regions (2B, h, w) region ids (shared by the two views of an image)."""
    views, d, h, w = emb.shape
    seg = level0_segments(emb, regions, cfg)  # (V, hw)
    counts = seg.max(1).values + 1
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    pixel_segment = (seg + offsets[:-1, None]).reshape(-1)
    pixels = emb.permute(0, 2, 3, 1).reshape(-1, d)
    protos = G.prototypes(pixels, pixel_segment)  # (S, d)
    n_seg = protos.shape[0]
    dev = emb.device
    image_of_segment = torch.repeat_interleave(torch.arange(views, device=dev) // 2, counts)
    view_of_segment = torch.repeat_interleave(torch.arange(views, device=dev), counts)
    region_of_segment = pixel_segment.new_zeros(n_seg).scatter_(0, pixel_segment, regions.reshape(-1))
    n_regions = int(regions.max()) + 1
    region_group = image_of_segment * n_regions + region_of_segment
    out = {"region": L.segsort_loss(pixels, pixel_segment, protos, region_group, cfg.concentration)}
    zero = emb.sum() * 0 + pos.sum() * 0  # every output in the graph, so DDP sees the position tables used
    out.update(levels=zero, grouping=zero, centroid=zero)
    if cfg.hierarchy and fine is not None and coarse is not None:
        pos_pixels = pos.permute(1, 2, 0).reshape(1, h * w, d).expand(views, -1, -1).reshape(-1, d)
        seg_pos = G.segment_means(pos_pixels, pixel_segment, n_seg)
        fine_group = pixel_segment.new_empty(n_seg)
        coarse_group = pixel_segment.new_empty(n_seg)
        grouping, fine_centroids, coarse_centroids = zero, [], []
        for i in range(views // 2):
            idx = torch.nonzero(image_of_segment == i).squeeze(1)
            f = fine(protos[idx], seg_pos[idx])
            hard = G.hard_groups(f.assign)
            k_f = f.assign.shape[0]
            onehot = F.one_hot(hard, k_f).T.float()  # (C_fine, n)
            group_pos = (onehot @ seg_pos[idx]) / onehot.sum(1, keepdim=True).clamp(min=1)  # mean per fine group
            c = coarse(f.centroids, group_pos)
            p_fine, p_coarse = G.coarser_levels(f.assign, [c.assign])
            fine_group[idx] = hard + i * k_f
            coarse_group[idx] = G.hard_groups(p_coarse) + i * p_coarse.shape[0]
            adjacency = L.knn_graph(protos[idx].detach(), cfg.knn, view_of_segment[idx])
            for p in (p_fine, p_coarse):
                grouping = grouping + L.grouping_goodness(p.T, adjacency, cfg.collapse_nodes, cfg.collapse_minus_one)
            fine_centroids.append(f.centroids)
            coarse_centroids.append(c.centroids)
        out["levels"] = L.segsort_loss(pixels, pixel_segment, protos, fine_group, cfg.concentration) + L.segsort_loss(
            pixels, pixel_segment, protos, coarse_group, cfg.concentration
        )
        out["grouping"] = grouping / (views // 2)
        out["centroid"] = L.centroid_contrast(F.normalize(torch.cat(fine_centroids), dim=1), cfg.concentration) + (
            L.centroid_contrast(F.normalize(torch.cat(coarse_centroids), dim=1), cfg.concentration)
        )
    out["loss"] = (
        cfg.weight_region * out["region"]
        + cfg.weight_levels * out["levels"]
        + cfg.weight_grouping * out["grouping"]
        + cfg.weight_centroid * out["centroid"]
    )
    return out
