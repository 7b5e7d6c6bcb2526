"""Segments and their hierarchy (HSG Sec. 3; reference.md §3.1).

Level 0: pixel embeddings (L2-normalised, with (y, x) in [-0.5, 0.5] appended and re-normalised) grouped by
spherical K-means from a grid initialisation, then intersected with low-level regions (the released code
uses OWT-UCM; here superpixels), so a segment never crosses a region border. A segment's prototype is the
normalised mean of its pixels' embeddings (without the location).

Levels l >= 1: soft assignments P_l (C_l, n) of the n level-0 segments to C_l groups, each column a
distribution (column-stochastic). The clustering transformer gives the fine level P_1 and transition
matrices C_l (C_{l+1}, C_l), also column-stochastic, and the coarser levels follow by construction:
P_{l+1} = C_l P_l (the released code's "Bayesian" product, P_coarse = C @ P_fine), so a coarse group is a
union of fine groups' mass and the levels cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def grid_labels(height: int, width: int, grid_y: int, grid_x: int, device=None) -> torch.Tensor:
    """(H*W,) the cell of a ``grid_y`` x ``grid_x`` grid that each pixel falls in (row-major ids)."""
    ys = torch.arange(height, device=device) * grid_y // height
    xs = torch.arange(width, device=device) * grid_x // width
    return (ys[:, None] * grid_x + xs[None, :]).reshape(-1)


def with_location(embeddings: torch.Tensor) -> torch.Tensor:
    """(H, W, D) -> (H*W, D+2): L2-normalised embeddings, (y, x) in [-0.5, 0.5] appended, re-normalised."""
    h, w, _ = embeddings.shape
    e = F.normalize(embeddings.reshape(h * w, -1), dim=1)
    ys = (torch.arange(h, dtype=e.dtype, device=e.device) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=e.dtype, device=e.device) + 0.5) / w - 0.5
    loc = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(h * w, 2)
    return F.normalize(torch.cat([e, loc], 1), dim=1)


def relabel(labels: torch.Tensor) -> torch.Tensor:
    """Ids made consecutive 0..S-1 in order of first value (sorted unique)."""
    return torch.unique(labels, return_inverse=True)[1]


def spherical_kmeans(features: torch.Tensor, init: torch.Tensor, iterations: int) -> torch.Tensor:
    """(N, F) unit rows, (N,) initial labels -> (N,) labels after ``iterations`` rounds of: centroids = the
    normalised mean of their members, each row to the centroid of highest cosine. Empty clusters vanish."""
    labels = relabel(init)
    for _ in range(iterations):
        k = int(labels.max()) + 1
        sums = features.new_zeros(k, features.shape[1]).index_add_(0, labels, features)
        labels = relabel((features @ F.normalize(sums, dim=1).T).argmax(1))
    return labels


def intersect(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two labelings of the same pixels -> the labeling of their intersections (consecutive ids)."""
    return relabel(relabel(a) * (int(b.max()) + 1) + b)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, D) pixel embeddings, (N,) segment ids 0..S-1 -> (S, D) normalised mean embedding per segment."""
    s = int(labels.max()) + 1
    return F.normalize(embeddings.new_zeros(s, embeddings.shape[1]).index_add_(0, labels, embeddings), dim=1)


def segment_means(values: torch.Tensor, labels: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(N, D) values, (N,) ids 0..S-1 -> (S, D) plain means per id (a segment's mean positional embedding)."""
    n = int(labels.max()) + 1 if n is None else n
    sums = values.new_zeros(n, values.shape[1]).index_add_(0, labels, values)
    return sums / torch.bincount(labels, minlength=n)[:, None].clamp(min=1).to(values.dtype)


def coarser_levels(fine: torch.Tensor, transitions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """P_1 (C_1, n) and C_1 (C_2, C_1), C_2 (C_3, C_2), ... -> [P_1, P_2, ...] with P_{l+1} = C_l P_l."""
    levels = [fine]
    for c in transitions:
        if c.shape[-1] != levels[-1].shape[-2]:
            raise ValueError(f"transition {tuple(c.shape)} does not map {levels[-1].shape[-2]} groups")
        levels.append(c @ levels[-1])
    return levels


def hard_groups(level: torch.Tensor) -> torch.Tensor:
    """(C, n) soft assignment -> (n,) the most likely group of each segment."""
    return level.argmax(-2)


def superpixels(image: np.ndarray, scale: float = 100.0, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """(H, W) int region ids of Felzenszwalb-Huttenlocher superpixels (scikit-image), the low-level regions
    that stand in for the released code's OWT-UCM contours (made with MATLAB tools we cannot run)."""
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size).astype(np.int64)
