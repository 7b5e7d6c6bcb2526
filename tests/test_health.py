"""Label-free health figures on hand-made masks, clusters, scores and label maps."""

import numpy as np
import pytest

from unseg.evaluation.health import cluster_sizes, label_fractions, mask_health, prediction_health


def test_mask_health_area_border_and_empty():
    inner = np.zeros((4, 4), bool)
    inner[1:3, 1:3] = True  # 4 of 16 tokens, away from the border
    border = np.zeros((4, 4), bool)
    border[0, :2] = True  # 2 of 16, on the top row
    h = mask_health([inner, border, np.zeros((4, 4), bool)])
    assert h["images"] == 3
    assert h["mask_area_fraction"] == pytest.approx((4 / 16 + 2 / 16) / 2)
    assert h["touching_border_fraction"] == pytest.approx(1 / 2)
    assert h["empty_fraction"] == pytest.approx(1 / 3)


def test_cluster_sizes_and_largest_share():
    c = cluster_sizes([1, 1, 1, 2, 3, 3], k=4)
    assert c["sizes"] == [3, 1, 2, 0] and c["largest_share"] == pytest.approx(0.5)


def test_prediction_health_counts_and_histogram():
    p = prediction_health([[0.95, 0.4, 0.55], [], [0.05]], threshold=0.5)
    assert p["per_image"] == pytest.approx(4 / 3) and p["confident_per_image"] == pytest.approx(2 / 3)
    assert p["images_without_prediction"] == 1
    assert p["score_histogram"] == [1, 0, 0, 0, 1, 1, 0, 0, 0, 1]


def test_label_fractions_with_ignored_pixels():
    a = np.array([[0, 0], [1, 255]], np.uint8)
    b = np.array([[2, 2], [2, 2]], np.uint8)
    f = label_fractions([a, b], n_labels=3)
    assert f["fractions"] == [0.25, 0.125, 0.5] and f["ignored"] == pytest.approx(1 / 8)
