"""MaskDistill affinity-mask mining (Van Gansbeke et al., arXiv 2206.06363, Sec. 3.2), vectorised.

For one image with N patch tokens, H heads and last-block raw queries/keys (no scale, no softmax):

1. a_CLS(j) = mean over heads h in the chosen subset of q_CLS(h) · k_j(h)           (Eq. 1)
   (the paper averages all heads; the released code the first ``heads`` = 5 of 6);
2. optionally a_CLS <- a_CLS * m, with m the DINO attention-mass mask at ``cls_mass`` (released code);
3. P = the top ``int(topk_fraction * N)`` tokens by a_CLS; the source s = the best of them;
4. A = K Kᵀ with K the patch keys concatenated over heads (the sum over heads of k(h) k(h)ᵀ, which has
   the sign of the paper's mean over heads, Eq. 2); P' = {j ∈ P : A[s, j] > 0};
5. mask(p) = 1 iff Σ_{j∈P'} A[j, p] > 0;
6. optionally keep only the 4-connected component of the mask holding s (released code).

Σ_{j∈P'} A[j, p] = (Σ_{j∈P'} k_j) · k_p, so the N×N Gram matrix is never formed: O(N·D) per image.

``proposals="bottom"`` (not in the paper) applies the same rule to -a_CLS: P and s come from the
*least* attended tokens. A CLS token that attends the background (an inverse object map, which the
tiny CrOC ViTs of this project learn; measured in the README) then still yields object masks.
``proposals="auto"`` (not in the paper) mines both sides and keeps, per image, the mask that covers
the smaller fraction of the border tokens of the grid: the background prior that TokenCut and
MaskCut (CutLER) use to pick the foreground side of a bipartition. Ties keep the paper's side.
Sorting is stable everywhere, so results do not depend on device or batch size (the released code's
order is whatever its top-k routine returns; reference §1.1): in the top-k, equal a_CLS values go to the
lower token index first (common after the mass mask zeroes tokens); in the ascending mass-mask sort,
the lower index among equal values comes first and is therefore the first to be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass(frozen=True)
class MiningConfig:
    heads: int | None = None
    cls_mass: float | None = 0.5
    topk_fraction: float = 0.4
    keep_component: bool = True
    proposals: str = "top"  # "top": the paper's rule; "bottom": the rule on -a_CLS; "auto": per image, by the border
    masks_per_image: int = 1  # the paper's one mask; more: the rule again on the tokens left (extension)


def cls_affinity(cls_logits: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """(B, N, H) per-head q_CLS·k_j -> (B, N) a_CLS, the mean over the first ``heads`` heads (all if None)."""
    if heads is not None:
        if heads > cls_logits.shape[-1]:
            raise ValueError(f"heads={heads} but the backbone has {cls_logits.shape[-1]} heads")
        cls_logits = cls_logits[..., :heads]
    # contiguous first: a mean over a strided inner dim of 5 takes ~50x longer on CPU (same values)
    return cls_logits.float().contiguous().mean(-1)


def attention_mass_mask(a: torch.Tensor, mass: float) -> torch.Tensor:
    """(B, N) -> (B, N) bool: DINO's ``threshold_attention`` on a_CLS.

    Sort ascending, divide by the row sum, cumulative sum, keep tokens whose cumulative value is
    above 1 - mass, i.e. the largest values holding ``mass`` of the total. Runs on raw logits as the
    released code does (a negative row sum makes this rule erratic; that is the released behaviour).
    """
    val, idx = torch.sort(a, dim=-1, stable=True)
    val = val / val.sum(-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1 - mass)
    return torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)


def topk_members(a: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, N) bool: the k largest values of each row, ties at the k-th value going to the lower
    indices (the set a stable descending sort's first k holds, at a quarter of a sort's cost on CPU)."""
    kth = torch.topk(a, k, dim=-1, sorted=False).values.min(-1, keepdim=True).values
    above, tied = a > kth, a == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied values still fit, lowest index first
    return above | (tied & (tied.cumsum(-1) <= room))


def topk_count(n_tokens: int, fraction: float) -> int:
    """|P| = int(fraction * N) as the released code computes it, at least 1."""
    return max(1, int(fraction * n_tokens + 1e-9))


def component_of(mask: torch.Tensor, seed: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """(B, h, w) bool, (B,) flat seed index -> the 4-connected component of ``mask`` holding the seed
    (empty where the seed is outside the mask): ``scipy.ndimage.label`` (default cross structure) picking
    the seed's label. ``method``: ``label`` runs scipy once on the whole batch (a 3-D structure with no
    links between images), ``dilate`` grows the seed by repeated 4-neighbour dilation restricted to the
    mask (shifted ORs, on any device); ``auto``: ``label`` on CPU, ``dilate`` elsewhere."""
    if method == "auto":
        method = "label" if mask.device.type == "cpu" else "dilate"
    if method == "label":
        return _component_by_label(mask, seed)
    b, h, w = mask.shape
    cur = torch.zeros(b, h * w, dtype=torch.bool, device=mask.device)
    cur[torch.arange(b, device=mask.device), seed] = True
    cur = cur.view(b, h, w) & mask
    while True:
        grown = cur.clone()
        grown[:, 1:] |= cur[:, :-1]
        grown[:, :-1] |= cur[:, 1:]
        grown[:, :, 1:] |= cur[:, :, :-1]
        grown[:, :, :-1] |= cur[:, :, 1:]
        grown &= mask
        if torch.equal(grown, cur):
            return cur
        cur = grown


_CROSS_WITHIN_IMAGES = np.zeros((3, 3, 3), dtype=bool)
_CROSS_WITHIN_IMAGES[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def _component_by_label(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    labels, _ = ndimage.label(mask.numpy(), structure=_CROSS_WITHIN_IMAGES)
    flat = torch.from_numpy(labels).view(len(labels), -1)
    seed_label = flat.gather(1, seed.view(-1, 1))
    return ((flat == seed_label) & (seed_label > 0)).view(mask.shape)


def border_fraction(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) bool token masks on an (h, w) grid -> (B,) fraction of the grid's border tokens inside the mask."""
    h, w = grid
    border = torch.ones(h, w, dtype=torch.bool, device=mask.device)
    if h > 2 and w > 2:
        border[1:-1, 1:-1] = False
    border = border.view(-1)
    return mask[:, border].float().mean(-1)


@dataclass
class MinedMasks:
    mask: torch.Tensor  # (B, N) bool: the union of an image's masks (its one mask in the paper's setting)
    source: torch.Tensor  # (B,) source token s of the first mask
    bottom: torch.Tensor  # (B,) bool: the masks were mined from -a_CLS (the least attended side)
    label: torch.Tensor  # (B, N) uint8: 0 outside every mask, m inside the m-th mask (m = 1..masks_per_image)


PROPOSALS = ("top", "bottom", "auto")
KEY_BYTES_PER_PASS = 12 << 20  # float32 keys of the images mined in one pass: a share of a CPU's L3 cache


def mine_masks(cls_logits: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int], cfg: MiningConfig) -> MinedMasks:
    """Mine the object mask(s) of a batch of images sharing the token ``grid`` (h, w).

    cls_logits: (B, N, H) raw per-head CLS logits; keys: (B, N, D) patch keys concatenated over heads;
    N = h * w. With ``proposals="auto"`` both sides are mined and each image keeps the side whose first
    mask has the lower :func:`border_fraction` (the top side on ties). With ``masks_per_image`` = M > 1
    (an extension for scene-centric images, not in the paper) the rule runs M times per image, each time on
    the tokens no earlier mask took: P and s come from those tokens only and the new mask stays inside them.
    An image stops early when a round finds nothing; its later masks are empty.
    """
    b, n, _ = keys.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    if cfg.proposals not in PROPOSALS:
        raise ValueError(f"proposals must be one of {PROPOSALS}, got {cfg.proposals!r}")
    a = cls_affinity(cls_logits, cfg.heads)
    if cfg.proposals == "auto":
        top, _ = _mine_side(a, keys, grid, cfg)
        bottom, _ = _mine_side(-a, keys, grid, cfg)
        side = border_fraction(bottom, grid) < border_fraction(top, grid)
    else:
        side = torch.full((b,), cfg.proposals == "bottom", dtype=torch.bool, device=keys.device)
    if cfg.proposals != "top":
        a = torch.where(side[:, None], -a, a)
    label = torch.zeros(b, n, dtype=torch.uint8, device=keys.device)
    first_source = None
    for m in range(1, cfg.masks_per_image + 1):
        mask, source = _mine_side(a, keys, grid, cfg, available=None if m == 1 else label == 0)
        label[mask] = m
        first_source = source if first_source is None else first_source
    return MinedMasks(mask=label > 0, source=first_source, bottom=side, label=label)


def _mine_side(
    a: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int], cfg: MiningConfig, available: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-6 of the module docstring on the affinity ``a`` (B, N): (masks (B, N) bool, sources (B,)).

    ``available`` (B, N) bool restricts the proposals, the source and the mask to those tokens (masks of
    images with no available token are empty)."""
    b, n, _ = keys.shape
    if available is not None:
        a = a.masked_fill(~available, 0.0)  # no mass in the attention-mass mask
    if cfg.cls_mass is not None:
        a = a * attention_mass_mask(a, cfg.cls_mass)
    if available is not None:
        a = a.masked_fill(~available, float("-inf"))
    in_p = topk_members(a, topk_count(n, cfg.topk_fraction))  # P as a (B, N) bool, k per row
    source = a.argmax(-1)  # the best of P, the lower index on ties (as the stable top-k order's first)
    proposals = in_p.nonzero()[:, 1].view(b, -1)  # (B, k) token indices of P, ascending
    # a few images at a time, so that the three passes over their keys hit the CPU cache, not memory
    step = max(1, KEY_BYTES_PER_PASS // (n * keys.shape[-1] * 4))
    mask = torch.cat([
        _affinity_mask(keys[i : i + step], proposals[i : i + step], source[i : i + step],
                       None if available is None else available[i : i + step])
        for i in range(0, b, step)
    ])  # fmt: skip
    if available is not None:
        mask &= available
    if cfg.keep_component:
        mask = component_of(mask.view(b, *grid), source).view(b, n)
    return mask, source


def _affinity_mask(
    keys: torch.Tensor, proposals: torch.Tensor, source: torch.Tensor, available: torch.Tensor | None
) -> torch.Tensor:
    """Steps 4-5: (B, N, D) keys, (B, k) proposal indices P, (B,) sources -> (B, N) bool mask."""
    b, n, d = keys.shape
    keys = keys.float()
    rows = torch.arange(b, device=keys.device)[:, None]
    # (B, k, D) rows of P: index_select on the flattened keys (no (B, k, D) index tensor as gather needs;
    # half the time of keys[rows, proposals] on CPU)
    k_prop = keys.reshape(b * n, d).index_select(0, (proposals + rows * n).reshape(-1)).view(b, -1, d)
    k_src = keys[rows[:, 0], source]  # (B, D)
    in_p_prime = torch.einsum("bd,bkd->bk", k_src, k_prop) > 0  # A[s, j] > 0 for j in P
    if available is not None:
        in_p_prime &= torch.gather(available, 1, proposals)
    k_sum = torch.einsum("bk,bkd->bd", in_p_prime.float(), k_prop)  # Σ_{j∈P'} k_j
    # Σ_{j∈P'} A[j, p] > 0, as the row vector k_sumᵀ times Kᵀ: on CPU torch runs this product 3-5x faster
    # than K · k_sum (a batched matrix-vector product)
    return torch.bmm(k_sum[:, None, :], keys.transpose(1, 2))[:, 0] > 0
