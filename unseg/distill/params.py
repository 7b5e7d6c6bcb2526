"""The ``distill`` params section as the torchvision backend takes it (the Mask R-CNN built by field name;
detectron2's config is :mod:`unseg.distill.detectron2_config`), and the digest of what training computes
(the resumable checkpoints are guarded by it)."""

from __future__ import annotations

from pathlib import Path

import torch

from unseg.distill.maskrcnn import build_maskrcnn
from unseg.train import harness as H

# params that change predictions only, not training: changing them must not restart training
PREDICT_ONLY = {
    "test_size",
    "test_proposals",
    "detections_per_image",
    "score_threshold",
    "device",
    "workers",
    "ckpt_every",
}


def training_digest(d, pseudo_labels: Path, train_ids: set[int], weights: str | None = None) -> str:
    """Digest of the training params, the pseudo-label file's bytes, the training image ids and, when the
    backbone starts from a checkpoint (``weights``), that file's bytes."""
    trained = {k: v for k, v in vars(d).items() if k not in PREDICT_ONLY}
    return H.params_digest(trained, H.file_digest(pseudo_labels), sorted(train_ids), *H.init_digest(weights))


def split_instances(pseudo: dict, image_ids: set[int]) -> dict:
    """The COCO instances restricted to ``image_ids`` (categories kept)."""
    return {
        "images": [im for im in pseudo["images"] if im["id"] in image_ids],
        "annotations": [a for a in pseudo["annotations"] if a["image_id"] in image_ids],
        "categories": pseudo["categories"],
    }


def maskrcnn_architecture(d) -> dict:
    """The :func:`unseg.distill.maskrcnn.build_maskrcnn` keyword arguments of the ``distill`` section ``d`` (what
    a model bundle stores to rebuild the network)."""
    return {
        "backbone": d.backbone,
        "trainable_layers": d.trainable_layers,
        "min_size": d.test_size,
        "max_size": d.max_size,
        "fpn": d.fpn,
        "anchor_sizes": list(d.anchor_sizes),
        "representation_size": d.representation_size,
        "mask_head_channels": list(d.mask_head_channels),
        "fpn_channels": d.fpn_channels,
        "box_batch_size_per_image": d.box_batch_size_per_image,
        "rpn_batch_size_per_image": d.rpn_batch_size_per_image,
        "box_detections_per_img": d.detections_per_image,
        "rpn_pre_nms_top_n_train": d.train_proposals,
        "rpn_post_nms_top_n_train": d.train_proposals,
        "rpn_pre_nms_top_n_test": d.test_proposals,
        "rpn_post_nms_top_n_test": d.test_proposals,
    }


def torchvision_maskrcnn(d, k: int) -> torch.nn.Module:
    """The torchvision Mask R-CNN of the ``distill`` section ``d`` for ``k`` pseudo-label categories."""
    return build_maskrcnn(k, backbone_weights=d.backbone_weights, **maskrcnn_architecture(d))
