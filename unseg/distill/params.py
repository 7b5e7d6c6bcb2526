"""Our ``distill`` params in the vocabulary of the detectron2 backend (no detectron2 import needed)."""

from __future__ import annotations

from pathlib import Path

import torch


def detectron2_params(d, k: int, out: Path, device: torch.device) -> dict:
    """Our ``distill`` params in the vocabulary of :func:`unseg.distill.detectron2_backend.detectron2_config`."""
    return {
        "num_classes": k,
        "depth": int(d.backbone.removeprefix("resnet")),
        "lr": d.lr,
        "momentum": d.momentum,
        "weight_decay": d.weight_decay,
        "max_iter": d.steps,
        "steps": tuple(d.lr_steps),
        "warmup_iters": d.warmup_steps,
        "ims_per_batch": d.batch_size,
        "min_size_train": (d.train_min_size, d.train_max_size),
        "min_size_train_sampling": d.size_sampling,
        "max_size_train": d.max_size,
        "min_size_test": d.test_size,
        "max_size_test": d.max_size,
        "backbone_weights": d.backbone_weights or "",
        "score_thresh_test": d.score_threshold,
        "detections_per_image": d.detections_per_image,
        "amp": d.amp,
        "num_workers": d.workers,
        "checkpoint_period": d.ckpt_every,
        "seed": d.seed,
        "device": device.type,
        "output_dir": str(out),
        "freeze_at": 5 - d.trainable_layers,
    }
