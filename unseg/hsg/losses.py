"""HSG's losses (Ke et al., CVPR 2022, Eq. 1-6; released code: reference.md §3.1).

Total, as the released code weights it: L = lambda_E L_f(G_e) + lambda_F sum_{l>=1} L_f(G_l) + lambda_G L_g,
with L_f the pixel-to-segment contrastive loss of SegSort+ and L_g the goodness of grouping (DMoN modularity
plus its collapse regulariser) and the centroid contrast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsort_loss(
    pixels: torch.Tensor, pixel_segment: torch.Tensor, protos: torch.Tensor, proto_group: torch.Tensor,
    concentration: float = 16.0,
) -> torch.Tensor:  # fmt: skip
    """SegSort+ pixel-to-segment contrastive loss (Hwang et al. 2019; HSG Eq. 2, ``group_mode='segsort+'``).

    pixels (N, D) and protos (S, D) unit rows; pixel_segment (N,) the segment (row of protos) each pixel is in;
    proto_group (S,) a group id per segment (the same region across views for G_e, the same transformer group
    for G_l). With sim(i, j) = exp(kappa e_i . p_j) and s = the pixel's own segment:

        positives P_i = {j != s : group(j) = group(s)}, or {s} when that is empty
        negatives N_i = {j : group(j) != group(s)}
        loss = mean_i -log( sum_{P_i} sim / (sum_{P_i} sim + sum_{N_i} sim) )

    (the own segment is not in the denominator when other positives exist, as released). Returns a scalar.
    """
    logits = concentration * pixels @ protos.T  # (N, S)
    own = F.one_hot(pixel_segment, protos.shape[0]).bool()
    same = proto_group[None, :] == proto_group[pixel_segment][:, None]
    positive = same & ~own
    positive = torch.where(positive.any(1, keepdim=True), positive, own)
    negative = ~same
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1)
    log_all = torch.logsumexp(logits.masked_fill(~(positive | negative), float("-inf")), 1)
    return (log_all - log_pos).mean()


def centroid_contrast(centroids: torch.Tensor, concentration: float = 16.0) -> torch.Tensor:
    """Centroid InfoNCE (HSG's ``centroid_cont``): SegSort on unit centroids (M, D) with each centroid its own
    only positive: mean_i -log( exp(kappa) / sum_j exp(kappa c_i . c_j) )."""
    m = centroids.shape[0]
    ids = torch.arange(m, device=centroids.device)
    return segsort_loss(centroids, ids, centroids, ids, concentration)


def knn_graph(
    protos: torch.Tensor, k: int, groups: torch.Tensor | None = None, symmetric: bool = False
) -> torch.Tensor:
    """(S, D) unit rows -> (S, S) float 0/1 adjacency: row i marks the ``k`` most similar other segments
    (cosine) among those of the same ``groups`` id (the same view, as released); no self-loops. The released
    graph is directed (``symmetric=False``); ``symmetric=True`` takes A or Aᵀ."""
    sim = protos @ protos.T
    allowed = ~torch.eye(len(protos), dtype=torch.bool, device=protos.device)
    if groups is not None:
        allowed &= groups[:, None] == groups[None, :]
    sim = sim.masked_fill(~allowed, float("-inf"))
    k = min(k, len(protos) - 1)
    adj = torch.zeros_like(sim)
    if k > 0:
        adj.scatter_(1, sim.topk(k, dim=1).indices, 1.0)
    adj = adj * allowed  # a group smaller than k + 1 gets fewer edges, never one across groups
    return torch.maximum(adj, adj.T) if symmetric else adj


def modularity(assign: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Soft modularity Q = Tr(Sᵀ A S - Sᵀ d dᵀ S / 2m) / 2m of DMoN (Tsitsulin et al. 2023, Eq. 3).

    assign S (n, k) rows = a node's distribution over k groups; adjacency A (n, n); d = A's row sums
    (out-degrees for the released directed graph), 2m = sum(d). DMoN's spectral loss is -Q; the released
    ``dmon_pool_loss`` reports 1 - Q (a constant apart)."""
    d = adjacency.sum(1)
    two_m = d.sum().clamp(min=1e-12)
    sa_s = assign.T @ adjacency @ assign
    sd = assign.T @ d
    return (torch.trace(sa_s) - (sd @ sd) / two_m) / two_m


def collapse(assign: torch.Tensor, n_nodes: int | None = None, minus_one: bool = True) -> torch.Tensor:
    """DMoN's collapse regulariser sqrt(k)/n ||sum_i S_i||_2 - 1 (Eq. 4): 0 for equal-sized groups,
    sqrt(k) - 1 when every node is in one group. The released code divides by the padded node count
    (``n_nodes`` = 256) and omits the -1 (``minus_one=False``)."""
    n, k = assign.shape
    value = assign.sum(0).norm() * k**0.5 / (n_nodes or n)
    return value - 1 if minus_one else value


def grouping_goodness(assign: torch.Tensor, adjacency: torch.Tensor, n_nodes: int | None = None,
                      minus_one: bool = True, collapse_weight: float = 1.0) -> torch.Tensor:  # fmt: skip
    """L_g of one level: (1 - Q) + collapse, the released ``dmon`` + ``collapse`` sum (lower is better)."""
    return 1 - modularity(assign, adjacency) + collapse_weight * collapse(assign, n_nodes, minus_one)
