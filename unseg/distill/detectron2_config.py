"""The ``distill`` params as a detectron2 config, torchvision ResNet weights under detectron2's names, and the
check that detectron2 is installed and loads. Pure: nothing here imports detectron2.

MaskDistill trained detectron2's Mask R-CNN R50-C4 and never published its configs (reference.md §1.1).
The paper says it follows MoCo's detection protocol (App. A.1): R50-C4, MoCo initialisation, the first
two stages frozen, shorter side drawn from [480, 800] in training and 800 at test, lr 0.02 decayed x0.1
at 20k and 22k of 24k iterations, 100 warm-up iterations. ``configs/paper.yaml`` holds those values; the
rest of the C4 layout (naive SyncBN, an extra norm after res5 in the box head, RGB input with the ImageNet
mean/std in 0..255, RPN 12000/6000 proposals before NMS) is MoCo's ``detection/configs/Base-RCNN-C4-BN.yaml``.
With ``distill.fpn: true`` (the tiny profile) the same params give detectron2's R-FPN layout with the
widths of the torchvision backend (box MLP, mask head convs, FPN channels, proposals per level).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unseg.errors import UserError

INSTALL_HINT = (
    "run `make detectron2` (installs it from ../shared/wheels where a matching wheel is, else prints how to build it)"
)
BUILD_RECORD = "detectron2-build.json"  # written into the venv (sys.prefix) by scripts/install_detectron2.py
C4_EXTRA_NORM_HEAD = "Res5ROIHeadsExtraNorm"  # MoCo's Res5ROIHeads + a norm after res5 (registered by the backend)
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")


def _base_version(version: str) -> str:
    return version.split("+")[0]


def require_detectron2(record: Path | None = None) -> None:
    """Stop with one line unless detectron2 and its compiled ops import with the installed torch.

    Not installed: the line names ``make detectron2``. Installed but its ``_C`` extension fails to load (built
    against another torch): the line names both torch versions, the build's from ``record``
    (``<venv>/detectron2-build.json``, written at install) when known.
    """
    if importlib.util.find_spec("detectron2") is None:
        raise UserError(f"distill.backend: detectron2 needs detectron2, which is not installed: {INSTALL_HINT}")
    try:
        importlib.import_module("detectron2._C")
    except (ImportError, OSError) as err:
        record = Path(sys.prefix) / BUILD_RECORD if record is None else record
        built = json.loads(record.read_text()).get("torch") if record.is_file() else None
        built_for = f"torch {built}" if built else "another torch"
        raise UserError(
            f"detectron2 is installed but its compiled ops do not load with torch {_base_version(torch.__version__)} "
            f"(it was built for {built_for}): rebuild it for this torch ({INSTALL_HINT}); {str(err).splitlines()[0]}"
        ) from err


def _schedule(distill) -> dict[str, Any]:
    if not all(0 < s < distill.steps for s in distill.lr_steps):
        raise UserError(f"distill.lr_steps {list(distill.lr_steps)} must lie inside distill.steps {distill.steps}")
    return {
        "SOLVER.IMS_PER_BATCH": int(distill.batch_size),
        "SOLVER.BASE_LR": float(distill.lr),
        "SOLVER.MOMENTUM": float(distill.momentum),
        "SOLVER.WEIGHT_DECAY": float(distill.weight_decay),
        "SOLVER.GAMMA": 0.1,
        "SOLVER.STEPS": tuple(int(s) for s in distill.lr_steps),
        "SOLVER.MAX_ITER": int(distill.steps),
        "SOLVER.WARMUP_ITERS": int(distill.warmup_steps),
        "SOLVER.WARMUP_FACTOR": 0.001,
        "SOLVER.WARMUP_METHOD": "linear",
        "SOLVER.CHECKPOINT_PERIOD": int(distill.ckpt_every),
    }


def _c4_layout(distill) -> dict[str, Any]:
    """R-C4: RPN and 14x14 RoIAlign on res4, res5 as the box and mask head (MoCo's extra norm after it)."""
    return {
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.RESNETS.OUT_FEATURES": ["res4"],
        "MODEL.ANCHOR_GENERATOR.SIZES": [[int(s) for s in distill.anchor_sizes]],
        "MODEL.RPN.IN_FEATURES": ["res4"],
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
        "MODEL.ROI_HEADS.NAME": C4_EXTRA_NORM_HEAD,
        "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    }


def _fpn_layout(distill) -> dict[str, Any]:
    """R-FPN (P2-P6) with the torchvision backend's widths: two-FC box head, a conv mask head, 7x7 / 14x14 RoIs."""
    widths = {int(c) for c in distill.mask_head_channels}
    if len(widths) != 1:
        raise UserError(
            f"distill.mask_head_channels {list(distill.mask_head_channels)}: detectron2's mask head has one width "
            "for all its convs (give equal values)"
        )
    if len(distill.anchor_sizes) != len(FPN_LEVELS):
        raise UserError(f"distill.anchor_sizes needs one size per FPN level (5), got {list(distill.anchor_sizes)}")
    return {
        "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
        "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS": int(distill.fpn_channels),
        "MODEL.ANCHOR_GENERATOR.SIZES": [[int(s)] for s in distill.anchor_sizes],
        "MODEL.RPN.IN_FEATURES": list(FPN_LEVELS),
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": int(distill.train_proposals),  # per level, as torchvision's
        "MODEL.RPN.PRE_NMS_TOPK_TEST": int(distill.test_proposals),
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES": list(FPN_LEVELS[:4]),
        "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM": int(distill.representation_size),
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
        "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
        "MODEL.ROI_MASK_HEAD.NUM_CONV": len(distill.mask_head_channels),
        "MODEL.ROI_MASK_HEAD.CONV_DIM": widths.pop(),
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 2,
    }


def detectron2_config(distill, *, num_classes: int, device: str = "cpu", output_dir: str | Path = "") -> dict:
    """The ``distill`` params section as a flat detectron2 config ``{'MODEL.X': value, ...}``.

    Apply with ``cfg.merge_from_list([k, v, ...])`` on ``detectron2.config.get_cfg()``. ``distill.fpn`` picks
    R-FPN or the paper's R-C4; ``trainable_layers`` t freezes the first 5 - t of (stem, res2, .., res5)
    (``FREEZE_AT``, paper: 3 = stem and res2 frozen). Params that detectron2's config has no key for
    (``flip_p``, ``clip_grad``, ``seed``, ``workers``, ``amp``) are applied by the backend's trainer.
    """
    if num_classes < 1:
        raise UserError(f"detectron2 config: num_classes must be a positive integer, got {num_classes}")
    depth = int(distill.backbone.removeprefix("resnet"))
    if not distill.fpn and depth < 50:
        raise UserError(
            f"distill.backbone {distill.backbone} with fpn: false: detectron2's C4 box head is a bottleneck res5, "
            "which needs resnet50 or resnet101 (or set distill.fpn: true)"
        )
    return {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.DEVICE": device,
        "MODEL.WEIGHTS": "",  # the backbone is initialised by the backend (convert_resnet_state), never downloaded
        "MODEL.MASK_ON": True,
        "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
        "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
        "MODEL.BACKBONE.FREEZE_AT": 5 - int(distill.trainable_layers),
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
        "MODEL.RESNETS.NORM": "naiveSyncBN",  # BatchNorm, synchronised over DDP processes (MoCo's SyncBN)
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision ResNets stride in the 3x3 conv
        "MODEL.RESNETS.RES5_DILATION": 1,
        **(_fpn_layout(distill) if distill.fpn else _c4_layout(distill)),
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": int(distill.rpn_batch_size_per_image),
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": int(distill.train_proposals),
        "MODEL.RPN.POST_NMS_TOPK_TEST": int(distill.test_proposals),
        "MODEL.ROI_HEADS.NUM_CLASSES": int(num_classes),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": int(distill.box_batch_size_per_image),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": float(distill.score_threshold),
        "INPUT.FORMAT": "RGB",
        "INPUT.MIN_SIZE_TRAIN": (int(distill.train_min_size), int(distill.train_max_size)),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": distill.size_sampling,
        "INPUT.MAX_SIZE_TRAIN": int(distill.max_size),
        "INPUT.MIN_SIZE_TEST": int(distill.test_size),
        "INPUT.MAX_SIZE_TEST": int(distill.max_size),
        "INPUT.MASK_FORMAT": "bitmask",  # the pseudo-labels are RLE
        **_schedule(distill),
        "TEST.DETECTIONS_PER_IMAGE": int(distill.detections_per_image),
        "SEED": int(distill.seed),
        "OUTPUT_DIR": str(output_dir),
    }


# ---------------------------------------------------------------- weights


def _detectron2_resnet_name(name: str) -> str:
    """One torchvision ResNet name under detectron2's ``ResNet`` names (MoCo's convert-pretrain-to-detectron2):
    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerK`` -> ``res{K+1}``; ``bnJ`` ->
    ``convJ.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``."""
    new = name if name.startswith("layer") else "stem." + name
    for k in (1, 2, 3, 4):
        new = new.replace(f"layer{k}.", f"res{k + 1}.")
    for j in (1, 2, 3):
        new = new.replace(f"bn{j}.", f"conv{j}.norm.")
    return new.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def convert_resnet_state(state: Mapping[str, torch.Tensor], *, fpn: bool) -> dict[str, torch.Tensor]:
    """torchvision ResNet weights -> the names of detectron2's ``GeneralizedRCNN``.

    R-FPN: the trunk is ``backbone.bottom_up.*``. R-C4: stem..res4 are ``backbone.*`` and res5 lives in the box
    head, ``roi_heads.res5.*``. ``fc.*`` and ``num_batches_tracked`` are dropped.
    """
    out = {}
    for name, value in state.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        new = _detectron2_resnet_name(name)
        if fpn:
            new = "backbone.bottom_up." + new
        else:
            new = ("roi_heads." if new.startswith("res5.") else "backbone.") + new
        out[new] = value
    return out
