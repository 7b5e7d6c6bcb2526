"""Dataset-level mIoU, Hungarian / majority mappings and foreground IoU on hand-made label maps."""

import itertools

import numpy as np
import pytest

from unseg.errors import UserError
from unseg.evaluation.metrics import ForegroundIoU
from unseg.matching import (
    ConfusionAccumulator,
    evaluate_clusters,
    hungarian_mapping,
    identity_mapping,
    majority_mapping,
    relabel,
    scores,
)


def maps_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (1, n) prediction row and GT row realising exactly the confusion counts ``conf[p, c]``."""
    pred, gt = [], []
    for p, c in itertools.product(range(conf.shape[0]), range(conf.shape[1])):
        pred += [p] * int(conf[p, c])
        gt += [c] * int(conf[p, c])
    return np.array([pred]), np.array([gt])


def reference_iou(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int = 255) -> list:
    """Straight per-class loop over pixels; None for classes absent from both."""
    out = []
    for c in range(n):
        valid = gt != ignore
        tp = np.sum((pred == c) & (gt == c) & valid)
        fp = np.sum((pred == c) & (gt != c) & valid)
        fn = np.sum((pred != c) & (gt == c) & valid)
        out.append(None if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return out


def test_accumulator_equals_loop_count():
    rng = np.random.default_rng(0)
    acc = ConfusionAccumulator(4, 3)
    ref = np.zeros((4, 3), dtype=np.int64)
    for _ in range(3):
        pred = rng.integers(0, 4, size=(7, 9))
        gt = rng.integers(0, 3, size=(7, 9))
        gt[rng.random((7, 9)) < 0.2] = 255
        acc.update(pred, gt)
        for p, g in zip(pred.ravel(), gt.ravel(), strict=True):
            if g != 255:
                ref[p, g] += 1
    np.testing.assert_array_equal(acc.matrix, ref)


def test_permuted_labels_give_miou_one():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, size=(20, 30))
    perm = np.array([3, 0, 4, 1, 2])
    acc = ConfusionAccumulator(5, 5)
    acc.update(perm[gt], gt)
    mapping = hungarian_mapping(acc.matrix)
    np.testing.assert_array_equal(mapping[perm], np.arange(5))
    res = scores(acc.matrix, mapping)
    assert res["miou"] == 1.0 and res["pixel_accuracy"] == 1.0
    np.testing.assert_array_equal(relabel(perm[gt], mapping), gt)


def test_hungarian_on_hand_made_confusion():
    # Greedy per-row choice would send both cluster 0 and 1 to class 0; the best one-to-one
    # assignment is 0->1, 1->0, 2->2 with 5 + 7 + 4 = 16 matched pixels (diagonal: 11).
    conf = np.array([[6, 5, 0], [7, 1, 0], [0, 0, 4]])
    pred, gt = maps_from_confusion(conf)
    acc = ConfusionAccumulator(3, 3)
    acc.update(pred, gt)
    np.testing.assert_array_equal(acc.matrix, conf)
    mapping = hungarian_mapping(acc.matrix)
    best = max(itertools.permutations(range(3)), key=lambda m: sum(conf[p, m[p]] for p in range(3)))
    np.testing.assert_array_equal(mapping, best)
    np.testing.assert_array_equal(mapping, [1, 0, 2])
    res = scores(acc.matrix, mapping)
    # class 0: TP 7, FP 1 (row 1), FN 6 (row 0) -> 7/14; class 1: TP 5, FP 6, FN 1 -> 5/12; class 2: 4/4
    expected = [7 / 14, 5 / 12, 1.0]
    np.testing.assert_allclose(res["per_class_iou"], expected)
    assert res["miou"] == pytest.approx(np.mean(expected))
    assert res["pixel_accuracy"] == pytest.approx(16 / 23)
    np.testing.assert_allclose(res["per_class_iou"], reference_iou(relabel(pred, mapping), gt, 3))


def test_majority_and_hungarian_differ_when_over_clustered():
    conf = np.array([[5, 0], [3, 0], [0, 4], [0, 2]])
    res = evaluate_clusters(conf)
    assert res["hungarian"]["mapping"] == [0, -1, 1, -1]
    assert res["majority"]["mapping"] == [0, 0, 1, 1]
    assert res["majority"]["miou"] == 1.0
    # Unmatched clusters' pixels are FN of their class, FP of none: 5/8 and 4/6.
    np.testing.assert_allclose(res["hungarian"]["per_class_iou"], [5 / 8, 4 / 6])
    assert res["hungarian"]["pixel_accuracy"] == pytest.approx(9 / 14)


def test_dataset_level_differs_from_per_image_average():
    images = [
        (np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, 1]])),  # class 1 missed
        (np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, 0]])),  # all correct, class 1 absent
    ]
    acc = ConfusionAccumulator(2, 2)
    per_image = []
    for pred, gt in images:
        acc.update(pred, gt)
        one = ConfusionAccumulator(2, 2)
        one.update(pred, gt)
        per_image.append(scores(one.matrix, identity_mapping(2, 2))["miou"])
    dataset = scores(acc.matrix, identity_mapping(2, 2))
    # Hand count over both images: class 0 TP 7, FP 1 -> 7/8; class 1 TP 0, FN 1 -> 0.
    assert dataset["per_class_iou"] == [7 / 8, 0.0]
    assert dataset["miou"] == pytest.approx(7 / 16)
    assert per_image == [pytest.approx(3 / 8), 1.0]
    assert np.mean(per_image) != pytest.approx(dataset["miou"])


def test_ignore_index_pixels_do_not_count():
    gt = np.array([[0, 1, 255], [255, 1, 0]])
    good = np.array([[0, 1, 1], [0, 1, 0]])
    acc = ConfusionAccumulator(2, 2)
    acc.update(good, gt)
    assert acc.matrix.sum() == 4
    assert scores(acc.matrix, identity_mapping(2, 2))["miou"] == 1.0


def test_absent_class_is_null_or_zero():
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    res = scores(conf, identity_mapping(3, 3))
    assert res["per_class_iou"][2] is None and res["n_classes"] == 2
    assert res["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    zero = scores(conf, identity_mapping(3, 3), absent="zero")
    assert zero["miou"] == pytest.approx((3 / 4 + 2 / 3) / 3)


def test_majority_leaves_empty_cluster_unmatched():
    np.testing.assert_array_equal(majority_mapping(np.array([[0, 0], [1, 4]])), [-1, 1])


def test_user_errors():
    acc = ConfusionAccumulator(2, 2)
    with pytest.raises(UserError, match="predicted label 2"):
        acc.update(np.array([[2]]), np.array([[0]]))
    with pytest.raises(UserError, match="ground-truth label 7"):
        acc.update(np.array([[0]]), np.array([[7]]))
    with pytest.raises(UserError, match="shape"):
        acc.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(UserError, match="mapping"):
        scores(np.eye(2, dtype=int), np.array([0]))


def test_foreground_iou_hand_count():
    fg = ForegroundIoU(background_index=0, ignore_index=255)
    gt1 = np.array([[0, 3, 3], [0, 3, 255]])
    pr1 = np.array([[1, 1, 0], [0, 1, 1]], bool)  # ignore pixel predicted fg: dropped
    gt2 = np.array([[2, 0], [0, 0]])
    pr2 = np.array([[0, 0], [0, 1]], bool)
    fg.update(pr1, gt1)
    fg.update(pr2, gt2)
    # image 1: P = {(0,0),(0,1),(1,1)}, G = {(0,1),(0,2),(1,1)}: ∩ 2, ∪ 4
    # image 2: P = {(1,1)}, G = {(0,0)}: ∩ 0, ∪ 2
    res = fg.result()
    assert res["iou"] == pytest.approx(2 / 6)
    assert res["precision"] == pytest.approx(2 / 4)
    assert res["recall"] == pytest.approx(2 / 4)


def test_object_precision_counts_object_pixels_whose_matched_class_is_right():
    from unseg.evaluation.report import object_precision

    # rows: predicted ids (0 background, 1..2 objects); columns: GT classes
    conf = np.array([[50, 5, 5], [2, 30, 8], [0, 10, 0]])
    # id 1 -> class 1 (30 right of 40), id 2 -> class 2 (0 right of 10)
    assert object_precision(conf, [0, 1, 2]) == pytest.approx(30 / 50)
    assert object_precision(conf, [0, 1, -1]) == pytest.approx(30 / 50)  # unmatched: wrong
    assert object_precision(np.array([[5, 1], [0, 0]]), [0, -1]) is None
