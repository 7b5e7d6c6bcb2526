"""Linear probe: a 1×1 convolution trained on frozen dense features with GT labels.

MaskDistill appendix A.2 (and CrOC's "linear segmentation" transfer): logits = W·z + b per feature
token, bilinearly upsampled to the label size, per-pixel cross-entropy over non-ignored pixels;
SGD (lr 0.1, momentum 0.9, weight decay 1e-4), batch 24, 45 epochs, lr ×0.1 after epoch 25.
Weights start at N(0, 0.01²), bias 0, as in the released ``linear_finetune.py`` re-init.

Differences to the released code (reference.md §1 "Evaluation", §1.4 item 8), documented choices:
- the probe sits on whatever dense features are given (e.g. ViT tokens), not on DeepLab's head;
- no best-epoch selection on val mIoU: the model after the last epoch is returned;
- ``label_size`` (optional) trains against labels resized with nearest to a fixed size, a CPU speed-up;
  prediction is always at the requested output size.
Batches are drawn from a per-epoch permutation seeded by ``seed``, so training is deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unseg.errors import UserError
from unseg.train.harness import generator, resolve_device


def _as_label_tensor(label, label_size: tuple[int, int] | None) -> torch.Tensor:
    """(H, W) int → int64 tensor, optionally nearest-resized to ``label_size`` (ignore values survive)."""
    t = torch.as_tensor(np.asarray(label), dtype=torch.int64)
    if t.ndim != 2:
        raise UserError(f"a probe label map must be (H, W), got shape {tuple(t.shape)}")
    if label_size is not None and tuple(t.shape) != tuple(label_size):
        t = F.interpolate(t[None, None].double(), size=tuple(label_size), mode="nearest")[0, 0].long()
    return t


def _check_inputs(features: Sequence, labels: Sequence, num_classes: int, ignore_index: int) -> int:
    if len(features) != len(labels):
        raise UserError(f"linear probe got {len(features)} feature maps but {len(labels)} label maps")
    if len(features) == 0:
        raise UserError("linear probe got no training images")
    dims = {tuple(f.shape[:1]) for f in features}
    if any(f.ndim != 3 for f in features) or len(dims) != 1:
        raise UserError("linear probe features must all be (D, h, w) with the same D")
    for i, lab in enumerate(labels):
        vals = np.unique(np.asarray(lab))
        bad = vals[(vals != ignore_index) & ((vals < 0) | (vals >= num_classes))]
        if bad.size:
            raise UserError(f"label map {i} holds class {int(bad[0])}, outside [0, {num_classes}) and not ignore")
    return int(features[0].shape[0])


def _batch_loss(conv: nn.Conv2d, feats: list[torch.Tensor], labels: list[torch.Tensor], ignore_index: int):
    """Σ CE over valid pixels of the batch / number of valid pixels; samples of equal shapes run together."""
    groups: dict[tuple, list[int]] = {}
    for i, (f, y) in enumerate(zip(feats, labels, strict=True)):
        groups.setdefault((tuple(f.shape), tuple(y.shape)), []).append(i)
    total = feats[0].new_zeros(())
    n_valid = 0
    for (_, y_shape), idx in groups.items():
        x = torch.stack([feats[i] for i in idx])
        y = torch.stack([labels[i] for i in idx])
        logits = F.interpolate(conv(x), size=y_shape, mode="bilinear", align_corners=False)
        total = total + F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
        n_valid += int((y != ignore_index).sum())
    return total / max(n_valid, 1)


def images_within_budget(pixels: Sequence[int], bytes_per_pixel: float, budget_bytes: float, seed: int) -> list[int]:
    """Indices of the images whose features fit in ``budget_bytes``: all of them when they fit, else a seeded
    random subset (in the original order), so the linear probe's memory stays bounded on a large split.

    ``pixels[i]`` is image i's pixel count and ``bytes_per_pixel`` the feature bytes per input pixel
    (measured on one image: features scale with the input area).
    """
    need = np.asarray(pixels, np.float64) * bytes_per_pixel
    if need.sum() <= budget_bytes:
        return list(range(len(pixels)))
    order = torch.randperm(len(pixels), generator=generator(seed)).numpy()
    fits = np.cumsum(need[order]) <= budget_bytes
    return sorted(order[fits].tolist())


def train_linear_probe(
    features: Sequence[torch.Tensor],
    labels: Sequence[np.ndarray],
    num_classes: int,
    epochs: int = 45,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] | None = None,
    batch_size: int = 24,
    ignore_index: int = 255,
    seed: int = 0,
    device: str | torch.device = "cpu",
    label_size: tuple[int, int] | None = None,
    gamma: float = 0.1,
) -> nn.Conv2d:
    """Train a 1×1 conv D→num_classes on frozen features (list of (D, h, w) float tensors) against
    (H, W) int label maps (``ignore_index`` pixels skipped). ``milestones`` are epochs after which the
    lr is multiplied by ``gamma`` (default: the paper's 25 of 45, scaled to ``epochs``). Returns the
    trained ``nn.Conv2d`` on CPU, in eval mode."""
    if num_classes < 2:
        raise UserError(f"linear probe needs num_classes >= 2, got {num_classes}")
    dim = _check_inputs(features, labels, num_classes, ignore_index)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    feats = [torch.as_tensor(f, dtype=torch.float32).to(dev) for f in features]
    labs = [_as_label_tensor(y, label_size).to(dev) for y in labels]

    gen = generator(seed)
    conv = nn.Conv2d(dim, num_classes, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.01)
        conv.bias.zero_()
    conv.to(dev).train()
    opt = torch.optim.SGD(conv.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if milestones is None:  # the paper's 25 of 45 epochs, scaled to `epochs`
        milestones = (max(1, epochs * 25 // 45),)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = _batch_loss(conv, [feats[i] for i in idx], [labs[i] for i in idx], ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return conv.cpu().eval()


@torch.no_grad()
def predict_probe(conv: nn.Conv2d, feature: torch.Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """(D, h, w) feature → (H, W) int64 argmax of the bilinearly upsampled logits (``out_size`` = (H, W))."""
    x = torch.as_tensor(feature, dtype=torch.float32, device=conv.weight.device)
    if x.ndim != 3 or x.shape[0] != conv.in_channels:
        raise UserError(f"probe expects a ({conv.in_channels}, h, w) feature map, got shape {tuple(x.shape)}")
    logits = F.interpolate(conv(x[None]), size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).cpu().numpy().astype(np.int64)
