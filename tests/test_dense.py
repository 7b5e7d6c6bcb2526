"""Dense K-means transfer protocol: one K-means over all L2-normalised tokens, then Hungarian mIoU."""

import numpy as np
import pytest

from unseg.errors import UserError
from unseg.evaluation.dense import dense_kmeans_labels, l2_normalise, raw_pixel_kmeans_labels, upsample_labels
from unseg.matching import ConfusionAccumulator, evaluate_clusters

DIM = 6


def two_direction_features(n_images: int = 5, seed: int = 0):
    """Token features pointing along e0 (class 0) or e1 (class 1) with norms ≈0.2 or ≈10 at random: the
    groups differ in direction only, so K-means without L2 normalisation mixes them up by norm."""
    rng = np.random.default_rng(seed)
    feats, classes = [], []
    for i in range(n_images):
        h, w = 4 + i % 2, 6 - i % 3  # grids differ per image
        cls = rng.integers(0, 2, size=(h, w))
        direction = np.eye(DIM)[cls] + 0.05 * rng.standard_normal((h, w, DIM))
        norms = rng.choice([0.2, 10.0], size=(h, w, 1)) * rng.uniform(0.8, 1.2, size=(h, w, 1))
        feats.append(direction * norms)
        classes.append(cls)
    return feats, classes


def hungarian_miou(cluster_maps, gt_maps, k, n_classes):
    acc = ConfusionAccumulator(k, n_classes)
    for c, g in zip(cluster_maps, gt_maps, strict=True):
        acc.update(upsample_labels(c, g.shape), g)
    return evaluate_clusters(acc.matrix)["hungarian"]["miou"]


@pytest.mark.parametrize("algorithm", ["minibatch", "faiss"])
def test_dense_kmeans_separates_directions(algorithm):
    feats, classes = two_direction_features()
    gt = [np.kron(c, np.ones((8, 8), dtype=np.int64)) for c in classes]  # labels at pixel resolution
    maps = dense_kmeans_labels(feats, k=2, seed=0, algorithm=algorithm)
    assert [m.shape for m in maps] == [c.shape for c in classes]
    assert hungarian_miou(maps, gt, 2, 2) == 1.0


def test_normalisation_is_what_separates_them():
    from sklearn.cluster import KMeans

    feats, classes = two_direction_features()
    raw = np.concatenate([f.reshape(-1, DIM) for f in feats])
    flat_gt = np.concatenate([c.ravel() for c in classes])
    unnormalised = KMeans(2, random_state=0, n_init=3).fit_predict(raw)
    normalised = KMeans(2, random_state=0, n_init=3).fit_predict(l2_normalise(raw))
    agreement = lambda a: max(np.mean(a == flat_gt), np.mean(a != flat_gt))  # noqa: E731
    assert agreement(normalised) == 1.0
    assert agreement(unnormalised) < 0.9


def test_dense_kmeans_deterministic_and_subsampled_fit():
    feats, classes = two_direction_features()
    a = dense_kmeans_labels(feats, k=3, seed=7)
    b = dense_kmeans_labels(feats, k=3, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    sub = dense_kmeans_labels(feats, k=2, seed=0, max_fit_tokens=30)
    assert hungarian_miou(sub, classes, 2, 2) == 1.0


def test_upsample_labels_matches_repeat():
    lab = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(upsample_labels(lab, (6, 12)), np.repeat(np.repeat(lab, 3, 0), 4, 1))


def test_raw_pixel_kmeans_on_two_colours():
    rng = np.random.default_rng(0)
    images, gts = [], []
    for size in [(20, 30), (25, 17)]:
        gt = (rng.random(size) < 0.4).astype(np.int64)
        colour = np.where(gt[..., None] == 1, [200, 30, 30], [20, 40, 220])
        images.append(np.clip(colour + rng.normal(0, 8, size + (3,)), 0, 255).astype(np.uint8))
        gts.append(gt)
    maps = raw_pixel_kmeans_labels(images, k=2, seed=0, max_samples=100)  # fit on 100 of 1025 pixels
    assert [m.shape for m in maps] == [g.shape for g in gts]
    assert hungarian_miou(maps, gts, 2, 2) == 1.0


def test_dense_user_errors():
    feats, _ = two_direction_features(n_images=2)
    with pytest.raises(UserError, match="k=100"):
        dense_kmeans_labels(feats, k=100, seed=0)
    with pytest.raises(UserError, match="same D"):
        dense_kmeans_labels([feats[0], feats[1][..., :3]], k=2, seed=0)
    with pytest.raises(UserError, match="algorithm"):
        dense_kmeans_labels(feats, k=2, seed=0, algorithm="spectral")
