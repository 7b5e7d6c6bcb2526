"""Mask R-CNN distillation on the shared harness (MaskDistill Sec. 3.2, App. A.1).

SGD with momentum, linear warm-up (detectron2's: from 0.1% of the lr), step decay at ``lr_steps``
(paper: x0.1 at 20k and 22k of 24k iterations). The batch of step s is a pure function of s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unseg.distill.maskrcnn import CocoInstanceDataset, maskrcnn_train_step
from unseg.train import harness as H


@dataclass(frozen=True)
class MaskRCNNTraining:
    steps: int
    batch_size: int
    lr: float
    lr_steps: Sequence[int]
    warmup_steps: int = 100
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad: float = 0.0
    amp: bool = True
    seed: int = 0
    workers: int = 0
    ckpt_every: int = 100


def warmup_step_lr(step: int, t: MaskRCNNTraining) -> float:
    """detectron2's WarmupMultiStepLR: linear from 0.001·lr over the warm-up, then x0.1 at each milestone."""
    base = H.step_decay(t.lr, step, t.lr_steps)
    if step < t.warmup_steps:
        alpha = step / t.warmup_steps
        return base * (0.001 * (1 - alpha) + alpha)
    return base


def train_maskrcnn(
    model: torch.nn.Module,
    dataset: CocoInstanceDataset,
    t: MaskRCNNTraining,
    ckpt: H.CheckpointDir,
    log_path,
    device: torch.device,
    info: H.DistInfo = H.SINGLE_PROCESS,
) -> int:
    """Train ``model`` in place for ``t.steps`` steps (resuming from ``ckpt``); returns the steps run."""
    model.to(device)
    ddp = H.wrap_ddp(model, info, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    batches = H.StepBatches(len(dataset), t.batch_size, t.seed, lambda idx, s: dataset.batch(idx, s, t.seed), info)

    def step_fn(step: int, batch) -> dict[str, float]:
        lr = warmup_step_lr(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        images, targets = batch
        return {**maskrcnn_train_step(ddp, opt, images, targets, device, t.amp, t.clip_grad or None), "lr": lr}

    return H.train_loop(
        step_fn,
        lambda start: H.step_loader(batches, start, t.steps, t.workers),
        {"model": model, "optimizer": opt},
        t.steps,
        ckpt,
        log_path,
        t.ckpt_every,
        t.seed,
        info,
        desc="maskrcnn",
    )
