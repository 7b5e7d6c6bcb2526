"""Mask features for K-means (unseg.clustering): each input mode against its rule on a hand-made mask."""

import numpy as np
import pytest
import torch

from unseg.clustering import (
    assign_clusters,
    background_clusters,
    kmeans,
    kmeans_pp,
    lloyd_kmeans,
    mask_features,
    nearest_center,
    whiten_l2,
)
from unseg.coco import annotation
from unseg.data.transforms import geometry, vit_input
from unseg.models.vit import create_vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", patch_size=8, depth=2).eval()


def _items():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    geom = geometry(32, 48, 32, 8)  # a 4 x 6 token grid
    left = np.zeros((4, 6), bool)
    left[1:3, 0:2] = True
    right = np.zeros((4, 6), bool)
    right[0, 5] = True
    return image, geom, [(7, image, left, geom), (7, image, right, geom)]


@torch.no_grad()
def test_patch_mean_is_the_mean_of_the_patch_tokens_inside_the_mask(vit):
    image, geom, items = _items()
    feats, anns = mask_features(vit, items, "patch_mean", torch.device("cpu"))
    tokens = vit.forward_features(vit_input(image, geom)[None])[0, 1:].reshape(4, 6, -1)
    assert torch.allclose(torch.from_numpy(feats[0]), tokens[1:3, 0:2].reshape(-1, tokens.shape[-1]).mean(0), atol=1e-5)
    assert torch.allclose(torch.from_numpy(feats[1]), tokens[0, 5], atol=1e-5)
    assert [a["image_id"] for a in anns] == [7, 7] and feats.shape == (2, vit.embed_dim)


@torch.no_grad()
def test_masked_is_the_cls_token_of_the_image_zeroed_outside_the_mask(vit):
    image, geom, items = _items()
    feats, _ = mask_features(vit, items[:1], "masked", torch.device("cpu"))
    x = vit_input(image, geom)
    x[:, ~np.kron(items[0][2], np.ones((8, 8), bool))] = 0
    assert torch.allclose(torch.from_numpy(feats[0]), vit.forward_features(x[None])[0, 0], atol=1e-5)


def test_whiten_l2_divides_by_the_std_then_normalises():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])  # column stds 1 and 2
    out, std = whiten_l2(x)
    assert np.allclose(std, [1.0, 2.0])
    assert np.allclose(out, np.array([[1, 1], [3, 3]]) / np.sqrt([[2], [18]]), atol=1e-6)


def test_nearest_center_is_the_argmin_of_the_squared_distances_in_any_chunking():
    x, c = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), torch.randn(6, 7)
    d = torch.cdist(x, c) ** 2
    for chunk in (50, 16, 1):
        labels, d2 = nearest_center(x, c, chunk=chunk)
        assert torch.equal(labels, d.argmin(1))
        assert torch.allclose(d2, d.min(1).values, atol=1e-4)


def test_kmeans_pp_never_picks_a_point_twice_while_others_are_farther():
    # 4 distinct points, k = 4: D^2 weighting gives a chosen point weight 0, so all four are picked
    x = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    for seed in range(5):
        picked = kmeans_pp(x, 4, torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, picked.tolist())) == sorted(map(tuple, x.tolist()))


def test_lloyd_recovers_separated_blobs_and_matches_sklearn_kmeans_inertia():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centres = 10 * rng.normal(size=(8, 16))
    truth = rng.integers(0, 8, 800)
    x = (centres[truth] + rng.normal(size=(800, 16))).astype(np.float32)
    res = kmeans(x, 8, seed=0, algorithm="lloyd")
    pairs = set(zip(truth.tolist(), res.labels.tolist(), strict=True))
    assert len(pairs) == 8 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 8  # a bijection
    ours = float(((x - res.centers[res.labels]) ** 2).sum())
    ref = KMeans(8, n_init=3, random_state=0).fit(x).inertia_
    assert ours == pytest.approx(ref, rel=1e-4)
    again = kmeans(x, 8, seed=0, algorithm="lloyd")
    assert np.array_equal(again.labels, res.labels)  # seeded: the same run twice


def test_lloyd_refills_an_emptied_cluster_with_a_data_row_never_a_0_over_0_mean():
    # two distinct rows, k = 3: some centre must lose all its rows; it takes a row, not NaN
    x = torch.tensor([[1.0, 1], [1, 1], [1, 1], [5, 5], [5, 5], [5, 5]])  # the origin is no row
    for seed in range(4):
        centers = lloyd_kmeans(x, 3, seed=seed, n_init=1)
        assert all(any(torch.equal(c, row) for row in x) for c in centers)
        assert float(nearest_center(x, centers)[1].sum()) == 0


def test_lloyd_fits_a_capped_random_sample_like_faiss_and_all_rows_below_the_cap():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1000, 4, generator=g) + 20, torch.randn(1000, 4, generator=g) - 20])
    full = lloyd_kmeans(x, 2, seed=0, n_init=1, max_rows_per_center=None)
    assert torch.equal(lloyd_kmeans(x, 2, seed=0, n_init=1, max_rows_per_center=1000), full)  # 2000 <= 2 * 1000
    capped = lloyd_kmeans(x, 2, seed=0, n_init=1, max_rows_per_center=10)  # fitted on 20 rows
    assert not torch.equal(capped, full)  # another fit...
    for c in capped:  # ...that still finds both blobs, each centre within a noise std of its blob's mean
        assert min(float((c - m).norm()) for m in (x[:1000].mean(0), x[1000:].mean(0))) < 1.0
    assert torch.equal(lloyd_kmeans(x, 2, seed=0, n_init=1, max_rows_per_center=10), capped)  # seeded


def test_lloyd_random_init_seeds_with_data_rows_and_recovers_separated_blobs():
    rng = np.random.default_rng(1)
    centres = 10 * rng.normal(size=(4, 8))
    truth = rng.integers(0, 4, 400)
    x = torch.from_numpy((centres[truth] + rng.normal(size=(400, 8))).astype(np.float32))
    one_round = lloyd_kmeans(x, 4, seed=0, n_init=1, max_iter=0, init="random")  # the seeding itself
    assert all(any(torch.equal(c, row) for row in x) for c in one_round)
    labels = nearest_center(x, lloyd_kmeans(x, 4, seed=0, n_init=10, init="random"))[0]
    pairs = set(zip(truth.tolist(), labels.tolist(), strict=True))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 4  # a bijection
    with pytest.raises(ValueError, match="init"):
        lloyd_kmeans(x, 4, seed=0, init="kmeans")


def test_background_clusters_rank_clusters_by_mean_border_share():
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    border = np.array([0.1, 0.3, 0.9, 0.7, 0.8, 0.5, 0.0])  # means: 0.2, 0.8, 0.5, 0.0; cluster 4 is empty
    assert background_clusters(labels, border, 5, 1).tolist() == [1]
    assert background_clusters(labels, border, 5, 3).tolist() == [1, 2, 0]
    assert background_clusters(labels, border, 5, 5).tolist()[-1] == 4  # empty ranks last


def _blob_masks():
    """Three feature blobs: two of central object masks, one of masks along the image border."""
    rng = np.random.default_rng(0)
    centre = np.zeros((16, 16), bool)
    centre[5:11, 5:11] = True
    frame = np.ones((16, 16), bool)
    frame[4:12, 4:12] = False
    means = np.eye(3) * 10
    feats, anns = [], []
    for cls, mask in ((0, centre), (1, centre), (2, frame)):
        for _ in range(6):
            feats.append(means[cls] + rng.normal(0, 0.1, 3))
            anns.append(annotation(len(anns) + 1, len(anns), 0, mask))
    return np.array(feats, np.float32), anns


def test_assign_clusters_drops_the_border_cluster_and_renumbers_the_rest():
    feats, anns = _blob_masks()
    km, _, kept = assign_clusters(feats, [dict(a) for a in anns], 2, seed=0, algorithm="lloyd", background=1)
    assert [a["id"] for a in kept] == list(range(1, 13))  # the 6 frame masks (ids 13..18) are gone
    assert (km.labels[12:] == -1).all() and set(km.labels[:12].tolist()) == {0, 1}
    assert len(set(km.labels[:6].tolist())) == 1 and km.labels[0] != km.labels[6]  # one category per blob
    assert {a["category_id"] for a in kept} == {1, 2}
    assert all(a["category_id"] == label + 1 for a, label in zip(kept, km.labels, strict=False))
    # centres in category order: each kept mask's feature is nearest its own category's centre
    x = whiten_l2(feats)[0]
    nearest = ((x[:, None] - km.centers[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == np.where(km.labels >= 0, km.labels, 2)).all()


def test_assign_clusters_without_background_keeps_every_mask_as_before():
    feats, anns = _blob_masks()
    km, _, kept = assign_clusters(feats, [dict(a) for a in anns], 3, seed=0, algorithm="lloyd")
    plain = kmeans(whiten_l2(feats)[0], 3, 0, "lloyd")
    assert len(kept) == 18 and km.labels.tolist() == plain.labels.tolist()
    assert [a["category_id"] for a in kept] == (plain.labels + 1).tolist()
