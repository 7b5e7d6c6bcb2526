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
Sorting is stable everywhere, so results do not depend on device or batch size (the released code's
order is whatever its top-k routine returns; reference §1.1): in the top-k, equal a_CLS values go to the
lower token index first (common after the mass mask zeroes tokens); in the ascending mass-mask sort,
the lower index among equal values comes first and is therefore the first to be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MiningConfig:
    heads: int | None = None
    cls_mass: float | None = 0.5
    topk_fraction: float = 0.4
    keep_component: bool = True
    proposals: str = "top"  # "top": the paper's rule; "bottom": the rule on -a_CLS (see module docstring)


def cls_affinity(cls_logits: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """(B, N, H) per-head q_CLS·k_j -> (B, N) a_CLS, the mean over the first ``heads`` heads (all if None)."""
    if heads is not None:
        if heads > cls_logits.shape[-1]:
            raise ValueError(f"heads={heads} but the backbone has {cls_logits.shape[-1]} heads")
        cls_logits = cls_logits[..., :heads]
    return cls_logits.float().mean(-1)


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


def topk_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, k) indices of the k largest values, ties broken by the lower index."""
    return torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_count(n_tokens: int, fraction: float) -> int:
    """|P| = int(fraction * N) as the released code computes it, at least 1."""
    return max(1, int(fraction * n_tokens + 1e-9))


def component_of(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool, (B,) flat seed index -> the 4-connected component of ``mask`` holding the seed.

    Breadth-first growth by repeated 4-neighbour dilation restricted to the mask; batched and on
    any device. Equal to ``scipy.ndimage.label`` (default cross structure) picking the seed's label.
    """
    b, h, w = mask.shape
    cur = torch.zeros(b, h * w, dtype=torch.bool, device=mask.device)
    cur[torch.arange(b, device=mask.device), seed] = True
    cur = cur.view(b, 1, h, w) & mask.view(b, 1, h, w)
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32, device=mask.device).view(1, 1, 3, 3)
    m = mask.view(b, 1, h, w)
    while True:
        grown = (F.conv2d(cur.float(), cross, padding=1) > 0) & m
        if torch.equal(grown, cur):
            return cur.view(b, h, w)
        cur = grown


@dataclass
class MinedMasks:
    mask: torch.Tensor  # (B, N) bool token masks
    source: torch.Tensor  # (B,) source token index s


def mine_masks(cls_logits: torch.Tensor, keys: torch.Tensor, grid: tuple[int, int], cfg: MiningConfig) -> MinedMasks:
    """Mine one object mask per image for a batch of images sharing the token ``grid`` (h, w).

    cls_logits: (B, N, H) raw per-head CLS logits; keys: (B, N, D) patch keys concatenated over heads;
    N = h * w. Returns token masks (B, N) and the source tokens (B,).
    """
    b, n, _ = keys.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")
    a = cls_affinity(cls_logits, cfg.heads)
    if cfg.proposals == "bottom":
        a = -a
    elif cfg.proposals != "top":
        raise ValueError(f"proposals must be 'top' or 'bottom', got {cfg.proposals!r}")
    if cfg.cls_mass is not None:
        a = a * attention_mass_mask(a, cfg.cls_mass)
    proposals = topk_indices(a, topk_count(n, cfg.topk_fraction))  # P, (B, k)
    source = proposals[:, 0]
    keys = keys.float()
    k_prop = torch.gather(keys, 1, proposals[..., None].expand(-1, -1, keys.shape[-1]))  # (B, k, D)
    k_src = keys[torch.arange(b, device=keys.device), source]  # (B, D)
    in_p_prime = torch.einsum("bd,bkd->bk", k_src, k_prop) > 0  # A[s, j] > 0 for j in P
    k_sum = torch.einsum("bk,bkd->bd", in_p_prime.float(), k_prop)  # Σ_{j∈P'} k_j
    mask = torch.einsum("bnd,bd->bn", keys, k_sum) > 0  # Σ_{j∈P'} A[j, p] > 0
    if cfg.keep_component:
        mask = component_of(mask.view(b, *grid), source).view(b, n)
    return MinedMasks(mask=mask, source=source)
