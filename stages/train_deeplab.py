"""train_deeplab: DeepLab-v3 on the semantic pseudo-ground-truth, with hard pixel mining (Sec. 3.3).

Reads: params ``deeplab``; the index, ``<pseudo_labels>/instances.json`` (number of clusters k) and
``semantic.zarr`` (labels 0..k, training split). Writes ``<out>/model.pt`` and
``<out>/predictions.zarr`` (argmax map of every image at its original resolution, uint8).
``deeplab.backbone_weights: hsg`` initialises the backbone from ``--hsg`` (pretrain_hsg's ResNet trunk).
The model of the last epoch is kept; ``deeplab.select_best_on_val`` (reproduction only: it uses
ground-truth labels) keeps the epoch with the best validation mIoU instead, like the released code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.coco import read_json
from unseg.data.index import DatasetIndex, read_image
from unseg.deeplab import (
    BestEpochOnVal,
    DeepLabTraining,
    SemanticBatches,
    architecture_of,
    build_deeplab,
    predict_entries,
    train_deeplab,
)
from unseg.errors import UserError
from unseg.launch import relaunch_under_torchrun
from unseg.models.checkpoint import read_checkpoint, save_checkpoint
from unseg.models.resnet import resolve_backbone_weights
from unseg.params import config_from
from unseg.train import harness as H


def main(args, params) -> None:
    p = params.deeplab
    index = DatasetIndex.load(args.index)
    k = len(read_json(args.pseudo_labels / "instances.json")["categories"])
    pseudo = store.RaggedStore(args.semantic)
    row_of = {int(i): r for r, i in enumerate(pseudo.read("image_id"))}
    entries = [e for e in index.split(params.data.train_split) if e.id in row_of]
    if not entries:
        raise UserError(f"no pseudo-ground-truth for the training split {params.data.train_split!r}")
    device = H.resolve_device(p.device)
    info = H.setup_distributed(device)
    torch.manual_seed(p.seed)
    weights = resolve_backbone_weights(p.backbone_weights, args.hsg, "deeplab.backbone_weights")
    model = build_deeplab(k + 1, backbone_weights=weights, **architecture_of(p))
    batches = SemanticBatches(
        images=lambda i: torch.from_numpy(read_image(entries[i])).permute(2, 0, 1),
        labels=lambda i: store.read_semantic_map(pseudo, row_of[entries[i].id]),
        crop_size=p.crop_size, scale_range=(p.scale_min, p.scale_max), max_rotation=p.max_rotation,
        flip_p=p.flip_p, label_fill=p.label_fill, seed=p.seed, num_classes=k + 1,
    )  # fmt: skip
    trained = {key: v for key, v in vars(p).items() if key not in {"device", "workers", "ckpt_every"}}
    digest = H.params_digest(trained, H.file_digest(args.semantic), k, [e.id for e in entries], *H.init_digest(weights))
    ckpt = H.CheckpointDir(args.ckpt, digest, info.is_main)
    best_file = ckpt.path / "best.pt"  # in the digest-guarded folder, so it survives an interruption
    on_epoch_end = None
    if p.select_best_on_val:
        val = [e for e in index.split(params.data.val_split)] if index.has_ground_truth else []
        if not val:
            raise UserError("deeplab.select_best_on_val needs a validation split with ground truth")
        on_epoch_end = BestEpochOnVal(model, index, val, k + 1, best_file, device, p.amp, p.crop_size, info.is_main)
    training = config_from(DeepLabTraining, p)
    log_path = args.ckpt / "loss.csv"
    ran = train_deeplab(model, batches, len(entries), training, ckpt, log_path, device, info, on_epoch_end)
    if not info.is_main:
        return
    if p.select_best_on_val and best_file.exists():
        best = read_checkpoint(best_file, "best epoch")
        model.load_state_dict(best["state"])
        log("train_deeplab", f"select_best_on_val: keeping epoch {best['epoch']} (val mIoU {best['miou']:.3f})")
    log("train_deeplab", f"{ran} steps run now; predicting on {len(index.images)} images")
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "num_classes": k + 1, "backbone": p.backbone}, args.out / "model.pt")
    preds = predict_entries(model, index.images, device, p.amp, p.crop_size)
    ids, attrs = np.array([e.id for e in index.images]), {"kind": "DeepLab-v3 predictions", "num_classes": k + 1}
    store.write_semantic(args.out / "predictions.zarr", ids, preds, attrs)
    shutil.copy(args.ckpt / "loss.csv", args.log)


if __name__ == "__main__":
    relaunch_under_torchrun("stages.train_deeplab")
    ap = parser(__doc__, "index", "pseudo_labels", "semantic", "out")
    ap.add_argument("--ckpt", type=Path, default=Path("artifacts/scratch/deeplab"))
    ap.add_argument("--hsg", type=Path, default=Path("artifacts/hsg/resnet.pth"), help="backbone_weights: hsg")
    ap.add_argument("--log", type=Path, default=Path("artifacts/plots/deeplab_loss.csv"))
    run_stage("train_deeplab", main, ap)
