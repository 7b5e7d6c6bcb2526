"""The released MaskDistill mining rule as a user of the official code runs it: one image at a time,
NumPy, the N x N Gram matrix and ``scipy.ndimage.label`` (reference.md §1.1, ``gen_masks.py``
``mask_generator``). Kept here as the reference that ``unseg.mining.mine_masks`` is timed and checked
against; not used by the pipeline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def threshold_attention(a: np.ndarray, mass: float) -> np.ndarray:
    """DINO's attention-mass mask: sort ascending, normalise by the sum, cumulative sum > 1 - mass."""
    idx = np.argsort(a, kind="stable")
    val = a[idx] / a.sum()
    keep = np.zeros(a.shape, bool)
    keep[idx] = np.cumsum(val) > (1 - mass)
    return keep


def released_mask(cls_logits: np.ndarray, keys: np.ndarray, grid: tuple[int, int], heads: int, mass: float,
                  topk_fraction: float) -> np.ndarray:  # fmt: skip
    """(N, H) raw per-head CLS logits, (N, D) keys concatenated over heads -> (N,) bool mask of one image."""
    a = cls_logits[:, :heads].mean(-1)
    a = a * threshold_attention(a, mass)
    gram = keys @ keys.T  # A, N x N
    k = max(1, int(topk_fraction * a.size + 1e-9))
    proposals = np.argsort(-a, kind="stable")[:k]
    source = proposals[0]
    p_prime = proposals[gram[source, proposals] > 0]
    mask = (gram[p_prime].sum(0) > 0).reshape(grid)
    if not mask.flat[source]:
        return np.zeros(grid, bool)
    labels, _ = ndimage.label(mask)  # 4-connected (the default cross structure)
    return labels == labels.flat[source]
