"""torchvision ResNets (randomly initialised), dilation for any depth, and weights from local checkpoints.

Used as the backbone of Mask R-CNN (``unseg.distill.maskrcnn``) and DeepLab-v3 (``unseg.deeplab``),
initialised from HSG pretraining, a MoCo checkpoint or a plain torchvision state dict. Nothing is
ever downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint

RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")

# When a checkpoint holds several ResNets (MoCo's query and key encoders, a teacher and a student),
# the first name fragment found in this list wins: the query encoder is the one MoCo evaluates.
_PREFERRED_ENCODERS = ("encoder_q", "base_encoder", "teacher", "embedding_model")
# Containers in which training scripts nest the weights (MoCo: state_dict; HSG: embedding_model;
# unseg.train.harness checkpoints: parts).
_NESTED_KEYS = ("state_dict", "model", "embedding_model", "teacher", "module", "parts")


def create_resnet(name: str, replace_stride_with_dilation: Sequence[bool] = (False, False, False)) -> nn.Module:
    """A randomly initialised torchvision ResNet; ``replace_stride_with_dilation`` as in torchvision.

    ``replace_stride_with_dilation = (layer2, layer3, layer4)``; ``(False, True, True)`` gives output
    stride 8, ``(False, False, True)`` stride 16. torchvision refuses dilation for BasicBlock nets
    (resnet18/34), so dilation is applied to the built model by :func:`dilate_layer` instead, for every
    depth; for Bottleneck nets this equals torchvision's own dilation (pinned by a test).
    """
    if name not in RESNET_NAMES:
        raise UserError(f"backbone: unknown ResNet {name!r} (choose one of {', '.join(RESNET_NAMES)})")
    replace = tuple(bool(x) for x in replace_stride_with_dilation)
    if len(replace) != 3:
        raise UserError(f"replace_stride_with_dilation needs 3 flags (layer2..layer4), got {replace}")
    model = getattr(torchvision.models, name)(weights=None)
    dilation = 1
    for layer_name, dilate in zip(("layer2", "layer3", "layer4"), replace, strict=True):
        if dilate:
            dilation *= 2
            dilate_layer(getattr(model, layer_name), dilation)
    return model


def dilate_layer(layer: nn.Module, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convolutions, in place.

    The rule (the same as torchvision's ``replace_stride_with_dilation`` for Bottleneck, and as
    the ``_nostride_dilate`` of MaskDistill's released ``segmentation/models/deeplabv3_model.py``):
    every strided convolution gets stride 1 (the 1x1 downsample included); the strided 3x3 one gets
    dilation = padding = ``dilation // 2`` (the previous stage's dilation), every other 3x3 gets
    dilation = padding = ``dilation``. Parameters are unchanged.
    """
    for module in layer.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilation // 2, dilation // 2)
        elif module.kernel_size == (3, 3):
            module.dilation = module.padding = (dilation, dilation)


def resnet_stage_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of ``layer1``..``layer4`` (64/128/256/512 for resnet18, x4 for resnet50)."""
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        last = getattr(model, name)[-1]
        out[name] = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    return out


# ---------------------------------------------------------------- checkpoints


@dataclass
class LoadReport:
    """What :func:`load_resnet_weights` did, for the log."""

    path: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors (prefix {self.prefix!r}), "
            f"missing {len(self.missing)}, dropped {len(self.dropped)}"
        )


def _unnest(obj: dict) -> dict:
    """Descend into the container keys training scripts use until a flat name -> tensor dict remains."""
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _resnet_prefix(names: Sequence[str]) -> str | None:
    """The name prefix under which a torchvision ResNet sits (``''``, ``'module.encoder_q.'``, ...).

    A prefix ``p`` qualifies when both ``p + 'conv1.weight'`` and ``p + 'layer1.0.conv1.weight'``
    exist. Several (MoCo's two encoders): the preferred encoder, then the shortest prefix.
    """
    present = set(names)
    candidates = [
        n[: -len("conv1.weight")]
        for n in names
        if n.endswith("conv1.weight") and n[: -len("conv1.weight")] + "layer1.0.conv1.weight" in present
    ]
    if not candidates:
        return None

    def rank(prefix: str) -> tuple[int, int, str]:
        hits = [i for i, frag in enumerate(_PREFERRED_ENCODERS) if frag in prefix]
        return (hits[0] if hits else len(_PREFERRED_ENCODERS), len(prefix), prefix)

    return min(candidates, key=rank)


def resnet_state_dict_from_checkpoint(obj: dict, source: str = "checkpoint") -> tuple[OrderedDict, str, list[str]]:
    """Torchvision-named ResNet weights inside a checkpoint object; returns (state, prefix, dropped names).

    Accepts a torchvision state dict, a MoCo v2/v3 checkpoint (``state_dict`` with
    ``module.encoder_q.`` / ``module.base_encoder.`` / ``encoder_q.`` names), and ``{'model': ...}`` or
    ``{'embedding_model': ...}`` dicts (HSG style), with any wrapper prefix. The classifier (``fc.*``),
    the other encoder and everything outside the ResNet are dropped.
    """
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a dict of weights, found {type(obj).__name__}")
    flat = _unnest(obj)
    names = [k for k, v in flat.items() if torch.is_tensor(v)]
    prefix = _resnet_prefix(names)
    if prefix is None:
        raise UserError(f"{source}: no ResNet weights found (no '<prefix>conv1.weight' with 'layer1.0.conv1.weight')")
    state: OrderedDict = OrderedDict()
    dropped = []
    for name in names:
        if not name.startswith(prefix) or name[len(prefix) :].startswith("fc."):
            dropped.append(name)
            continue
        state[name[len(prefix) :]] = flat[name]
    return state, prefix, dropped


def load_resnet_weights(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a local ResNet checkpoint (see :func:`resnet_state_dict_from_checkpoint`) into ``model`` in place.

    Raises ``UserError`` when the file is missing or unreadable, when a tensor's shape differs from
    the model's (usually another depth), when the checkpoint has ResNet tensors the model lacks, or
    (``strict``) when the model has tensors the checkpoint lacks (BatchNorm ``num_batches_tracked``
    excepted). ``fc.*`` of the model is never required.
    """
    path = Path(path)
    state, prefix, dropped = resnet_state_dict_from_checkpoint(read_checkpoint(path, "backbone weights"), str(path))
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise UserError(f"{path}: tensors {unexpected[:3]} do not exist in the backbone (another ResNet depth?)")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise UserError(
                f"{path}: {name} has shape {tuple(value.shape)}, the backbone expects {tuple(own[name].shape)} "
                "(another ResNet depth?)"
            )
    missing = [k for k in own if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if strict and missing:
        raise UserError(f"{path}: the checkpoint lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return LoadReport(path=str(path), prefix=prefix, loaded=list(state), missing=missing, dropped=dropped)


HSG_WEIGHTS = "hsg"  # a ``backbone_weights`` value: the ResNet trunk that the pretrain_hsg stage wrote


def resolve_backbone_weights(value: str | None, hsg_weights: str | Path, key: str) -> str | None:
    """The checkpoint a ``backbone_weights`` param names: ``hsg`` -> ``hsg_weights`` (pretrain_hsg's output,
    which must hold trained weights), any other path as is, null -> None (from scratch)."""
    if value != HSG_WEIGHTS:
        return value
    read_trained_hsg(hsg_weights, f"{key}: hsg, but", "rerun pretrain_hsg (dvc repro)")
    return str(hsg_weights)


def read_trained_hsg(path: str | Path, who: str, remedy: str) -> dict:
    """pretrain_hsg's checkpoint at ``path``; its weightless placeholder (``hsg.train: auto`` with no
    ``backbone_weights: hsg``) stops with one line: ``<who> <path> holds no trained HSG weights: <remedy>``."""
    state = read_checkpoint(path, "HSG weights")
    if "state_dict" not in state:
        raise UserError(f"{who} {path} holds no trained HSG weights: {remedy}")
    return state
