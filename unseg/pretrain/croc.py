"""CrOC: cross-view online clustering (Stegmüller et al., CVPR 2023), as the released code does it.

Join / locate / split (reference.md §2.1, official ``main_croc.py: Clustering, CrOCLoss``):

- **Join**: the teacher sees both views; per image b and attention head h the last block's keys of the
  two views' patch tokens form one joint set of 2N unit vectors (B·H independent problems).
- **Locate**: seeds drawn by multinomial over the token marginals, then for k = n_tokens … 2 an entropic
  optimal-transport clustering (Sinkhorn) with a spatial cost, greedily merging the two most similar
  centroids after each level; the number of clusters per (b, h) is the level of lowest transport cost
  among the last ``n_centroids_max − 1`` levels.
- **Split**: the chosen plan is column-normalised per view, hard-masked by argmax and used to pool the
  output tokens of each view into centroids; a cluster empty in either view is dropped.

Loss = DINO CLS loss + alpha_s × centroid loss through ``CrOCHead.forward_c`` (reference.md §2.1 "Loss").
Everything here runs on CPU without a process group; the clustering is vectorised over all B·H
problems (Python loops only over merge levels and Sinkhorn iterations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unseg.errors import UserError
from unseg.models.vit import forward_with_qk
from unseg.train.harness import all_reduce_mean, differentiable_mean_over_processes, min_max_over_processes, unwrap


@dataclass(frozen=True)
class CrOCConfig:
    """Every constant of the CrOC objective; defaults are the released values (reference.md §2.2)."""

    sinkhorn_lambda: float = 20.0  # λ in P = exp(−λ M)
    sinkhorn_iters: int = 5
    pos_alpha: float = 4.0  # weight of the normalised spatial distance in the cost
    marginals_temp_r: float = 2.0  # token marginals softmax(<k_n, k_CLS> / T_r)
    marginals_temp_c: float = 2.0  # seed (centroid) marginals softmax(<k_seed, k_CLS> / T_c)
    uniform_marginals: bool = False
    n_tokens: int = 5  # number of random seeds = first level of the merge schedule
    n_centroids_max: int = 4  # levels k = n_centroids_max … 2 compete by transport cost
    teacher_temp: float = 0.04
    teacher_temp_c: float = 0.04
    student_temp: float = 0.1
    student_temp_c: float = 0.1
    center_momentum: float = 0.9
    center_momentum_c: float = 0.9
    alpha_s: float = 1.0  # weight of the centroid loss

    def __post_init__(self) -> None:
        if self.n_tokens < 2:
            raise UserError(f"croc.n_tokens must be >= 2, got {self.n_tokens}")
        if not 2 <= self.n_centroids_max <= self.n_tokens:
            raise UserError(
                f"croc.n_centroids_max must lie in [2, n_tokens={self.n_tokens}], got {self.n_centroids_max}"
            )
        for name in (
            "marginals_temp_r",
            "marginals_temp_c",
            "teacher_temp",
            "teacher_temp_c",
            "student_temp",
            "student_temp_c",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"croc.{name} must be > 0, got {getattr(self, name)}")
        if self.sinkhorn_iters < 1:
            raise UserError(f"croc.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


# ---------------------------------------------------------------- optimal transport


def sinkhorn(
    cost: torch.Tensor, row_marginals: torch.Tensor, col_marginals: torch.Tensor, lam: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plans for P problems at once (official ``Clustering.sinkhorn``).

    P⁰ = exp(−λ M) / Σ exp(−λ M); then ``iters`` times: scale rows to r, then columns to c.
    NaNs (from a vanishing row/column) become 1e-8 as in the official code.

    cost (P, n, k), row_marginals (P, n), col_marginals (P, k) -> plan (P, n, k), transport cost Σ P·M (P,).
    After the last step the columns match c exactly; the rows approach r as ``iters`` grows.
    """
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    r, c = row_marginals[:, :, None], col_marginals[:, None, :]
    for _ in range(iters):
        plan = plan * (r / plan.sum(dim=2, keepdim=True))
        plan = plan * (c / plan.sum(dim=1, keepdim=True))
    plan = torch.nan_to_num(plan, nan=1e-8)
    return plan, (plan * cost).sum(dim=(1, 2))


# ---------------------------------------------------------------- marginals and seeds


def token_marginals(similarity: torch.Tensor, temp: float, uniform: bool = False) -> torch.Tensor:
    """Row marginals r = softmax(<k_n, k_CLS> / T_r) over the 2N joint tokens, or 1/(2N) when ``uniform``.

    similarity (P, n) -> (P, n), each row summing to 1. Also the seed-sampling distribution.
    """
    if uniform:
        return torch.full_like(similarity, 1.0 / similarity.shape[1])
    return F.softmax(similarity / temp, dim=1)


def seed_marginals(similarity: torch.Tensor, seeds: torch.Tensor, temp: float, uniform: bool = False) -> torch.Tensor:
    """Initial column marginals c = softmax(<k_seed, k_CLS> / T_c) over the k seeds, or 1/k when ``uniform``.

    similarity (P, n), seeds (P, k) long -> (P, k).
    """
    if uniform:
        return torch.full(seeds.shape, 1.0 / seeds.shape[1], dtype=similarity.dtype, device=similarity.device)
    return F.softmax(similarity.gather(1, seeds) / temp, dim=1)


def draw_seeds(marginals: torch.Tensor, n_seeds: int, gen: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """``n_seeds`` distinct token indices per problem, multinomial over ``marginals`` (P, n) -> (P, n_seeds).

    ``gen``: one generator for all problems, or G generators, each drawing for its share of P / G
    consecutive problems (one per image: an image's draws then do not depend on which other images share
    its batch or process, so DDP draws what one process would). The draw happens on the generators'
    device (a CPU generator works for CUDA marginals).
    """
    gens = [gen] if isinstance(gen, torch.Generator) else list(gen)
    if len(marginals) % len(gens):
        raise ValueError(f"{len(marginals)} problems do not split evenly over {len(gens)} generators")
    probs = marginals.detach().to(gens[0].device, torch.float64).unflatten(0, (len(gens), -1))
    draws = [torch.multinomial(p, n_seeds, False, generator=g) for p, g in zip(probs, gens, strict=True)]
    return torch.cat(draws).to(marginals.device)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) -> float32; float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (P, n, d), index (P, k) -> (P, k, d) = x[p, index[p, j]]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


# ---------------------------------------------------------------- cost and merging


def normalised_distances(token_pos: torch.Tensor, centroid_pos: torch.Tensor) -> torch.Tensor:
    """D[p, n, k] = ||pos_n − pos_k|| / max_{n,k} ||pos_n − pos_k|| per problem. (P, n, 2), (P, k, 2) -> (P, n, k)."""
    dist = (token_pos[:, :, None, :] - centroid_pos[:, None, :, :]).pow(2).sum(-1).sqrt()
    return dist / dist.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(dist.dtype).tiny)


def transport_cost_matrix(
    tokens: torch.Tensor, centroids: torch.Tensor, distances: torch.Tensor, pos_alpha: float
) -> torch.Tensor:
    """M = −tokens·normalize(centroids)ᵀ + α D, min–max normalised over the **whole batch** tensor
    (official behaviour, reference.md §2.4 item 4). Under DDP the whole batch is every process's (the
    released code normalises per GPU), so that DDP clusters as one process with the global batch does.
    tokens (P, n, d), centroids (P, k, d) -> (P, n, k)."""
    cost = -torch.einsum("pnd,pkd->pnk", tokens, F.normalize(centroids, dim=-1)) + pos_alpha * distances
    low, high = min_max_over_processes(cost)
    return (cost - low) / (high - low).clamp_min(torch.finfo(cost.dtype).tiny)


def column_weights(plan: torch.Tensor) -> torch.Tensor:
    """Plan columns normalised to sum 1 over the tokens: (P, n, k) -> (P, n, k)."""
    return plan / plan.sum(dim=1, keepdim=True)


def most_similar_pair(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) = argmax_{i≠j} <c_i, c_j> per problem (first in row-major order, so i < j). (P, k, d) -> (P,), (P,)."""
    k = centroids.shape[1]
    sim = torch.einsum("pid,pjd->pij", centroids, centroids)
    sim = sim - 2 * torch.eye(k, dtype=sim.dtype, device=sim.device)
    flat = sim.flatten(1).argmax(dim=1)
    return flat // k, flat % k


def merge_columns(plan: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Sum columns i and j of each plan into one last column; the others keep their order.

    plan (P, n, k), i, j (P,) with i ≠ j -> (P, n, k − 1), as the official merge (kept columns, then i + j).
    """
    k = plan.shape[2]
    cols = torch.arange(k, device=plan.device)[None, :]
    i, j = i[:, None], j[:, None]
    target = cols - (cols > i).long() - (cols > j).long()
    target = torch.where((cols == i) | (cols == j), k - 2, target)
    mapping = F.one_hot(target, k - 1).to(plan.dtype)  # (P, k, k-1)
    return torch.bmm(plan, mapping)


def per_view_column_normalised(plan: torch.Tensor, n_per_view: int) -> torch.Tensor:
    """Split the 2N rows into the two views and normalise each view's columns to sum 1: (P, 2N, k) -> (P, 2N, k)."""
    views = plan.unflatten(1, (2, n_per_view))
    return (views / views.sum(dim=2, keepdim=True)).flatten(1, 2)


# ---------------------------------------------------------------- locate


@dataclass
class Clusters:
    """Result of the joint clustering of P problems.

    plans:    (P, 2N, K) per-view column-normalised plan of the chosen level, zero-padded to
              K = n_centroids_max columns (rows: view-1 tokens then view-2 tokens).
    chosen_k: (P,) long, the number of clusters chosen per problem.
    costs:    (P, n_tokens − 1) transport cost of levels k = n_tokens, …, 2.
    """

    plans: torch.Tensor
    chosen_k: torch.Tensor
    costs: torch.Tensor


def cluster_joint_tokens(
    tokens: torch.Tensor,
    similarity: torch.Tensor,
    positions: torch.Tensor,
    seeds: torch.Tensor,
    cfg: CrOCConfig,
) -> Clusters:
    """Greedy OT clustering with merges from ``seeds.shape[1]`` clusters down to 2 (official
    ``compute_teacher_centroids``, reference.md §2.1 Locate steps 2–5).

    tokens (P, 2N, d) L2-normalised keys; similarity (P, 2N) = <k_n, k_CLS of its view>;
    positions (P, 2N, 2) original-image patch positions; seeds (P, k0) token indices.
    Per level: M = minmax(−tokens·ĉᵀ + α D); (plan, cost) = Sinkhorn(M, r, c); new centroids and
    positions are the plan-column-weighted means; merge the most similar pair; c ∝ rᵀ·(column-normalised plan).
    """
    n_joint = tokens.shape[1]
    if n_joint % 2:
        raise ValueError(f"cluster_joint_tokens: expected 2N joint tokens, got {n_joint}")
    k_max, k = cfg.n_centroids_max, seeds.shape[1]
    if k < k_max:
        raise ValueError(f"cluster_joint_tokens: {k} seeds but n_centroids_max={k_max}")
    row = token_marginals(similarity, cfg.marginals_temp_r, cfg.uniform_marginals)
    col = seed_marginals(similarity, seeds, cfg.marginals_temp_c, cfg.uniform_marginals)
    centroids, centroid_pos = _gather_rows(tokens, seeds), _gather_rows(positions, seeds)
    plans, costs = [], []
    while True:
        distances = normalised_distances(positions, centroid_pos)
        cost = transport_cost_matrix(tokens, centroids, distances, cfg.pos_alpha)
        plan, transport = sinkhorn(cost, row, col, cfg.sinkhorn_lambda, cfg.sinkhorn_iters)
        costs.append(transport)
        if k <= k_max:
            plans.append(F.pad(per_view_column_normalised(plan, n_joint // 2), (0, k_max - k)))
        if k == 2:
            break
        centroids = torch.einsum("pnk,pnd->pkd", column_weights(plan), tokens)
        plan = merge_columns(plan, *most_similar_pair(centroids))
        weights = column_weights(plan)
        centroids = torch.einsum("pnk,pnd->pkd", weights, tokens)
        centroid_pos = torch.einsum("pnk,pnd->pkd", weights, positions)
        col = torch.einsum("pn,pnk->pk", row, weights)
        col = col / col.sum(dim=1, keepdim=True)
        k -= 1
    costs_t = torch.stack(costs, dim=1)
    best = costs_t[:, -(k_max - 1) :].argmin(dim=1)  # index among levels k_max, …, 2
    chosen = torch.stack(plans)[best, torch.arange(best.shape[0], device=best.device)]
    return Clusters(plans=chosen, chosen_k=k_max - best, costs=costs_t)


# ---------------------------------------------------------------- split


def hard_masked(plans: torch.Tensor) -> torch.Tensor:
    """Keep each token's soft weight only in its argmax column: w · [w = max_k w]. (P, n, K) -> (P, n, K)."""
    return plans * (plans == plans.amax(dim=-1, keepdim=True))


def valid_in_both_views(masked: torch.Tensor, n_per_view: int) -> torch.Tensor:
    """(P, 2N, K) masked weights -> (P, K) bool: the cluster has non-zero hard-assigned mass in both views."""
    mass = masked.unflatten(1, (2, n_per_view)).sum(dim=2)  # (P, 2, K)
    return (mass > 0).all(dim=1)


@dataclass
class Assignments:
    """The teacher's split clustering, shared by teacher and student.

    weights:  (B, H, 2, N, K) masked per-view weights (zero outside a token's hard cluster).
    valid:    (B, H, K) bool, clusters present in both views; V = valid.sum() centroid pairs.
    chosen_k: (B, H) long.
    """

    weights: torch.Tensor
    valid: torch.Tensor
    chosen_k: torch.Tensor


def teacher_assignments(
    keys: torch.Tensor,
    patch_pos: torch.Tensor,
    cfg: CrOCConfig,
    gen: torch.Generator | Sequence[torch.Generator],
    num_prefix: int = 1,
) -> Assignments:
    """Locate and split on the teacher's last-block keys (reference.md §2.1 Locate 1–6, Drop 8).

    keys (2B, H, P + N, d): raw keys of view-1 images then view-2 images, CLS at index 0 and
    ``num_prefix`` prefix tokens; patch_pos (B, 2, N, 2) original-image (x, y) of each patch.
    Keys are L2-normalised; each token's similarity is with its own view's CLS key. Runs in float32 or
    float64 with autocast disabled, whatever the caller's precision.
    """
    with torch.autocast(device_type=keys.device.type, enabled=False):
        return _teacher_assignments(keys, patch_pos, cfg, gen, num_prefix)


def _teacher_assignments(
    keys: torch.Tensor,
    patch_pos: torch.Tensor,
    cfg: CrOCConfig,
    gen: torch.Generator | Sequence[torch.Generator],
    num_prefix: int,
) -> Assignments:
    keys = F.normalize(_at_least_float32(keys.detach()), dim=-1)
    two_b, heads, _, _ = keys.shape
    b = two_b // 2
    keys = keys.unflatten(0, (2, b))  # (2, B, H, T, d)
    cls, patch = keys[:, :, :, 0], keys[:, :, :, num_prefix:]
    n = patch.shape[3]
    if patch_pos.shape != (b, 2, n, 2):
        raise ValueError(f"patch positions must be {(b, 2, n, 2)}, got {tuple(patch_pos.shape)}")
    similarity = torch.einsum("mbhnd,mbhd->bhmn", patch, cls).reshape(b * heads, 2 * n)
    tokens = patch.permute(1, 2, 0, 3, 4).reshape(b * heads, 2 * n, -1)
    positions = patch_pos.to(keys.dtype).reshape(b, 1, 2 * n, 2).expand(b, heads, 2 * n, 2).reshape(b * heads, 2 * n, 2)
    seeds = draw_seeds(token_marginals(similarity, cfg.marginals_temp_r, cfg.uniform_marginals), cfg.n_tokens, gen)
    clusters = cluster_joint_tokens(tokens, similarity, positions, seeds, cfg)
    masked = hard_masked(clusters.plans)
    valid = valid_in_both_views(masked, n)
    k = masked.shape[-1]
    return Assignments(
        weights=masked.reshape(b, heads, 2, n, k),
        valid=valid.reshape(b, heads, k),
        chosen_k=clusters.chosen_k.reshape(b, heads),
    )


def pooled_centroids(
    tokens: torch.Tensor, assignments: Assignments, num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids of each view from output tokens and the teacher's assignments (reference.md §2.1 step 7).

    tokens (2B, P + N, D) normalised output tokens (view-1 images then view-2 images, CLS at 0).
    C_v[b, h, k] = Σ_n w_v[b, h, n, k] z_v[b, n]; valid pairs only; then L2-normalised and rescaled to the
    mean CLS-token norm of the 2B images (of every process's images under DDP). Returns (V, D) for view 1
    and view 2 (pair i ↔ pair i).
    """
    cls_norm = differentiable_mean_over_processes(tokens[:, 0].norm(dim=-1).mean())  # of the global batch
    b = tokens.shape[0] // 2
    z = tokens[:, num_prefix:].unflatten(0, (2, b))  # (2, B, N, D)
    weights = assignments.weights.to(z.dtype)
    cents = torch.einsum("bhmnk,mbnd->mbhkd", weights, z)[:, assignments.valid]  # (2, V, D)
    cents = cls_norm * F.normalize(cents, dim=-1)
    return cents[0], cents[1]


# ---------------------------------------------------------------- loss


def _cross_view_ce(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, rows: float | None = None
) -> torch.Tensor:
    """½ [CE(q₁, s₂) + CE(q₂, s₁)], each summed over its M rows and divided by ``rows`` (default M; 0 when
    there are no rows).

    teacher_probs, student_logits (2M, O): view-1 rows then view-2 rows.
    """
    q1, q2 = teacher_probs.chunk(2)
    ls1, ls2 = F.log_softmax(student_logits, dim=-1).chunk(2)
    m = max(q1.shape[0] if rows is None else rows, 1)
    return ((-(q1 * ls2).sum()) + (-(q2 * ls1).sum())) / (2 * m)


def _entropy(probs: torch.Tensor) -> float:
    if probs.shape[0] == 0:
        return float("nan")
    return float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())


class CrOCLoss(nn.Module):
    """DINO CLS loss + centroid loss with separate centres (official ``CrOCLoss``, reference.md §2.1 "Loss").

    Image level: q = softmax((t − center) / τ_t), loss_d = ½ [H(q₁, s₂) + H(q₂, s₁)] with
    s = log_softmax(student / τ_s), batch-averaged. Centroid level: the same with ``center_c``, τ_t^c, τ_s^c,
    averaged over the V centroid pairs. Centres: center ← m·center + (1 − m)·mean(teacher outputs), the mean
    taken over all processes (``all_reduce_mean`` of sum and count), updated after the loss in train mode.
    """

    def __init__(self, out_dim: int, out_dim_c: int, cfg: CrOCConfig = CrOCConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_c", torch.zeros(1, out_dim_c))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_centroid_logits: torch.Tensor,
        teacher_centroid_logits: torch.Tensor,
        teacher_temp: float | None = None,
        teacher_temp_c: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(2B, O), (2B, O), (2V, O_c), (2V, O_c) -> (loss_d, loss_c, metrics). Temps override the config (warm-up)."""
        cfg = self.cfg
        t_temp = cfg.teacher_temp if teacher_temp is None else teacher_temp
        t_temp_c = cfg.teacher_temp_c if teacher_temp_c is None else teacher_temp_c
        teacher_logits = _at_least_float32(teacher_logits.detach())
        teacher_centroid_logits = _at_least_float32(teacher_centroid_logits.detach())
        q = F.softmax((teacher_logits - self.center) / t_temp, dim=-1)
        q_c = F.softmax((teacher_centroid_logits - self.center_c) / t_temp_c, dim=-1)
        loss_d = _cross_view_ce(q, _at_least_float32(student_logits) / cfg.student_temp)
        # centroid pairs differ per image, so under DDP each process divides its sum by the mean pair count
        # of all processes: the averaged gradients are then those of one process averaging over every pair
        pairs = float(all_reduce_mean(torch.tensor(float(q_c.shape[0] // 2), device=q_c.device)))
        loss_c = _cross_view_ce(q_c, _at_least_float32(student_centroid_logits) / cfg.student_temp_c, pairs)
        if self.training:
            self.update_centers(teacher_logits, teacher_centroid_logits)
        metrics = {"teacher_entropy": _entropy(q), "teacher_entropy_c": _entropy(q_c)}
        return loss_d, loss_c, metrics

    @torch.no_grad()
    def update_centers(self, teacher_logits: torch.Tensor, teacher_centroid_logits: torch.Tensor) -> None:
        """EMA of the global mean teacher output; the centroid centre is left alone when no process has centroids."""
        m, m_c = self.cfg.center_momentum, self.cfg.center_momentum_c
        self.center.mul_(m).add_(_global_mean(teacher_logits), alpha=1 - m)
        count = all_reduce_mean(torch.tensor(float(teacher_centroid_logits.shape[0]), device=self.center_c.device))
        if count > 0:
            total = all_reduce_mean(teacher_centroid_logits.sum(dim=0, keepdim=True))
            self.center_c.mul_(m_c).add_(total / count, alpha=1 - m_c)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``x`` (R, O) and over all processes -> (1, O)."""
    count = all_reduce_mean(torch.tensor(float(x.shape[0]), device=x.device))
    return all_reduce_mean(x.sum(dim=0, keepdim=True)) / count


# ---------------------------------------------------------------- teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m θ_t + (1 − m) θ_s for every parameter, in place (parameters matched by name; DDP and
    ``TokenOutput`` wrappers are looked through)."""
    t_params = list(backbone_of(teacher).named_parameters())
    s_params = list(backbone_of(student).named_parameters())
    if [n for n, _ in t_params] != [n for n, _ in s_params]:
        raise ValueError("ema_update: teacher and student parameters differ")
    for (_, t), (_, s) in zip(t_params, s_params, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def teacher_momentum(step: int, total: int, base: float = 0.996) -> float:
    """DINO's cosine schedule from ``base`` at step 0 towards 1: m = 1 − (1 − base)·½(1 + cos(π step/total))."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


# ---------------------------------------------------------------- one step


class TokenOutput(nn.Module):
    """Wraps a timm ViT so that ``forward`` returns all normalised output tokens (B, P + N, D).

    Wrap the student in it before DDP (``wrap_ddp(TokenOutput(vit), ...)``): DDP only synchronises gradients
    of computations that go through its ``forward``, and timm's ``forward`` returns the pooled CLS only.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


def backbone_of(model: nn.Module) -> nn.Module:
    """The bare ViT inside optional DDP and ``TokenOutput`` wrappers."""
    model = unwrap(model)
    return model.vit if isinstance(model, TokenOutput) else model


def _output_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, P + N, D) normalised output tokens of a bare timm ViT or of a (DDP-wrapped) ``TokenOutput``."""
    if isinstance(unwrap(model), TokenOutput):
        return model(images)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("croc_forward_loss: wrap the student ViT in TokenOutput before DistributedDataParallel")
    return model.forward_features(images)


def croc_forward_loss(
    student: nn.Module,
    teacher: nn.Module,
    student_head: nn.Module,
    teacher_head: nn.Module,
    loss_module: CrOCLoss,
    views: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    pos: torch.Tensor,
    cfg: CrOCConfig,
    gen: torch.Generator | Sequence[torch.Generator],
    teacher_temp: float | None = None,
    teacher_temp_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One CrOC forward: loss = loss_d + alpha_s · loss_c, and scalars for logging.

    views (B, 2, 3, S, S) or (view1, view2) each (B, 3, S, S); pos (B, 2, N, 2) patch positions.
    The teacher (no grad) and the student see the same two views (released behaviour); the teacher's
    keys give the clustering, which both networks use to pool their output tokens.
    ``student_head`` / ``teacher_head`` are ``CrOCHead``s (``forward`` and ``forward_c``). Under DDP pass the
    student as ``wrap_ddp(TokenOutput(vit))``; the teacher may be bare or wrapped.
    """
    v1, v2 = (views[:, 0], views[:, 1]) if isinstance(views, torch.Tensor) else views
    images = torch.cat([v1, v2])
    t_head = unwrap(teacher_head)
    with torch.no_grad():
        t_out = forward_with_qk(backbone_of(teacher), images)
        t_logits = t_head(t_out.cls_token)
        assign = teacher_assignments(t_out.k, pos, cfg, gen, t_out.num_prefix)
        t_c1, t_c2 = pooled_centroids(t_out.tokens, assign, t_out.num_prefix)
        t_c_logits = t_head.forward_c(torch.cat([t_c1, t_c2]))
    s_tokens = _output_tokens(student, images)
    s_logits = student_head(s_tokens[:, 0])
    s_c1, s_c2 = pooled_centroids(s_tokens, assign, t_out.num_prefix)
    s_head = unwrap(student_head)
    s_c_logits = s_head.forward_c(torch.cat([s_c1, s_c2]))
    loss_d, loss_c, metrics = loss_module(s_logits, t_logits, s_c_logits, t_c_logits, teacher_temp, teacher_temp_c)
    loss = loss_d + cfg.alpha_s * loss_c
    b = v1.shape[0]
    logs = {
        "loss": float(loss.detach()),
        "loss_d": float(loss_d.detach()),
        "loss_c": float(loss_c.detach()),
        "centroid_pairs_per_image": float(assign.valid.sum()) / b,
        "mean_k": float(assign.chosen_k.float().mean()),
        **metrics,
    }
    return loss, logs
