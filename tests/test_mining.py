"""The MaskDistill mining rule, pinned step by step on hand-made tensors and against a loop reference."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from unseg.mining import (
    MiningConfig,
    attention_mass_mask,
    border_fraction,
    cls_affinity,
    component_of,
    mine_masks,
    topk_count,
    topk_members,
)


def reference_mine(cls_logits, keys, grid, heads, cls_mass, topk_fraction, keep_component):
    """A literal, loop-based reading of reference.md §1.1 (N x N Gram matrix, python sets)."""
    n = keys.shape[0]
    a = cls_logits[:, : heads or cls_logits.shape[1]].mean(1)
    if cls_mass is not None:
        order = sorted(range(n), key=lambda j: (a[j], j))  # ascending, stable
        total = sum(a)
        cum, keep = 0.0, np.zeros(n, bool)
        for j in order:
            cum += a[j] / total
            keep[j] = cum > 1 - cls_mass
        a = a * keep
    k = int(topk_fraction * n + 1e-9)
    proposals = sorted(range(n), key=lambda j: (-a[j], j))[:k]
    s = proposals[0]
    A = keys @ keys.T
    p_prime = [j for j in proposals if A[s, j] > 0]
    mask = np.array([sum(A[j, p] for j in p_prime) > 0 for p in range(n)])
    if keep_component:
        labels, _ = ndimage.label(mask.reshape(grid))
        mask = (labels == labels.flat[s]).reshape(-1)
    return mask, s


def test_cls_affinity_averages_the_first_heads():
    logits = torch.tensor([[[1.0, 3.0, 100.0], [2.0, 2.0, -50.0]]])  # (B=1, N=2, H=3)
    assert torch.allclose(cls_affinity(logits, heads=2), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(cls_affinity(logits, heads=None), torch.tensor([[104 / 3, -46 / 3]]))
    with pytest.raises(ValueError):
        cls_affinity(logits, heads=4)


def test_attention_mass_mask_keeps_the_top_half_of_the_mass():
    a = torch.tensor([[1.0, 4.0, 2.0, 3.0]])  # total 10; sorted 1,2,3,4 -> cum .1 .3 .6 1.0
    # cum > 0.5 keeps values 3 and 4 (cum .6 and 1.0)
    assert attention_mass_mask(a, 0.5).tolist() == [[False, True, False, True]]
    # mass 0.75: cum > 0.25 keeps 2, 3, 4
    assert attention_mass_mask(a, 0.75).tolist() == [[False, True, True, True]]


def test_topk_breaks_ties_by_lower_index():
    a = torch.tensor([[0.0, 5.0, 0.0, 0.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    # row 0: 5, 5, 1, then the first of the three zeros; row 1: all tied, the first four
    assert topk_members(a, 4).int().tolist() == [[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (64, 37), generator=g).float()  # many ties
    for k in (1, 7, 36, 37):
        first_k = torch.sort(a, dim=-1, descending=True, stable=True).indices[:, :k]
        want = torch.zeros_like(a, dtype=torch.bool).scatter_(1, first_k, True)
        assert torch.equal(topk_members(a, k), want), k
    assert topk_count(10, 0.4) == 4 and topk_count(3, 0.1) == 1 and topk_count(100, 0.3) == 30


def test_source_filter_uses_the_sign_of_the_key_affinity():
    # 1 x 4 grid; keys chosen so that A[s, j] > 0 only for some proposals.
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [0.0, 1.0]]])
    logits = torch.tensor([[[9.0], [8.0], [7.0], [1.0]]])  # source = token 0, P = top 3 = {0, 1, 2}
    cfg = MiningConfig(heads=None, cls_mass=None, topk_fraction=0.75, keep_component=False)
    out = mine_masks(logits, keys, (1, 4), cfg)
    # P' = {0, 1} (A[0,2] = -1 < 0); score(p) = (k0 + k1) . k_p = (2, 0.1) . k_p
    # p0: 2 > 0, p1: 2.01 > 0, p2: -2 < 0, p3: 0.1 > 0
    assert out.source.tolist() == [0]
    assert out.mask.tolist() == [[True, True, False, True]]


def test_keep_component_drops_a_disconnected_region():
    keys = torch.tensor([[[1.0], [1.0], [-1.0], [1.0]]])  # grid 1 x 4: tokens 0,1 | 2 negative | 3
    logits = torch.tensor([[[4.0], [3.0], [2.0], [1.0]]])
    cfg = MiningConfig(heads=None, cls_mass=None, topk_fraction=0.5, keep_component=False)
    assert mine_masks(logits, keys, (1, 4), cfg).mask.tolist() == [[True, True, False, True]]
    cfg = MiningConfig(heads=None, cls_mass=None, topk_fraction=0.5, keep_component=True)
    assert mine_masks(logits, keys, (1, 4), cfg).mask.tolist() == [[True, True, False, False]]


def test_component_is_four_connected_not_eight():
    mask = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    for method in ("label", "dilate"):
        comp = component_of(mask, torch.tensor([4]), method=method)  # seed at the centre
        assert comp.int().tolist() == [[[0, 0, 0], [0, 1, 0], [0, 1, 1]]]


def test_component_matches_scipy_on_random_masks():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 9, 11, generator=g) > 0.45
    seeds = torch.stack([torch.nonzero(m.view(-1))[0, 0] for m in mask])
    for method in ("label", "dilate"):  # the batched label must not join images: one image per call here
        comp = component_of(mask, seeds, method=method)
        for b in range(16):
            labels, _ = ndimage.label(mask[b].numpy())
            want = labels == labels.flat[int(seeds[b])]
            assert np.array_equal(comp[b].numpy(), want), (method, b)


def test_component_matches_scipy_on_thin_grids_and_seeds_outside_the_mask():
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 13), (13, 1), (1, 1), (2, 7), (23, 31)):
        mask = torch.rand(8, *shape, generator=g) > 0.4
        seeds = torch.randint(0, shape[0] * shape[1], (8,), generator=g)  # some fall outside the mask
        for method in ("label", "dilate"):
            comp = component_of(mask, seeds, method=method)
            for b in range(8):
                labels, _ = ndimage.label(mask[b].numpy())
                seed_label = labels.flat[int(seeds[b])]
                want = (labels == seed_label) if seed_label else np.zeros(shape, bool)
                assert np.array_equal(comp[b].numpy(), want), (method, shape, b)


def test_mass_mask_ties_follow_token_order_when_few_tokens_survive():
    # One peaked token: after the mass mask every other a_CLS is 0, so P is filled by index order.
    logits = torch.tensor([[[0.0], [0.0], [10.0], [0.0], [0.0]]])
    keys = torch.eye(5)[None]
    cfg = MiningConfig(heads=None, cls_mass=0.5, topk_fraction=0.6, keep_component=False)
    out = mine_masks(logits, keys, (1, 5), cfg)
    assert out.source.tolist() == [2]
    # P = {2, 0, 1}; P' = {2} (orthogonal keys); mask = {2}
    assert out.mask.tolist() == [[False, False, True, False, False]]


@pytest.mark.parametrize("cls_mass", [None, 0.5])
@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("keep_component", [False, True])
def test_vectorised_rule_equals_the_loop_reference(cls_mass, heads, keep_component):
    rng = np.random.default_rng(1)
    grid = (6, 7)
    n, h, d = grid[0] * grid[1], 3, 4
    # structured keys: a blob of tokens shares a direction, plus noise, like an object on background
    base = rng.normal(size=(2, h * d))
    obj = np.zeros(grid, bool)
    obj[1:4, 2:6] = True
    keys = np.where(obj.reshape(-1, 1), base[0], base[1]) + 0.8 * rng.normal(size=(n, h * d))
    logits = rng.normal(size=(n, h)) + 2.0 * obj.reshape(-1, 1)
    cfg = MiningConfig(heads=heads, cls_mass=cls_mass, topk_fraction=0.4, keep_component=keep_component)
    batch_keys = torch.tensor(np.stack([keys, -keys, keys[::-1].copy()]), dtype=torch.float32)
    batch_logits = torch.tensor(np.stack([logits, logits, logits[::-1].copy()]), dtype=torch.float32)
    out = mine_masks(batch_logits, batch_keys, grid, cfg)
    for b in range(3):
        want_mask, want_s = reference_mine(
            batch_logits[b].double().numpy(),
            batch_keys[b].double().numpy(),
            grid,
            heads,
            cls_mass,
            0.4,
            keep_component,
        )
        assert int(out.source[b]) == want_s
        assert np.array_equal(out.mask[b].numpy(), want_mask)


def test_batched_mining_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(5, 20, 8, generator=g)
    logits = torch.randn(5, 20, 2, generator=g)
    cfg = MiningConfig(heads=1, cls_mass=0.5, topk_fraction=0.4, keep_component=True)
    together = mine_masks(logits, keys, (4, 5), cfg)
    for b in range(5):
        alone = mine_masks(logits[b : b + 1], keys[b : b + 1], (4, 5), cfg)
        assert torch.equal(alone.mask[0], together.mask[b]) and alone.source[0] == together.source[b]


def test_source_always_belongs_to_its_mask():
    g = torch.Generator().manual_seed(4)
    out = mine_masks(torch.randn(8, 30, 3, generator=g), torch.randn(8, 30, 6, generator=g), (5, 6), MiningConfig())
    assert out.mask[torch.arange(8), out.source].all()


def test_bottom_proposals_are_the_rule_on_the_negated_cls_affinity():
    g = torch.Generator().manual_seed(5)
    keys, logits = torch.randn(4, 20, 6, generator=g), torch.randn(4, 20, 3, generator=g)
    for mass in (None, 0.5):
        bottom = mine_masks(logits, keys, (4, 5), MiningConfig(None, mass, 0.4, True, proposals="bottom"))
        top_of_negated = mine_masks(-logits, keys, (4, 5), MiningConfig(None, mass, 0.4, True, proposals="top"))
        assert torch.equal(bottom.mask, top_of_negated.mask) and torch.equal(bottom.source, top_of_negated.source)
    # the source is the least attended token
    plain = mine_masks(logits, keys, (4, 5), MiningConfig(None, None, 0.4, False, proposals="bottom"))
    assert torch.equal(plain.source, logits.mean(-1).argmin(-1))


def test_border_fraction_counts_the_outer_ring_of_the_grid():
    grid = (4, 5)  # 14 border tokens
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1:3, 1:4] = True  # interior only
    mask[1, 0, :] = True  # the top row: 5 of 14
    mask[1, 2, 2] = True
    assert border_fraction(mask.view(2, -1), grid).tolist() == pytest.approx([0.0, 5 / 14])


def object_grid(attends_object: bool):
    """A 6 x 6 token grid with a 3 x 3 object in the middle; keys: object e1, background e2 (orthogonal);
    the CLS attends the object (logits 2 there, 0 elsewhere, then centred) or the background (the reverse)."""
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[2:5, 1:4] = True
    obj = obj.view(-1)
    keys = torch.where(obj[:, None], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    ramp = torch.linspace(0, 0.1, 36)  # breaks ties inside each region
    logits = (obj.float() if attends_object else 1 - obj.float()) * 2 + ramp
    logits = logits - logits.mean()
    return logits[None, :, None], keys[None], obj


@pytest.mark.parametrize("attends_object", [True, False])
def test_auto_proposals_pick_the_side_that_holds_the_object(attends_object):
    logits, keys, obj = object_grid(attends_object)
    cfg = dict(heads=None, cls_mass=None, topk_fraction=0.4, keep_component=True)
    auto = mine_masks(logits, keys, (6, 6), MiningConfig(**cfg, proposals="auto"))
    paper = mine_masks(logits, keys, (6, 6), MiningConfig(**cfg, proposals="top"))
    assert torch.equal(auto.mask[0], obj)
    assert bool(auto.bottom[0]) is (not attends_object)
    # the paper's rule finds the object only when the CLS attends it; otherwise it mines the background
    assert torch.equal(paper.mask[0], obj) is attends_object
    if not attends_object:
        assert torch.equal(paper.mask[0], ~obj)


def test_auto_proposals_decide_per_image_within_a_batch():
    pairs = [object_grid(True), object_grid(False), object_grid(False)]
    logits = torch.cat([p[0] for p in pairs])
    keys = torch.cat([p[1] for p in pairs])
    out = mine_masks(logits, keys, (6, 6), MiningConfig(None, 0.5, 0.4, True, proposals="auto"))
    assert out.bottom.tolist() == [False, True, True]
    for b, (_, _, obj) in enumerate(pairs):
        assert torch.equal(out.mask[b], obj)
        assert bool(obj[out.source[b]])


def test_more_masks_per_image_rerun_the_rule_on_the_tokens_left():
    """Two objects with their own keys (e1, e3) on a background (e2); the CLS attends object A most, then B."""
    a_obj, b_obj = torch.zeros(6, 6, dtype=torch.bool), torch.zeros(6, 6, dtype=torch.bool)
    a_obj[1:3, 1:3] = True
    b_obj[3:5, 3:6] = True
    a_obj, b_obj = a_obj.view(-1), b_obj.view(-1)
    e = torch.eye(3)
    keys = torch.where(a_obj[:, None], e[0], torch.where(b_obj[:, None], e[2], e[1]))[None]
    logits = (3.0 * a_obj.float() + 2.0 * b_obj.float() + torch.linspace(0, 0.1, 36))[None, :, None]
    logits = logits - logits.mean()
    cfg = dict(heads=None, cls_mass=None, topk_fraction=0.2, keep_component=True, proposals="top")
    one = mine_masks(logits, keys, (6, 6), MiningConfig(**cfg))
    assert torch.equal(one.mask[0], a_obj) and torch.equal(one.label[0], a_obj.to(torch.uint8))
    three = mine_masks(logits, keys, (6, 6), MiningConfig(**cfg, masks_per_image=3))
    assert torch.equal(three.label[0] == 1, a_obj) and torch.equal(three.label[0] == 2, b_obj)
    rest = ~(a_obj | b_obj)  # the third round: only background tokens are left, and they form one component
    assert torch.equal(three.label[0] == 3, rest)
    assert torch.equal(three.mask[0], a_obj | b_obj | rest) and int(three.source[0]) == int(one.source[0])
    # a fourth round has no token left: its mask is empty
    four = mine_masks(logits, keys, (6, 6), MiningConfig(**cfg, masks_per_image=4))
    assert torch.equal(four.label, three.label)


def test_border_fraction_counts_each_border_pixel_once_on_a_pixel_grid():
    # background_clusters' use: one (H, W) pixel mask at a time
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :] = True  # the top row: 5 of the 14 border pixels
    mask[2, 2] = True  # inside: not border
    assert float(border_fraction(mask.view(1, -1), (4, 5))[0]) == pytest.approx(5 / 14)
    mask[1:3, 0] = True  # 2 more on the left column
    assert float(border_fraction(mask.view(1, -1), (4, 5))[0]) == pytest.approx(7 / 14)
    assert float(border_fraction(torch.ones(1, 9, dtype=torch.bool), (3, 3))[0]) == 1.0
