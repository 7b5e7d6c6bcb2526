"""unseg.distill.maskrcnn: the COCO dataset, deterministic augmentation, freezing, and a tiny overfit run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.coco import decode_rle, encode_rle, mask_bbox, read_json, write_json
from unseg.distill.maskrcnn import (
    CocoInstanceDataset,
    boxes_from_masks,
    build_maskrcnn,
    load_image,
    maskrcnn_train_step,
    predict_instances,
)
from unseg.errors import UserError
from unseg.models.resnet import create_resnet

COLOURS = {3: (230, 30, 30), 7: (30, 30, 230)}  # category id -> object colour
TINY = dict(
    backbone="resnet18",
    min_size=64,
    max_size=96,
    anchor_sizes=(8, 16, 24, 32, 48),
    representation_size=64,
    mask_head_channels=(32,),
    fpn_channels=64,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=50,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: with two, a step slowed from 0.2 s to 7 s whenever other processes shared the
    two cores (OpenMP threads waiting on each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_coco(tmp_path):
    """Three annotated images (a red rectangle of category 3, a blue disc of category 7) and one empty."""
    rng = np.random.default_rng(0)
    h, w = 64, 80
    yy, xx = np.mgrid[:h, :w]
    layouts = [((8, 30, 6, 36), (40, 20, 12)), ((30, 58, 40, 74), (18, 22, 11)), ((4, 24, 44, 76), (44, 22, 13))]
    images, anns, paths = [], [], {}
    for image_id, (rect, disc) in enumerate(layouts, start=1):
        img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        red = np.zeros((h, w), bool)
        red[rect[0] : rect[1], rect[2] : rect[3]] = True
        blue = (yy - disc[0]) ** 2 + (xx - disc[1]) ** 2 < disc[2] ** 2
        red &= ~blue
        for cat, mask in ((3, red), (7, blue)):
            img[mask] = COLOURS[cat]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": encode_rle(mask),
                    "area": float(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "iscrowd": 0,
                }
            )
        paths[image_id] = tmp_path / f"{image_id}.png"
        Image.fromarray(img).save(paths[image_id])
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
    paths[4] = tmp_path / "4.png"
    Image.fromarray(rng.integers(90, 140, (h, w, 3)).astype(np.uint8)).save(paths[4])
    images.append({"id": 4, "height": h, "width": w, "file_name": "4.png"})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
    write_json(coco, tmp_path / "pseudo.json")
    return tmp_path / "pseudo.json", paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_coco(tmp_path_factory.mktemp("coco"))


def test_dataset_targets(data):
    json_path, paths = data
    ds = CocoInstanceDataset(json_path, paths)
    assert len(ds) == 3 and ds.category_ids == [3, 7] and ds.num_classes == 2
    assert len(CocoInstanceDataset(json_path, paths, skip_empty=False)) == 4
    image, target = ds.load(0)
    assert image.shape == (3, 64, 80) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [1, 2] and target["masks"].dtype == torch.uint8
    assert target["image_id"] == 1
    for mask, box in zip(target["masks"].numpy().astype(bool), target["boxes"].tolist(), strict=True):
        x, y, w, h = mask_bbox(mask)
        assert box == [x, y, x + w, y + h]


def test_empty_image_gives_empty_target(data):
    json_path, paths = data
    ds = CocoInstanceDataset(json_path, paths, skip_empty=False)
    _, target = ds.load(3, seed=1)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0


def object_contrast(image: torch.Tensor, target: dict) -> bool:
    """Each instance's pixels carry its colour: the mask moved with the image (resize and flip)."""
    for mask, label in zip(target["masks"].bool(), target["labels"].tolist(), strict=True):
        channel = 0 if label == 1 else 2
        if not float(image[channel][mask].mean()) > float(image[channel][~mask].mean()) + 0.2:
            return False
    return True


def test_augmentation_is_deterministic_and_consistent(data):
    json_path, paths = data
    ds = CocoInstanceDataset(json_path, paths, train_sizes=(48, 64, 96), max_size=200)
    sizes = set()
    for seed in range(12):
        a_img, a_t = ds.load(1, seed)
        b_img, b_t = ds.load(1, seed)
        assert torch.equal(a_img, b_img) and torch.equal(a_t["masks"], b_t["masks"])
        assert object_contrast(a_img, a_t)
        sizes.add(min(a_img.shape[-2:]))
    assert sizes <= {48, 64, 96} and len(sizes) > 1


def test_flip_moves_image_and_masks_together(data):
    json_path, paths = data
    ds = CocoInstanceDataset(json_path, paths, train_sizes=(64,), max_size=200)  # native size: no resize
    plain_img, plain_t = ds.load(1)
    flipped = []
    for seed in range(12):
        img, t = ds.load(1, seed)
        is_flipped = torch.equal(img, plain_img.flip(-1))
        assert is_flipped or torch.equal(img, plain_img)
        assert torch.equal(t["masks"], plain_t["masks"].flip(-1) if is_flipped else plain_t["masks"])
        flipped.append(is_flipped)
    assert any(flipped) and not all(flipped)


def test_range_sampling_stays_in_range(data):
    json_path, paths = data
    ds = CocoInstanceDataset(json_path, paths, train_sizes=(40, 70), size_sampling="range", max_size=500)
    shorter = {min(ds.load(0, s)[0].shape[-2:]) for s in range(20)}
    assert min(shorter) >= 40 and max(shorter) <= 70 and len(shorter) > 3
    with pytest.raises(UserError):
        CocoInstanceDataset(json_path, paths, train_sizes=(40, 50, 60), size_sampling="range")


def test_missing_image_path_is_user_error(data):
    json_path, paths = data
    with pytest.raises(UserError, match="image ids"):
        CocoInstanceDataset(json_path, {k: v for k, v in paths.items() if k != 2})


def test_boxes_from_masks_matches_loop():
    rng = np.random.default_rng(3)
    masks = rng.random((6, 9, 11)) < 0.05
    masks[0] = False
    boxes = boxes_from_masks(torch.from_numpy(masks))
    for m, box in zip(masks[1:], boxes[1:].tolist(), strict=True):
        ys, xs = np.nonzero(m)
        if len(xs):
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_freezing_first_two_stages(tmp_path):
    torch.manual_seed(1)
    src = create_resnet("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_maskrcnn(2, trainable_layers=3, backbone_weights=str(tmp_path / "r18.pth"), **TINY)
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert type(body.layer1[0].bn1).__name__ == "FrozenBatchNorm2d"
    assert type(body.layer2[0].bn1).__name__ == "BatchNorm2d"
    # the frozen BN keeps the checkpoint's statistics
    assert torch.equal(body.bn1.running_var, src.bn1.running_var)


def test_model_resizes_only_at_test_time():
    model = build_maskrcnn(2, **TINY)
    images = [torch.rand(3, 50, 70)]
    model.train()
    assert model.transform(images)[0].image_sizes == [(50, 70)]  # the dataset did the multi-scale resize
    model.eval()
    assert min(model.transform(images)[0].image_sizes[0]) == 64  # min_size


def test_overfit_tiny_dataset_and_predict(data):
    json_path, paths = data
    torch.manual_seed(0)
    ds = CocoInstanceDataset(json_path, paths, train_sizes=(56, 64, 72), max_size=96)
    model = build_maskrcnn(ds.num_classes, **TINY)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    device = torch.device("cpu")
    losses = []
    for step in range(36):
        images, targets = ds.batch([0, 1, 2], step, seed=0)
        losses.append(maskrcnn_train_step(model, opt, images, targets, device, clip_grad_norm=10.0)["loss"])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:6])

    items = [(image_id, load_image(paths[image_id])) for image_id in (1, 2, 4)]
    results = predict_instances(model, items, device, category_ids=ds.category_ids, batch_size=2)
    assert results and len({r["id"] for r in results}) == len(results)
    for r in results:
        assert r["image_id"] in (1, 2, 4) and r["category_id"] in (3, 7)
        mask = decode_rle(r["segmentation"])
        assert mask.shape == (64, 80) and mask.any()
        assert r["bbox"] == mask_bbox(mask) and 0.0 <= r["score"] <= 1.0
    for image_id in (1, 2, 4):
        scores = [r["score"] for r in results if r["image_id"] == image_id]
        assert scores == sorted(scores, reverse=True)
    # the best detection of image 1 overlaps a ground-truth object of its category
    best = max((r for r in results if r["image_id"] == 1), key=lambda r: r["score"])
    gt = [a for a in read_json(json_path)["annotations"] if a["image_id"] == 1]
    ious = []
    for a in gt:
        g, p = decode_rle(a["segmentation"]), decode_rle(best["segmentation"])
        ious.append((g & p).sum() / (g | p).sum() if a["category_id"] == best["category_id"] else 0.0)
    assert max(ious) > 0.3


def test_c4_layout_trains_and_predicts(data):
    json_path, paths = data
    torch.manual_seed(0)
    ds = CocoInstanceDataset(json_path, paths, train_sizes=(64,), max_size=96)
    c4 = {k: v for k, v in TINY.items() if k not in ("representation_size", "mask_head_channels", "fpn_channels")}
    model = build_maskrcnn(ds.num_classes, fpn=False, **c4)
    assert model.roi_heads.mask_head is model.roi_heads.box_head[0]  # res5 shared by box and mask heads
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, targets = ds.batch([0, 1], 0, seed=0)
    out = maskrcnn_train_step(model, opt, images, targets, torch.device("cpu"))
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(out) and np.isfinite(out["loss"])
    results = predict_instances(model, [(1, load_image(paths[1]))], torch.device("cpu"))
    for r in results:
        assert decode_rle(r["segmentation"]).shape == (64, 80) and r["category_id"] in (0, 1)


def test_proposal_params_reach_the_rpn_and_only_train_proposals_retrain(tmp_path):
    import dataclasses

    from unseg.distill.params import torchvision_maskrcnn, training_digest
    from unseg.params import parse_params

    d = dataclasses.replace(parse_params({}).distill, train_proposals=300, test_proposals=40, backbone_weights=None)
    model = torchvision_maskrcnn(d, 3)
    assert model.rpn._pre_nms_top_n == {"training": 300, "testing": 40}
    assert model.rpn._post_nms_top_n == {"training": 300, "testing": 40}
    labels = tmp_path / "instances.json"
    labels.write_text("{}")
    digest = training_digest(d, labels, {1, 2})
    assert training_digest(dataclasses.replace(d, test_proposals=1000), labels, {1, 2}) == digest
    assert training_digest(dataclasses.replace(d, train_proposals=2000), labels, {1, 2}) != digest
