"""Tests for unseg/pretrain/croc.py and unseg/models/heads.py (the CrOC objective)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unseg.errors import UserError
from unseg.models.heads import CrOCHead, DINOHead, cancel_last_layer_grads
from unseg.models.vit import create_vit
from unseg.pretrain.croc import (
    Assignments,
    CrOCConfig,
    CrOCLoss,
    TokenOutput,
    cluster_joint_tokens,
    croc_forward_loss,
    draw_seeds,
    ema_update,
    hard_masked,
    merge_columns,
    pooled_centroids,
    sinkhorn,
    teacher_assignments,
    teacher_momentum,
    token_marginals,
    valid_in_both_views,
)

# ---------------------------------------------------------------- independent references (loops, NumPy)


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sinkhorn_np(cost: np.ndarray, r: np.ndarray, c: np.ndarray, lam: float, iters: int) -> np.ndarray:
    plan = np.exp(-lam * cost)
    plan /= plan.sum()
    n, k = cost.shape
    for _ in range(iters):
        for i in range(n):
            plan[i] *= r[i] / plan[i].sum()
        for j in range(k):
            plan[:, j] *= c[j] / plan[:, j].sum()
    return plan


def reference_clustering(tokens, sim, pos, seeds, cfg: CrOCConfig):
    """The released algorithm written problem by problem with loops (float64), levels in lockstep
    because the cost's min-max normalisation is global over the batch."""
    n_prob, n, _ = tokens.shape
    half = n // 2
    k, k_max = seeds.shape[1], cfg.n_centroids_max
    rows = [softmax_np(sim[p] / cfg.marginals_temp_r) for p in range(n_prob)]
    cols = [softmax_np(sim[p, seeds[p]] / cfg.marginals_temp_c) for p in range(n_prob)]
    cents = [tokens[p, seeds[p]].copy() for p in range(n_prob)]
    cpos = [pos[p, seeds[p]].copy() for p in range(n_prob)]
    costs = [[] for _ in range(n_prob)]
    plans = [[] for _ in range(n_prob)]
    while True:
        raw = []
        for p in range(n_prob):
            unit = cents[p] / np.linalg.norm(cents[p], axis=1, keepdims=True)
            dist = np.array([[np.linalg.norm(pos[p, i] - cpos[p][j]) for j in range(k)] for i in range(n)])
            raw.append(-tokens[p] @ unit.T + cfg.pos_alpha * dist / dist.max())
        low, high = min(m.min() for m in raw), max(m.max() for m in raw)
        for p in range(n_prob):
            cost = (raw[p] - low) / (high - low)
            plan = sinkhorn_np(cost, rows[p], cols[p], cfg.sinkhorn_lambda, cfg.sinkhorn_iters)
            costs[p].append((plan * cost).sum())
            if k <= k_max:
                split = np.concatenate([plan[:half] / plan[:half].sum(0), plan[half:] / plan[half:].sum(0)])
                plans[p].append(np.pad(split, ((0, 0), (0, k_max - k))))
            if k == 2:
                continue
            cent = (plan / plan.sum(0)).T @ tokens[p]
            best, pair = -np.inf, None
            for i in range(k):
                for j in range(k):
                    if i != j and cent[i] @ cent[j] > best:
                        best, pair = cent[i] @ cent[j], (i, j)
            i, j = pair
            kept = [plan[:, m] for m in range(k) if m not in pair]
            plan = np.stack(kept + [plan[:, i] + plan[:, j]], axis=1)
            weights = plan / plan.sum(0)
            cents[p], cpos[p] = weights.T @ tokens[p], weights.T @ pos[p]
            col = rows[p] @ weights
            cols[p] = col / col.sum()
        if k == 2:
            break
        k -= 1
    chosen_plans, chosen_k = [], []
    for p in range(n_prob):
        last = costs[p][-(k_max - 1) :]
        a = int(np.argmin(last))
        chosen_k.append(k_max - a)
        chosen_plans.append(plans[p][a])
    return np.stack(chosen_plans), np.array(chosen_k), np.array(costs)


def random_problems(n_prob=5, n_half=9, d=8, k0=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(n_prob, 2 * n_half, d, generator=g, dtype=torch.float64), dim=-1)
    sim = torch.rand(n_prob, 2 * n_half, generator=g, dtype=torch.float64) * 2 - 1
    pos = torch.rand(n_prob, 2 * n_half, 2, generator=g, dtype=torch.float64) * 50
    seeds = draw_seeds(token_marginals(sim, 2.0), k0, g)
    return tokens, sim, pos, seeds


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_marginals_and_loop_reference():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(6, 20, 4, generator=g, dtype=torch.float64)
    r = F.softmax(torch.randn(6, 20, generator=g, dtype=torch.float64), dim=1)
    c = F.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    plan, transport = sinkhorn(cost, r, c, lam=20.0, iters=5)
    torch.testing.assert_close(plan.sum(1), c, rtol=0, atol=1e-12)  # the last step scales the columns
    for p in range(6):
        ref = sinkhorn_np(cost[p].numpy(), r[p].numpy(), c[p].numpy(), 20.0, 5)
        np.testing.assert_allclose(plan[p].numpy(), ref, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(transport, (plan * cost).sum((1, 2)))
    converged, _ = sinkhorn(cost, r, c, lam=20.0, iters=2000)
    torch.testing.assert_close(converged.sum(2), r, rtol=0, atol=1e-8)
    torch.testing.assert_close(converged.sum(1), c, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- locate


def test_merge_columns_keeps_order_and_appends_the_merged_pair():
    plan = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(2, 3, 5)
    i, j = torch.tensor([1, 4]), torch.tensor([3, 0])
    out = merge_columns(plan, i, j)
    torch.testing.assert_close(
        out[0], torch.stack([plan[0, :, 0], plan[0, :, 2], plan[0, :, 4], plan[0, :, 1] + plan[0, :, 3]], 1)
    )
    torch.testing.assert_close(
        out[1], torch.stack([plan[1, :, 1], plan[1, :, 2], plan[1, :, 3], plan[1, :, 4] + plan[1, :, 0]], 1)
    )


@pytest.mark.parametrize(
    "cfg", [CrOCConfig(), CrOCConfig(pos_alpha=0.5, n_tokens=6, n_centroids_max=5, sinkhorn_iters=3)]
)
def test_vectorised_clustering_equals_loop_reference(cfg):
    tokens, sim, pos, seeds = random_problems(k0=cfg.n_tokens)
    out = cluster_joint_tokens(tokens, sim, pos, seeds, cfg)
    plans, ks, costs = reference_clustering(tokens.numpy(), sim.numpy(), pos.numpy(), seeds.numpy(), cfg)
    np.testing.assert_allclose(out.costs.numpy(), costs, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(out.chosen_k.numpy(), ks)
    np.testing.assert_allclose(out.plans.numpy(), plans, rtol=1e-9, atol=1e-12)
    assert set(out.chosen_k.tolist()) <= set(range(2, cfg.n_centroids_max + 1))


def grouped_keys(n_groups, b=4, heads=2, side=6, d=16, noise=0.05, seed=0):
    """Keys of 2 views whose patch tokens lie in ``n_groups`` vertical bands with orthogonal key directions."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    group = ((xs * n_groups) // side).flatten()
    keys = torch.eye(d)[group] + noise * torch.randn(2, b, heads, side * side, d, generator=g)
    cls = torch.ones(2, b, heads, 1, d) / math.sqrt(d) + noise * torch.randn(2, b, heads, 1, d, generator=g)
    pos = (torch.stack([xs, ys], -1).flatten(0, 1).float() * 8 + 4).expand(b, 2, -1, -1).clone()
    return torch.cat([cls, keys], 3).flatten(0, 1), pos


@pytest.mark.parametrize("n_groups", [2, 3])
def test_number_of_clusters_is_chosen_by_transport_cost(n_groups):
    # Converged Sinkhorn and no spatial term isolate the selection rule: with balanced marginals, k ≠ #groups
    # forces mass across groups and costs more.
    cfg = CrOCConfig(pos_alpha=0.0, sinkhorn_iters=50)
    for seed in range(3):
        keys, pos = grouped_keys(n_groups, seed=seed)
        a = teacher_assignments(keys, pos, cfg, torch.Generator().manual_seed(seed))
        assert (a.chosen_k == n_groups).all(), a.chosen_k
        # every chosen cluster is exactly one band, present in both views
        labels = a.weights.argmax(-1)  # (B, H, 2, N)
        band = ((torch.arange(36) % 6) * n_groups) // 6
        for lab in labels.reshape(-1, 2 * 36):
            for grp in range(n_groups):
                assert lab[torch.cat([band, band]) == grp].unique().numel() == 1
        assert (a.valid.sum(-1) == n_groups).all()


def test_per_image_generators_draw_the_same_seeds_whatever_the_batch():
    # DDP hands images 0, 2, 4 to one process and 1, 3, 5 to the other: with one generator per image, an
    # image's draws are those it gets in one process holding all six
    marginals = torch.softmax(torch.randn(6 * 2, 20, generator=torch.Generator().manual_seed(0)), -1)  # 2 heads

    def gens(images):
        return [torch.Generator().manual_seed(50 + j) for j in images]

    full = draw_seeds(marginals, 4, gens(range(6)))
    rows = torch.tensor([r for j in (1, 3, 5) for r in (2 * j, 2 * j + 1)])
    assert torch.equal(draw_seeds(marginals[rows], 4, gens([1, 3, 5])), full[rows])
    assert all(len(set(r.tolist())) == 4 for r in full)  # distinct seeds per problem
    with pytest.raises(ValueError, match="split evenly"):
        draw_seeds(marginals, 4, gens(range(5)))


def test_teacher_assignments_layout_matches_manual_assembly():
    g = torch.Generator().manual_seed(3)
    b, heads, n, d = 3, 2, 16, 8
    keys = torch.randn(2 * b, heads, 1 + n, d, generator=g, dtype=torch.float64)
    pos = torch.rand(b, 2, n, 2, generator=g, dtype=torch.float64) * 64
    cfg = CrOCConfig()
    got = teacher_assignments(keys, pos, cfg, torch.Generator().manual_seed(7))
    tok, sim, ppos = [], [], []
    for bi in range(b):
        for h in range(heads):
            views = [F.normalize(keys[v * b + bi, h], dim=-1) for v in range(2)]
            tok.append(torch.cat([views[0][1:], views[1][1:]]))
            sim.append(torch.cat([views[0][1:] @ views[0][0], views[1][1:] @ views[1][0]]))
            ppos.append(torch.cat([pos[bi, 0], pos[bi, 1]]))
    tok, sim, ppos = torch.stack(tok), torch.stack(sim), torch.stack(ppos)
    seeds = draw_seeds(token_marginals(sim, cfg.marginals_temp_r), cfg.n_tokens, torch.Generator().manual_seed(7))
    ref = cluster_joint_tokens(tok, sim, ppos, seeds, cfg)
    masked = hard_masked(ref.plans)
    torch.testing.assert_close(got.weights, masked.reshape(b, heads, 2, n, -1))
    torch.testing.assert_close(got.valid, valid_in_both_views(masked, n).reshape(b, heads, -1))
    torch.testing.assert_close(got.chosen_k, ref.chosen_k.reshape(b, heads))


def test_teacher_assignments_ignore_autocast():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(4, 2, 1 + 16, 8, generator=g).bfloat16().float()
    pos = torch.rand(2, 2, 16, 2, generator=g) * 32
    plain = teacher_assignments(keys, pos, CrOCConfig(), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher_assignments(keys, pos, CrOCConfig(), torch.Generator().manual_seed(0))
    assert mixed.weights.dtype == torch.float32
    torch.testing.assert_close(mixed.weights, plain.weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(mixed.valid, plain.valid)


# ---------------------------------------------------------------- split


def test_hard_mask_keeps_only_the_argmax_weight():
    plans = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]])
    expected = torch.tensor([[[0.0, 0.5, 0.0], [0.6, 0.0, 0.0]]])
    torch.testing.assert_close(hard_masked(plans), expected)


def test_cluster_present_in_one_view_only_is_dropped():
    # 2 tokens per view, K = 4: cluster 0 in both views, cluster 1 only in view 1, cluster 2 only in view 2,
    # cluster 3 is padding (all zero).
    plans = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.7, 0.1, 0.2, 0.0], [0.3, 0.1, 0.6, 0.0]]])
    masked = hard_masked(plans)
    assert valid_in_both_views(masked, 2).tolist() == [[True, False, False, False]]


def test_centroid_pooling_equals_loop_reference():
    g = torch.Generator().manual_seed(5)
    b, heads, n, k, dim = 2, 3, 4, 3, 6
    weights = hard_masked(torch.rand(b, heads, 2, n, k, generator=g, dtype=torch.float64))
    present = (weights.sum(3) > 0).all(2)  # (B, H, K) non-empty in both views
    valid = present & (torch.rand(b, heads, k, generator=g) > 0.3)
    assert valid.sum() >= 3
    tokens = torch.randn(2 * b, 1 + n, dim, generator=g, dtype=torch.float64)
    c1, c2 = pooled_centroids(tokens, Assignments(weights, valid, torch.full((b, heads), k)))
    cls_norm = np.mean([tokens[i, 0].norm().item() for i in range(2 * b)])
    ref = {0: [], 1: []}
    for bi in range(b):
        for h in range(heads):
            for ki in range(k):
                if not valid[bi, h, ki]:
                    continue
                for v in range(2):
                    c = sum(weights[bi, h, v, m, ki] * tokens[v * b + bi, 1 + m] for m in range(n))
                    ref[v].append(cls_norm * c / c.norm())
    torch.testing.assert_close(c1, torch.stack(ref[0]))
    torch.testing.assert_close(c2, torch.stack(ref[1]))


# ---------------------------------------------------------------- loss


def test_croc_loss_equals_hand_computation_and_updates_centres():
    g = torch.Generator().manual_seed(2)
    cfg = CrOCConfig()
    loss = CrOCLoss(7, 5, cfg)
    loss.center.copy_(torch.randn(1, 7, generator=g))
    center0, center_c0 = loss.center.clone(), loss.center_c.clone()
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    sc, tc = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    loss_d, loss_c, _ = loss(s, t, sc, tc)

    def ce(student, teacher, center, t_temp, s_temp):
        m = student.shape[0] // 2
        total = 0.0
        for a, bb in ((0, 1), (1, 0)):  # teacher view a, student view bb
            for i in range(m):
                q = torch.softmax((teacher[a * m + i] - center[0]) / t_temp, 0)
                total += -(q * torch.log_softmax(student[bb * m + i] / s_temp, 0)).sum() / m
        return total / 2

    torch.testing.assert_close(loss_d, ce(s, t, center0, 0.04, 0.1))
    torch.testing.assert_close(loss_c, ce(sc, tc, center_c0, 0.04, 0.1))
    torch.testing.assert_close(loss.center, 0.9 * center0 + 0.1 * t.mean(0, keepdim=True))
    torch.testing.assert_close(loss.center_c, 0.9 * center_c0 + 0.1 * tc.mean(0, keepdim=True))


def test_croc_loss_without_centroids_is_zero_and_keeps_the_centroid_centre():
    loss = CrOCLoss(4, 3)
    loss.center_c.fill_(0.5)
    _, loss_c, _ = loss(torch.randn(4, 4), torch.randn(4, 4), torch.zeros(0, 3), torch.zeros(0, 3))
    assert loss_c.item() == 0.0
    assert torch.equal(loss.center_c, torch.full((1, 3), 0.5))


def tiny_setup(seed=0, n_tokens=5, n_centroids_max=4, dtype=torch.float32):
    torch.manual_seed(seed)
    student = create_vit("vit_tiny_patch16_224", patch_size=8, depth=1, img_size=16).to(dtype)
    teacher = copy.deepcopy(student)
    s_head = CrOCHead(192, 32, 16, hidden_dim=64, bottleneck_dim=16).to(dtype)
    t_head = copy.deepcopy(s_head)
    cfg = CrOCConfig(n_tokens=n_tokens, n_centroids_max=n_centroids_max)
    return student, teacher, s_head, t_head, cfg


def grid_positions(b, side, patch):
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    p = torch.stack([xs, ys], -1).flatten(0, 1).float() * patch + patch / 2
    return torch.stack([p, p + 3.0]).expand(b, 2, -1, -1).clone()


def test_total_loss_is_symmetric_in_the_views():
    # With every token a seed (n_tokens = 2N) the clustering does not depend on the seed order, so
    # swapping the views (and their positions) must give the same loss.
    student, teacher, s_head, t_head, cfg = tiny_setup(n_tokens=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(3, 2, 3, 16, 16, generator=g, dtype=torch.float64)
    pos = grid_positions(3, 2, 8).double()
    pos[:, 1] = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * 16
    loss_a, logs_a = croc_forward_loss(
        student,
        teacher,
        s_head,
        t_head,
        CrOCLoss(32, 16, cfg).double(),
        views,
        pos,
        cfg,
        torch.Generator().manual_seed(1),
    )
    loss_b, logs_b = croc_forward_loss(
        student,
        teacher,
        s_head,
        t_head,
        CrOCLoss(32, 16, cfg).double(),
        views.flip(1),
        pos.flip(1),
        cfg,
        torch.Generator().manual_seed(2),
    )
    assert logs_a["loss_c"] > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-9)
    assert logs_a["centroid_pairs_per_image"] == logs_b["centroid_pairs_per_image"]


def test_gradients_reach_the_student_only():
    student, teacher, s_head, t_head, cfg = tiny_setup()
    views = torch.randn(4, 2, 3, 16, 16)
    loss, logs = croc_forward_loss(
        student,
        teacher,
        s_head,
        t_head,
        CrOCLoss(32, 16, cfg),
        views,
        grid_positions(4, 2, 8),
        cfg,
        torch.Generator().manual_seed(0),
    )
    assert logs["centroid_pairs_per_image"] > 0
    loss.backward()
    for name, p in list(student.named_parameters()) + list(s_head.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert s_head.last_layer_c.parametrizations.weight.original1.grad.abs().sum() > 0  # centroid path
    assert s_head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0  # CLS path
    for name, p in list(teacher.named_parameters()) + list(t_head.named_parameters()):
        assert p.grad is None, name


def test_centroid_loss_alone_trains_the_backbone():
    student, teacher, s_head, t_head, cfg = tiny_setup()
    loss_module = CrOCLoss(32, 16, cfg).eval()  # eval: centres stay fixed between the two calls
    views, pos = torch.randn(4, 2, 3, 16, 16), grid_positions(4, 2, 8)
    with_c, logs = croc_forward_loss(
        student, teacher, s_head, t_head, loss_module, views, pos, cfg, torch.Generator().manual_seed(0)
    )
    without_c, _ = croc_forward_loss(
        student,
        teacher,
        s_head,
        t_head,
        loss_module,
        views,
        pos,
        dataclasses.replace(cfg, alpha_s=0.0),
        torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(with_c - without_c, torch.tensor(logs["loss_c"]))
    (with_c - without_c).backward()  # the centroid term alone
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert s_head.last_layer_c.parametrizations.weight.original1.grad.abs().sum() > 0
    assert s_head.last_layer.parametrizations.weight.original1.grad.abs().sum() == 0


def test_token_output_wrapper_gives_the_same_loss_and_ema():
    student, teacher, s_head, t_head, cfg = tiny_setup()
    views, pos = torch.randn(2, 2, 3, 16, 16), grid_positions(2, 2, 8)
    loss_module = CrOCLoss(32, 16, cfg).eval()

    def run(s, t):
        gen = torch.Generator().manual_seed(0)
        loss, _ = croc_forward_loss(s, t, s_head, t_head, loss_module, views, pos, cfg, gen)
        return loss

    plain, wrapped = run(student, teacher), run(TokenOutput(student), TokenOutput(teacher))
    torch.testing.assert_close(plain, wrapped, rtol=0, atol=0)
    ema_update(TokenOutput(teacher), TokenOutput(student), 0.5)  # names match through the wrapper


def test_ema_update_is_exact():
    torch.manual_seed(0)
    student, teacher = DINOHead(5, 7, 6, 4), DINOHead(5, 7, 6, 4)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.75)  # 0.75 and 0.25 are exact in binary: m t + (1 - m) s has no rounding slack
    for (n, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(t, 0.75 * before[n] + 0.25 * s), n


def test_teacher_momentum_cosine_schedule():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    values = [teacher_momentum(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


# ---------------------------------------------------------------- heads


def test_heads_norm_last_layer_and_shared_mlp():
    head = CrOCHead(12, 10, 6, hidden_dim=16, bottleneck_dim=8)
    for layer in (head.last_layer, head.last_layer_c):
        gain = layer.parametrizations.weight.original0
        assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.weight.shape[0]))
    x = torch.randn(3, 12)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.T)
    torch.testing.assert_close(head.forward_c(x), z @ head.last_layer_c.weight.T)
    free = DINOHead(12, 10, 16, 8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3


def test_cancel_last_layer_grads_matches_both_last_layers():
    head = CrOCHead(4, 5, 3, hidden_dim=6, bottleneck_dim=4, norm_last_layer=False)
    (head(torch.randn(2, 4)).sum() + head.forward_c(torch.randn(2, 4)).sum()).backward()
    cancel_last_layer_grads(head)
    for name, p in head.named_parameters():
        assert (p.grad is None) == ("last_layer" in name), name


def test_config_rejects_impossible_cluster_counts():
    with pytest.raises(UserError, match="n_centroids_max"):
        CrOCConfig(n_tokens=3, n_centroids_max=4)


# ---------------------------------------------------------------- end to end


def test_a_few_optimisation_steps_run_on_cpu():
    student, teacher, s_head, t_head, cfg = tiny_setup()
    for p in list(teacher.parameters()) + list(t_head.parameters()):
        p.requires_grad_(False)
    loss_module = CrOCLoss(32, 16, cfg)
    opt = torch.optim.AdamW(list(student.parameters()) + list(s_head.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(4, 2, 3, 16, 16, generator=g)
    pos = grid_positions(4, 2, 8)
    losses = []
    for step in range(3):
        loss, logs = croc_forward_loss(student, teacher, s_head, t_head, loss_module, views, pos, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(teacher, student, teacher_momentum(step, 3))
        ema_update(t_head, s_head, teacher_momentum(step, 3))
        losses.append(logs["loss"])
        assert 2 <= logs["mean_k"] <= cfg.n_centroids_max
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(teacher.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)
    assert loss_module.center.abs().sum() > 0
