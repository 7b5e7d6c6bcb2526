"""Any model bundle (:mod:`unseg.models.bundle`) back to its network: DeepLab, or Mask R-CNN of either backend."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unseg.models.bundle import Preprocess, load_state, read_bundle


def build_from_bundle(bundle: dict) -> nn.Module:
    """The network of a bundle, its weights loaded (strict), in eval mode on the CPU."""
    if bundle["kind"] == "deeplab":
        from unseg.deeplab import deeplab_from_bundle

        return deeplab_from_bundle(bundle)
    if bundle["backend"] == "detectron2":
        from unseg.distill.detectron2_config import require_detectron2

        require_detectron2()
        from detectron2.modeling import build_model

        from unseg.distill.detectron2_backend import build_cfg

        return load_state(build_model(build_cfg({**bundle["architecture"], "MODEL.DEVICE": "cpu"})), bundle)
    from unseg.distill.maskrcnn import build_maskrcnn

    return load_state(build_maskrcnn(bundle["num_classes"], **bundle["architecture"]), bundle)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Preprocess]:
    """A bundle file -> (the network in eval mode on ``device``, its :class:`Preprocess`)."""
    bundle = read_bundle(path)
    return build_from_bundle(bundle).to(device), Preprocess(**bundle["preprocess"])
