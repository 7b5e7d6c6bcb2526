"""unseg.filtering: the confidence rule, the fallback and every overlap rule on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest

from unseg.coco import annotation
from unseg.errors import UserError
from unseg.filtering import filter_image, mask_iou, rasterise_semantic, select_confident, suppress_overlaps


def box_mask(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------- selection


def test_strict_and_inclusive_at_exactly_tau():
    scores = np.array([0.95, 0.9, 0.5])
    assert select_confident(scores, 0.9).tolist() == [0]
    assert select_confident(scores, 0.9, inclusive=True).tolist() == [0, 1]


def test_kept_are_ordered_most_confident_first():
    assert select_confident(np.array([0.5, 0.93, 0.97, 0.91]), 0.9).tolist() == [2, 1, 3]


def test_fallback_keeps_the_single_most_confident():
    assert select_confident(np.array([0.3, 0.8, 0.6]), 0.9).tolist() == [1]
    assert select_confident(np.array([0.3, 0.8, 0.8]), 0.9, inclusive=True).tolist() == [1]  # tie: lower index
    assert select_confident(np.array([]), 0.9).tolist() == []


def reference_select(scores, tau, inclusive):
    passed = [i for i, s in enumerate(scores) if (s >= tau if inclusive else s > tau)]
    if not passed and len(scores):
        best = 0
        for i, s in enumerate(scores):
            if s > scores[best]:
                best = i
        passed = [best]
    return sorted(passed, key=lambda i: (-scores[i], i))


@pytest.mark.parametrize("inclusive", [False, True])
def test_select_matches_loop_reference(inclusive):
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = np.round(rng.uniform(0.6, 1.0, rng.integers(0, 7)), 1)  # rounding makes ties and exact-tau hits
        got = select_confident(scores, 0.9, inclusive).tolist()
        assert got == reference_select(scores.tolist(), 0.9, inclusive)


# ---------------------------------------------------------------- rasterisation


def two_overlapping():
    a = box_mask(6, 8, 0, 4, 0, 5)
    b = box_mask(6, 8, 2, 6, 3, 8)
    return np.stack([a, b]), np.array([2, 5]), np.array([0.95, 0.99])


def test_confidence_overlap_more_confident_wins_in_any_order():
    masks, cats, scores = two_overlapping()
    label = rasterise_semantic(masks, cats, scores, "confidence")
    assert label.dtype == np.uint8
    assert label[3, 4] == 6  # overlap -> category 5 (score 0.99) -> 1 + 5
    assert label[0, 0] == 3 and label[5, 7] == 6 and label[5, 0] == 0
    swapped = rasterise_semantic(masks[::-1], cats[::-1], scores[::-1], "confidence")
    assert np.array_equal(label, swapped)


def test_overwrite_later_weaker_mask_wins():
    masks, cats, scores = two_overlapping()
    label = rasterise_semantic(masks, cats, scores, "overwrite")
    assert label[3, 4] == 3  # overlap -> the weaker category 2
    assert label[0, 0] == 3 and label[5, 7] == 6 and label[5, 0] == 0
    assert np.array_equal(label, rasterise_semantic(masks[::-1], cats[::-1], scores[::-1], "overwrite"))


def test_background_and_labels_for_category_zero():
    masks = box_mask(4, 4, 1, 3, 1, 3)[None]
    label = rasterise_semantic(masks, np.array([0]), np.array([0.99]))
    expected = np.zeros((4, 4), np.uint8)
    expected[1:3, 1:3] = 1
    assert np.array_equal(label, expected)
    assert not rasterise_semantic(np.zeros((0, 4, 4), bool), np.zeros(0, int), np.zeros(0)).any()


def reference_paint(masks, cats, scores, overlap):
    """Per-pixel loops: 'confidence' picks the best covering mask; 'overwrite' paints in rank order."""
    n, h, w = masks.shape
    rank = sorted(range(n), key=lambda i: (-scores[i], i))
    label = np.zeros((h, w), np.uint8)
    if overlap == "overwrite":
        for i in rank:
            label[masks[i]] = 1 + cats[i]
        return label
    for y in range(h):
        for x in range(w):
            covering = [i for i in rank if masks[i, y, x]]
            if covering:
                label[y, x] = 1 + cats[covering[0]]
    return label


@pytest.mark.parametrize("overlap", ["confidence", "overwrite"])
def test_rasterise_matches_loop_reference(overlap):
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 6))
        masks = rng.random((n, 7, 9)) < 0.4
        cats = rng.integers(0, 20, n)
        scores = np.round(rng.uniform(0.85, 1.0, n), 2)
        scores[rng.random(n) < 0.3] = 0.9  # ties
        got = rasterise_semantic(masks, cats, scores, overlap)
        assert np.array_equal(got, reference_paint(masks, cats, scores, overlap))


def test_ties_lower_index_wins_under_confidence():
    a, b = box_mask(3, 3, 0, 3, 0, 3), box_mask(3, 3, 0, 3, 0, 3)
    label = rasterise_semantic(np.stack([a, b]), np.array([1, 4]), np.array([0.9, 0.9]), "confidence")
    assert (label == 2).all()


def reference_released(masks, cats, scores):
    """gen_segmentation.py's loop, literally: ``mask_res[mask].any()`` with a uint8 mask (row indexing)."""
    order = sorted(range(len(masks)), key=lambda i: (-scores[i], i))
    mask_res = False
    for j, i in enumerate(order):
        mask = masks[i].astype(np.uint8)
        if mask_res is not False and (mask_res[mask]).any():
            continue
        if j == 0:
            mask_res = np.zeros(mask.shape, np.uint8)
        mask_res[mask == 1] = 1 + cats[i]
    return mask_res


def test_released_overlap_quirk():
    # A labels row 0; B lies elsewhere but has 0-pixels, so row 0 is selected and B is skipped.
    a, b = box_mask(8, 8, 0, 2, 0, 3), box_mask(8, 8, 5, 7, 5, 8)
    masks, cats, scores = np.stack([a, b]), np.array([1, 2]), np.array([0.99, 0.95])
    released = rasterise_semantic(masks, cats, scores, "released")
    assert released[6, 6] == 0 and released[0, 0] == 2
    assert rasterise_semantic(masks, cats, scores, "overwrite")[6, 6] == 3
    # A real overlap away from rows 0-1 is not detected: B overwrites the overlap.
    a, b = box_mask(8, 8, 3, 6, 0, 5), box_mask(8, 8, 4, 8, 2, 8)
    released = rasterise_semantic(np.stack([a, b]), cats, scores, "released")
    assert released[4, 3] == 3


def test_released_matches_literal_reference():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(1, 6))
        masks = np.zeros((n, 8, 8), bool)
        for i in range(n):  # boxes, some touching rows 0-1
            y0, x0 = rng.integers(0, 6, 2)
            masks[i, y0 : y0 + rng.integers(1, 4), x0 : x0 + rng.integers(1, 4)] = True
        cats, scores = rng.integers(0, 10, n), np.round(rng.uniform(0.9, 1.0, n), 2)
        assert np.array_equal(
            rasterise_semantic(masks, cats, scores, "released"), reference_released(masks, cats, scores)
        )


def test_bad_inputs_are_user_errors():
    masks = np.ones((1, 2, 2), bool)
    with pytest.raises(UserError, match="category"):
        rasterise_semantic(masks, np.array([254]), np.array([1.0]))
    with pytest.raises(UserError, match="overlap"):
        rasterise_semantic(masks, np.array([0]), np.array([1.0]), "biggest")


# ---------------------------------------------------------------- one image


def predictions(h, w, items):
    return [annotation(i, 7, cat, box_mask(h, w, *box), score=s) for i, (box, cat, s) in enumerate(items)]


def test_filter_image_threshold_overlap_and_fallback():
    h, w = 10, 12
    preds = predictions(
        h,
        w,
        [((0, 5, 0, 6), 3, 0.92), ((3, 8, 4, 10), 1, 0.97), ((6, 10, 0, 4), 0, 0.9), ((0, 10, 10, 12), 8, 0.4)],
    )
    label, kept = filter_image(preds, h, w, tau=0.9, inclusive=False, overlap="confidence")
    assert [p["score"] for p in kept] == [0.97, 0.92]
    assert label[4, 5] == 2  # overlap of cat 3 (0.92) and cat 1 (0.97): cat 1 wins -> 2
    assert label[0, 0] == 4 and label[8, 1] == 0 and label[5, 11] == 0
    label_incl, kept_incl = filter_image(preds, h, w, tau=0.9, inclusive=True, overlap="overwrite")
    assert len(kept_incl) == 3 and label_incl[8, 1] == 1 and label_incl[4, 5] == 4
    label_fb, kept_fb = filter_image(preds[3:], h, w, tau=0.9)
    assert len(kept_fb) == 1 and (label_fb[:, 10:] == 9).all() and not label_fb[:, :10].any()


def test_filter_image_empty_and_size_mismatch():
    label, kept = filter_image([], 4, 5, tau=0.9)
    assert label.shape == (4, 5) and not label.any() and kept == []
    with pytest.raises(UserError, match="mask"):
        filter_image(predictions(4, 5, [((0, 2, 0, 2), 0, 0.99)]), 5, 5, tau=0.9)


def test_uncertain_masks_are_ignored_not_background():
    h, w = 10, 12
    preds = predictions(
        h,
        w,
        [
            ((0, 4, 0, 4), 1, 0.95),  # kept
            ((2, 6, 2, 8), 2, 0.7),  # dropped, uncertain: its pixels outside the kept mask are ignored
            ((7, 10, 0, 3), 0, 0.3),  # dropped below uncertain_score: background
        ],
    )
    plain, kept = filter_image(preds, h, w, tau=0.9)
    label, kept_u = filter_image(preds, h, w, tau=0.9, uncertain_score=0.5)
    assert [p["score"] for p in kept_u] == [p["score"] for p in kept] == [0.95]
    expected = plain.copy()
    expected[box_mask(h, w, 2, 6, 2, 8) & ~box_mask(h, w, 0, 4, 0, 4)] = 255
    np.testing.assert_array_equal(label, expected)
    assert (label[0:4, 0:4] == 2).all() and (label[7:10, 0:3] == 0).all()


# ---------------------------------------------------------------- mask-level overlap (filter.overlap_iou)


def test_mask_iou_by_hand():
    a = box_mask(8, 8, 0, 4, 0, 4)  # 16 px
    b = box_mask(8, 8, 2, 6, 0, 4)  # 16 px, 8 shared -> 8 / 24
    empty = np.zeros((8, 8), bool)
    iou = mask_iou(np.stack([a, b, empty, empty]))
    assert iou[0, 1] == iou[1, 0] == 8 / 24
    assert iou[0, 0] == 1.0 and iou[0, 2] == 0.0 and iou[2, 3] == 0.0  # two empty masks: 0, not nan


def test_suppress_drops_the_weaker_copy_and_keeps_neighbours():
    h = w = 12
    ranked = np.stack(
        [
            box_mask(h, w, 0, 6, 0, 6),  # A: 36 px
            box_mask(h, w, 0, 6, 0, 7),  # A's copy: IoU 36/42 = 0.86 -> dropped
            box_mask(h, w, 6, 12, 6, 12),  # disjoint -> kept
            box_mask(h, w, 3, 9, 0, 6),  # half on A: IoU 18/54 = 0.33 -> kept at 0.5, dropped at 0.3
        ]
    )
    assert suppress_overlaps(ranked, 0.5).tolist() == [0, 2, 3]
    assert suppress_overlaps(ranked, 0.3).tolist() == [0, 2]
    assert suppress_overlaps(ranked, 1.0).tolist() == [0, 1, 2, 3]


def test_suppress_compares_with_kept_masks_only():
    h, w = 4, 20
    a = box_mask(h, w, 0, 4, 0, 10)
    b = box_mask(h, w, 0, 4, 4, 14)  # IoU(a, b) = 24/56 = 0.43
    c = box_mask(h, w, 0, 4, 8, 18)  # IoU(b, c) = 0.43, IoU(a, c) = 8/72 = 0.11
    assert suppress_overlaps(np.stack([a, b, c]), 0.4).tolist() == [0, 2]  # b dropped, so c survives


def test_filter_image_overlap_iou_drops_a_duplicate_under_another_category():
    h, w = 10, 12
    preds = predictions(
        h,
        w,
        [
            ((2, 7, 2, 7), 1, 0.95),  # the object
            ((1, 8, 1, 8), 3, 0.80),  # the same object, another cluster, a wider mask: IoU 25/49 = 0.51
            ((0, 3, 9, 12), 2, 0.60),  # another object
        ],
    )
    pixel, kept_pixel = filter_image(preds, h, w, tau=0.5)
    assert len(kept_pixel) == 3 and pixel[1, 1] == 4  # per pixel: the copy's rim is painted as a second object
    label, kept = filter_image(preds, h, w, tau=0.5, overlap_iou=0.5, uncertain_score=0.5)
    assert [p["score"] for p in kept] == [0.95, 0.60]
    expected = np.zeros((h, w), np.uint8)
    expected[2:7, 2:7] = 2
    expected[0:3, 9:12] = 3
    np.testing.assert_array_equal(label, expected)  # the rim is background, not ignored: a copy is not unsure
    assert len(filter_image(preds, h, w, tau=0.5, overlap_iou=0.6)[1]) == 3
