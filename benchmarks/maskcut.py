"""MaskCut (CutLER, Wang et al. CVPR 2023), the pseudo-mask peer that ``mining_vs_maskcut`` times against.

Written from the paper's description (Sec. 3.1) to time it on the same features as our mining: per image,
a graph over the patch tokens with W_ij = 1 if cos(k_i, k_j) > tau else eps; the normalised cut's
relaxation, the second smallest generalised eigenvector of (D - W) x = lambda D x (``scipy.linalg.eigh``
on the dense N x N matrices, O(N^3), as the released code does), split at its mean; the side holding the
token of largest |x| is the foreground, flipped when it covers 3 or more image corners; the largest
connected component holding that token is the mask. Each further mask repeats the cut with the tokens
of earlier masks cut off (their edges set to eps). Not used by the pipeline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.linalg import eigh


def _component_with(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    return labels == labels[seed] if labels[seed] else np.zeros_like(mask)


def maskcut_masks(keys: np.ndarray, grid: tuple[int, int], n_masks: int = 3, tau: float = 0.15, eps: float = 1e-5):
    """(N, D) patch keys of one image -> (n_masks, h, w) bool masks, one normalised cut each."""
    f = keys / np.linalg.norm(keys, axis=1, keepdims=True).clip(min=1e-12)
    affinity = np.where(f @ f.T > tau, 1.0, eps)
    taken = np.zeros(len(f), bool)
    masks = []
    for _ in range(n_masks):
        w = affinity.copy()
        w[taken] = eps
        w[:, taken] = eps
        d = w.sum(1)
        _, vec = eigh(np.diag(d) - w, np.diag(d), subset_by_index=[1, 1])
        x = vec[:, 0]
        side = (x > x.mean()).reshape(grid)
        seed = np.unravel_index(int(np.argmax(np.abs(x))), grid)
        if not side[seed]:
            side = ~side
        corners = side[0, 0] + side[0, -1] + side[-1, 0] + side[-1, -1]
        if corners >= 3:
            side = ~side
            seed = np.unravel_index(int(np.argmax(np.where(side.reshape(-1), np.abs(x), -1))), grid)
        mask = _component_with(side & ~taken.reshape(grid), seed)
        masks.append(mask)
        taken |= mask.reshape(-1)
    return np.stack(masks)
