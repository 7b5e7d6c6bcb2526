"""Mask R-CNN distillation of the mined pseudo-masks (MaskDistill Sec. 3.2, App. A.1), torchvision backend.

The paper trains detectron2's Mask R-CNN R50-C4 (``unseg.distill.detectron2_backend``). This module
is the default, dependency-free backend: torchvision's ``MaskRCNN`` on a ResNet either with an FPN
(``fpn=True``, light enough for CPU with resnet18) or in the paper's C4 layout (``fpn=False``: RPN
and RoIAlign on layer3, layer4 as the shared box/mask head, like detectron2's ``Res5ROIHeads``).
Multi-scale training resizes images in the dataset, with randomness drawn per item from a seed, so
every step's batch is a pure function of (seed, step) and training resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from unseg.coco import decode_segmentation, instance_results, number_results, read_json
from unseg.data.index import read_image
from unseg.errors import UserError
from unseg.models.resnet import create_resnet, load_resnet_weights, resnet_stage_channels
from unseg.train.harness import autocast, generator, step_seed

DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # torchvision and detectron2 defaults
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

# ---------------------------------------------------------------- model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by a ``FrozenBatchNorm2d`` with the same statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def freeze_stages(resnet: nn.Module, trainable_layers: int, norm: str = "bn") -> None:
    """Freeze all but the last ``trainable_layers`` of (stem, layer1, ..., layer4), in place.

    Frozen stages get ``requires_grad=False`` and ``FrozenBatchNorm2d`` (detectron2's ``FREEZE_AT``:
    trainable_layers 3 = FREEZE_AT 2 = stem and layer1 frozen, paper App. A.1). ``norm='frozen'``
    freezes the BatchNorm of the trainable stages too (detectron2's FrozenBN default); ``'bn'``
    trains them (MoCo's detection setup uses (Sync)BN there).
    """
    if not 0 <= trainable_layers <= 5:
        raise UserError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    if norm not in ("bn", "frozen"):
        raise UserError(f"norm must be 'bn' or 'frozen', got {norm!r}")
    for k, names in enumerate(_STAGES):
        frozen = k < len(_STAGES) - trainable_layers
        for name in names:
            part = getattr(resnet, name)
            if frozen or norm == "frozen":
                setattr(resnet, name, freeze_batchnorm(part))
            if frozen:
                getattr(resnet, name).requires_grad_(False)


def _fpn_parts(
    resnet: nn.Module,
    num_labels: int,
    anchor_sizes: Sequence[int],
    aspect_ratios: Sequence[float],
    representation_size: int,
    mask_head_channels: Sequence[int],
    fpn_channels: int,
) -> dict:
    """torchvision's ``maskrcnn_resnet50_fpn`` layout on any ResNet (P2-P5 + max-pooled P6), with the
    FPN width, the box MLP width and the mask head's conv widths as knobs (smaller is faster on a CPU)."""
    channels = resnet_stage_channels(resnet)
    body = BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[channels[f"layer{i}"] for i in range(1, 5)],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    if len(anchor_sizes) != 5:
        raise UserError(f"anchor_sizes needs one size per FPN level (5), got {tuple(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * 5)
    box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    mask_channels = [int(c) for c in mask_head_channels]
    return {
        "backbone": body,
        "rpn_anchor_generator": anchors,
        "box_roi_pool": box_roi_pool,
        "box_head": TwoMLPHead(body.out_channels * 7 * 7, representation_size),
        "box_predictor": FastRCNNPredictor(representation_size, num_labels),
        "mask_head": MaskRCNNHeads(body.out_channels, mask_channels, dilation=1),
        "mask_predictor": MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_labels),
    }


def _c4_parts(resnet: nn.Module, num_labels: int, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float]) -> dict:
    """Detectron2's C4 layout from torchvision parts: RPN and 14x14 RoIAlign on layer3 (stride 16),
    layer4 then global average pooling as the box head, and the same layer4 module (shared weights)
    followed by a 2x deconvolution and a 1x1 predictor as the mask head (14x14 masks)."""
    channels = resnet_stage_channels(resnet)
    body = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
    body.out_channels = channels["layer3"]
    res5 = resnet.layer4
    anchors = AnchorGenerator((tuple(int(s) for s in anchor_sizes),), (tuple(aspect_ratios),))
    rpn_head = RPNHead(body.out_channels, anchors.num_anchors_per_location()[0])
    return {
        "backbone": body,
        "rpn_anchor_generator": anchors,
        "rpn_head": rpn_head,
        "box_roi_pool": MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        "box_head": nn.Sequential(res5, nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
        "box_predictor": FastRCNNPredictor(channels["layer4"], num_labels),
        "mask_roi_pool": MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        "mask_head": res5,
        "mask_predictor": MaskRCNNPredictor(channels["layer4"], 256, num_labels),
    }


def build_maskrcnn(
    num_classes: int,
    backbone: str = "resnet18",
    trainable_layers: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_weights: str | None = None,
    fpn: bool = True,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    norm: str = "bn",
    representation_size: int = 1024,
    mask_head_channels: Sequence[int] = (256, 256, 256, 256),
    fpn_channels: int = 256,
    **roi_rpn_kwargs,
) -> MaskRCNN:
    """torchvision Mask R-CNN for ``num_classes`` object categories (background added: labels 1..K).

    - ``backbone``: resnet18/34/50/101, randomly initialised, or from ``backbone_weights`` (a local
      MoCo / HSG / torchvision checkpoint) loaded before freezing;
    - ``trainable_layers``: 3 keeps stem and layer1 frozen ("first two stages", paper App. A.1);
    - ``fpn``: FPN (P2-P6, one anchor size per level) or C4 (all anchor sizes on layer3);
    - ``representation_size``, ``mask_head_channels``, ``fpn_channels`` (FPN only): box MLP width, mask
      head conv widths and FPN width (torchvision: 1024, four 256s, 256);
    - ``min_size``/``max_size``: test-time resize of the shorter/longer side. Training images are NOT
      resized by the model: :class:`CocoInstanceDataset` does the multi-scale resize;
    - ``roi_rpn_kwargs``: any ``MaskRCNN`` knob (``box_score_thresh``, ``box_detections_per_img``,
      ``rpn_batch_size_per_image``, ...). Inputs are float RGB in [0, 1], ImageNet-normalised inside.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    resnet = create_resnet(backbone)
    if backbone_weights:
        load_resnet_weights(resnet, backbone_weights)
    freeze_stages(resnet, trainable_layers, norm)
    parts = (
        _fpn_parts(
            resnet, num_classes + 1, anchor_sizes, aspect_ratios, representation_size, mask_head_channels, fpn_channels
        )
        if fpn
        else _c4_parts(resnet, num_classes + 1, anchor_sizes, aspect_ratios)
    )
    return MaskRCNN(
        min_size=min_size,
        max_size=max_size,
        _skip_resize=True,
        **parts,
        **roi_rpn_kwargs,
    )


# ---------------------------------------------------------------- data


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 RGB tensor."""
    return torch.from_numpy(read_image(path)).permute(2, 0, 1)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float32 xyxy boxes enclosing the pixels (x1, y1 exclusive)."""
    if len(masks) == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(masks.shape[1])
    xs = torch.arange(masks.shape[2])
    big = max(masks.shape[1], masks.shape[2])
    y0 = torch.where(rows, ys, big).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values + 1
    x0 = torch.where(cols, xs, big).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W) uint8 masks -> (N, height, width) uint8, nearest neighbour (N may be 0)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0].to(torch.uint8)


def resize_shorter_side(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) when the shorter side goes to ``size`` and the longer stays <= ``max_size``
    (torchvision's ``GeneralizedRCNNTransform`` rule, detectron2's ``ResizeShortestEdge``)."""
    scale = min(size / min(h, w), max_size / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class CocoInstanceDataset:
    """Instances of a COCO json (RLE or polygon masks) as torchvision detection targets.

    ``coco`` is the json (dict or path), ``image_paths`` maps image id -> file. Category ids become
    contiguous labels 1..K in sorted id order (``category_ids[label - 1]`` maps back). Items are
    ``(image (3, H, W) float [0, 1], target)`` with ``boxes`` (N, 4) xyxy float, ``labels`` (N,)
    int64, ``masks`` (N, H, W) uint8, ``image_id`` int. With a seed, training augmentation is applied:
    shorter side drawn from ``train_sizes`` (``size_sampling='choice'``: one of them; ``'range'``: an
    integer uniform in [min, max], paper App. A.1's [480, 800]) capped by ``max_size``, then a
    horizontal flip with probability ``flip_p``. Crowd annotations are skipped; instances whose mask
    vanishes in the resize are dropped; ``skip_empty`` leaves out images without instances.
    """

    def __init__(
        self,
        coco: dict | str | Path,
        image_paths: Mapping[int, str | Path],
        train_sizes: Sequence[int] = (800,),
        max_size: int = 1333,
        size_sampling: str = "choice",
        flip_p: float = 0.5,
        skip_empty: bool = True,
    ):
        coco = read_json(coco) if isinstance(coco, (str, Path)) else coco
        if size_sampling not in ("choice", "range"):
            raise UserError(f"size_sampling must be 'choice' or 'range', got {size_sampling!r}")
        if size_sampling == "range" and len(train_sizes) != 2:
            raise UserError(f"size_sampling 'range' needs train_sizes = [min, max], got {list(train_sizes)}")
        self.train_sizes, self.max_size = [int(s) for s in train_sizes], int(max_size)
        self.size_sampling, self.flip_p = size_sampling, float(flip_p)
        cats = coco.get("categories") or [{"id": a["category_id"]} for a in coco.get("annotations", [])]
        self.category_ids = sorted({int(c["id"]) for c in cats})
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.images = {int(im["id"]): im for im in coco["images"]}
        self.anns: dict[int, list[dict]] = {i: [] for i in self.images}
        for ann in coco.get("annotations", []):
            if not ann.get("iscrowd", 0):
                self.anns.setdefault(int(ann["image_id"]), []).append(ann)
        missing = [i for i in self.images if i not in image_paths]
        if missing:
            raise UserError(f"no image file given for image ids {missing[:5]}")
        self.image_paths = {int(k): Path(v) for k, v in image_paths.items()}
        self.image_ids = [i for i in sorted(self.images) if self.anns[i] or not skip_empty]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _instances(self, image_id: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        anns = self.anns[image_id]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for j, ann in enumerate(anns):
            mask = decode_segmentation(ann["segmentation"], h, w)
            if mask.shape != (h, w):
                raise UserError(f"annotation {ann.get('id')} of image {image_id} is {mask.shape}, the image {(h, w)}")
            masks[j] = mask
        labels = torch.tensor([self.label_of[int(a["category_id"])] for a in anns], dtype=torch.int64)
        return torch.from_numpy(masks), labels

    def _draw_size(self, gen: torch.Generator) -> int:
        if self.size_sampling == "range":
            low, high = min(self.train_sizes), max(self.train_sizes)
            return int(torch.randint(low, high + 1, (), generator=gen))
        return self.train_sizes[int(torch.randint(len(self.train_sizes), (), generator=gen))]

    def load(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """Item ``index``; ``seed=None`` gives the original image without augmentation."""
        image_id = self.image_ids[index]
        image = load_image(self.image_paths[image_id]).float() / 255.0
        h, w = image.shape[-2:]
        masks, labels = self._instances(image_id, h, w)
        if seed is not None:
            gen = generator(seed)
            new_h, new_w = resize_shorter_side(h, w, self._draw_size(gen), self.max_size)
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            masks = resize_masks(masks, new_h, new_w)
            if float(torch.rand((), generator=gen)) < self.flip_p:
                image, masks = image.flip(-1), masks.flip(-1)
        keep = masks.flatten(1).bool().any(1)
        masks, labels = masks[keep], labels[keep]
        target = {"boxes": boxes_from_masks(masks.bool()), "labels": labels, "masks": masks, "image_id": image_id}
        return image, target

    def batch(self, indices: Sequence[int], step: int, seed: int) -> tuple[list[torch.Tensor], list[dict]]:
        """Training batch of ``step``: item i augmented with ``step_seed(seed, step, 1000 + i)``."""
        items = [self.load(i, step_seed(seed, step, 1000 + i)) for i in indices]
        return [im for im, _ in items], [t for _, t in items]


# ---------------------------------------------------------------- train and predict


def maskrcnn_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Sequence[torch.Tensor],
    targets: Sequence[dict],
    device: torch.device,
    amp: bool = False,
    clip_grad_norm: float | None = None,
) -> dict[str, float]:
    """One optimiser step on the sum of torchvision's Mask R-CNN losses (RPN objectness and box,
    classifier, box regression, mask BCE); returns ``loss`` and each part as floats. bf16 autocast
    only on CUDA. ``clip_grad_norm`` clips the global gradient norm (steadies training from scratch)."""
    model.train()
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items() if k != "image_id"}
        for t in targets
    ]
    with autocast(device, amp):
        losses = model(images, targets)
    total = sum(v.float() for v in losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def _results_for_image(
    image_id: int, output: dict, category_ids: Sequence[int] | None, score_threshold: float, mask_threshold: float
) -> list[dict]:
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy()
    labels = output["labels"].tolist()
    categories = [label - 1 if category_ids is None else category_ids[label - 1] for label in labels]
    return instance_results(image_id, masks, categories, output["scores"].tolist(), score_threshold)


@torch.no_grad()
def predict_instances(
    model: nn.Module,
    images_with_ids: Iterable[tuple[int, torch.Tensor]],
    device: torch.device,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    category_ids: Sequence[int] | None = None,
    batch_size: int = 1,
    amp: bool = False,
) -> list[dict]:
    """COCO results for ``(image_id, image (3, H, W) uint8 or float [0, 1])`` pairs, at each image's
    original resolution (the model resizes to ``min_size`` and pastes masks back).

    Each result: ``image_id``, ``category_id`` (``category_ids[label - 1]``; without ``category_ids``,
    ``label - 1``, i.e. 0-based cluster ids), ``segmentation`` (RLE of mask probability >
    ``mask_threshold``), ``bbox`` (xywh of the mask), ``score``, ``area``, ``iscrowd`` 0, and a running
    ``id``. Predictions below ``score_threshold`` or with an empty mask are left out; per image they
    come most confident first.
    """
    model.eval()
    results: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        inputs = [(im.float() / 255.0 if im.dtype == torch.uint8 else im.float()).to(device) for _, im in pending]
        with autocast(device, amp):
            outputs = model(inputs)
        for (image_id, _), out in zip(pending, outputs, strict=True):
            results.extend(_results_for_image(int(image_id), out, category_ids, score_threshold, mask_threshold))
        pending.clear()

    for item in images_with_ids:
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return number_results(results)
