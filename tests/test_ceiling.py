"""The supervised ceiling's inputs: ground truth in the pseudo-labels' format."""

import numpy as np

from unseg import coco
from unseg.ceiling import components_as_instances, ground_truth_instances, ground_truth_semantic
from unseg.data.index import DatasetIndex, prepare_generated


def test_components_of_each_class_become_instances():
    label = np.zeros((6, 8), np.uint8)
    label[0:2, 0:2] = 1  # class 1, two separate components
    label[4:6, 6:8] = 1
    label[2:5, 2:5] = 3  # class 3, one component of 9 px
    label[0, 7] = 2  # class 2, a single pixel: below min_area
    label[5, 0] = 255  # ignore
    anns = components_as_instances(label, image_id=7, min_area=2)
    got = sorted((a["category_id"], int(a["area"])) for a in anns)
    assert got == [(1, 4), (1, 4), (3, 9)]
    assert all(a["image_id"] == 7 for a in anns) and [a["id"] for a in anns] == [1, 2, 3]
    masks = [coco.decode_rle(a["segmentation"]) for a in anns if a["category_id"] == 3]
    assert np.array_equal(masks[0], label == 3)


def test_ground_truth_of_the_generated_training_split(tmp_path):
    index = prepare_generated(tmp_path, 6, 2, 3, 2, 48, 64, seed=0)
    train = index.split("train")
    gt = ground_truth_instances(index, train)
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert {im["id"] for im in gt["images"]} == {e.id for e in train}
    expected = [a for a in coco.read_json(index.instances)["annotations"] if a["image_id"] in {e.id for e in train}]
    assert len(gt["annotations"]) == len(expected) and len({a["id"] for a in gt["annotations"]}) == len(expected)
    ids, labels = ground_truth_semantic(index, train)
    assert ids.tolist() == [e.id for e in train]
    for e, lab in zip(train, labels, strict=True):
        assert np.array_equal(lab, index.read_semantic(e))


def test_a_semantic_only_dataset_gets_component_instances(tmp_path):
    index = prepare_generated(tmp_path, 4, 0, 2, 2, 48, 64, seed=1)
    semantic_only = DatasetIndex(index.name, index.images, index.classes)  # no instances json
    gt = ground_truth_instances(semantic_only, semantic_only.images)
    assert gt["annotations"] and {a["category_id"] for a in gt["annotations"]} <= {1, 2}
    for a in gt["annotations"]:
        e = semantic_only.by_id[a["image_id"]]
        mask = coco.decode_rle(a["segmentation"])
        assert (semantic_only.read_semantic(e)[mask] == a["category_id"]).all()
