"""Class-agnostic mask AP through COCOeval: perfect predictions, the single vs multi settings, edge cases."""

import numpy as np
import pytest

from unseg.coco import annotation
from unseg.errors import UserError
from unseg.evaluation.instances import class_agnostic_mask_ap, select_single_object
from unseg.matching import box_iou_xyxy

H, W = 40, 50


def box_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


OBJECTS = {  # image id -> list of (category, mask)
    1: [(3, box_mask(2, 2, 20, 20)), (7, box_mask(25, 5, 45, 35))],
    2: [(5, box_mask(10, 10, 30, 30))],
}


def gt_json(extra_empty_image: bool = False) -> dict:
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in OBJECTS]
    if extra_empty_image:
        images.append({"id": 3, "height": H, "width": W, "file_name": "3.png"})
    anns, k = [], 1
    for img, objs in OBJECTS.items():
        for cat, m in objs:
            anns.append(annotation(k, img, cat, m))
            k += 1
    cats = [{"id": c, "name": str(c)} for c in (3, 5, 7)]
    return {"images": images, "annotations": anns, "categories": cats}


def result(img, mask, score, cat=0):
    return annotation(0, img, cat, mask, score=score)


def test_perfect_predictions_give_100_whatever_the_categories():
    res = [result(img, m, 0.9 - 0.1 * k, cat=99) for img, objs in OBJECTS.items() for k, (_, m) in enumerate(objs)]
    for mode in ("multi", "single"):
        assert class_agnostic_mask_ap(gt_json(), res, mode=mode) == {
            "AP": 100.0,
            "AP50": 100.0,
            "AP75": 100.0,
        }


def test_low_scored_false_positive_after_all_hits_keeps_ap_100():
    res = [result(img, m, 0.9) for img, objs in OBJECTS.items() for _, m in objs]
    res.append(result(2, box_mask(40, 0, 50, 8), 0.1))
    assert class_agnostic_mask_ap(gt_json(), res)["AP"] == 100.0


def test_single_and_multi_differ():
    # One prediction per image, each exact on one object; image 1 has a second, unpredicted object.
    res = [result(1, OBJECTS[1][1][1], 0.8), result(2, OBJECTS[2][0][1], 0.9)]
    multi = class_agnostic_mask_ap(gt_json(), res, mode="multi")
    single = class_agnostic_mask_ap(gt_json(), res, mode="single")
    # Multi: precision 1 up to recall 2/3, then nothing: 67 of COCO's 101 recall points (0.00..0.66).
    assert multi["AP50"] == pytest.approx(100 * 67 / 101)
    assert multi["AP"] == pytest.approx(100 * 67 / 101)
    # Single: the most confident prediction is scored against the GT object it overlaps most.
    assert single == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}


def test_single_keeps_only_most_confident_prediction_and_max_box_iou_object():
    from unseg.evaluation.instances import _agnostic_gt, _agnostic_results, _image_sizes

    gt = _agnostic_gt(gt_json())
    res = _agnostic_results(
        [
            result(1, box_mask(3, 3, 19, 21), 0.5),  # overlaps object A of image 1
            result(1, box_mask(26, 6, 44, 34), 0.95),  # overlaps object B: most confident
            result(2, box_mask(0, 0, 5, 5), 0.3),
        ],
        _image_sizes(gt_json()),
    )
    gt_sel, res_sel = select_single_object(gt, res)
    assert [r["score"] for r in res_sel] == [0.95, 0.3]
    assert [a["bbox"] for a in gt_sel["annotations"]] == [[25.0, 5.0, 20.0, 30.0], [10.0, 10.0, 20.0, 20.0]]


def test_box_iou_by_hand():
    ious = box_iou_xyxy(np.array([0, 0, 10, 10.0]), np.array([[0, 0, 10, 10.0], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(ious, [1.0, 50 / 150, 0.0], atol=1e-6)


def test_images_without_predictions_or_gt_and_empty_results():
    res = [result(img, m, 0.9) for img, objs in OBJECTS.items() for _, m in objs]
    assert class_agnostic_mask_ap(gt_json(extra_empty_image=True), res)["AP"] == 100.0
    assert class_agnostic_mask_ap(gt_json(), [])["AP"] == 0.0
    no_gt = {**gt_json(), "annotations": []}
    assert class_agnostic_mask_ap(no_gt, res) == {"AP": None, "AP50": None, "AP75": None}


def test_polygon_ground_truth():
    gt = gt_json()
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        del ann["area"]
    res = [result(img, m, 0.9) for img, objs in OBJECTS.items() for _, m in objs]
    # Polygon rasterisation differs from the pixel boxes only along edges: IoU stays above 0.75.
    out = class_agnostic_mask_ap(gt, res)
    assert out["AP50"] == 100.0 and out["AP75"] == 100.0


def test_cocoeval_is_silent_and_errors_name_the_culprit(capsys):
    class_agnostic_mask_ap(gt_json(), [result(1, OBJECTS[1][0][1], 0.9)])
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="image_id 42"):
        class_agnostic_mask_ap(gt_json(), [result(42, OBJECTS[1][0][1], 0.9)])
    with pytest.raises(UserError, match="mode"):
        class_agnostic_mask_ap(gt_json(), [], mode="both")


def test_single_keeps_a_prediction_on_an_image_without_gt_as_false_positive():
    res = [
        result(1, OBJECTS[1][1][1], 0.8),
        result(2, OBJECTS[2][0][1], 0.9),
        result(3, box_mask(0, 0, 10, 10), 0.95),  # image 3 has no object
    ]
    # Ranked FP, TP, TP over 2 GT objects: interpolated precision is 2/3 at every recall level.
    out = class_agnostic_mask_ap(gt_json(extra_empty_image=True), res, mode="single")
    assert out["AP50"] == pytest.approx(100 * 2 / 3)
