"""train_deeplab: DeepLab-v3 on the semantic pseudo-ground-truth, with hard pixel mining (Sec. 3.3).

Reads: params ``deeplab``; the index, ``<pseudo_labels>/instances.json`` (number of clusters k) and
``semantic.zarr`` (labels 0..k, training split). Writes ``<out>/model.pt`` and
``<out>/predictions.zarr`` (argmax map of every image at its original resolution, uint8).
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
from unseg.deeplab import DeepLabTraining, SemanticBatches, build_deeplab, predict_semantic, train_deeplab
from unseg.errors import UserError
from unseg.matching import ConfusionAccumulator, evaluate_clusters
from unseg.models.checkpoint import read_checkpoint, save_checkpoint
from unseg.params import config_from
from unseg.progress import progress
from unseg.train import harness as H


def predict_all(model, entries, device, amp, input_size) -> list[np.ndarray]:
    out = []
    for e in progress(entries, desc="predict"):
        image = torch.from_numpy(read_image(e)).permute(2, 0, 1)
        out.append(predict_semantic(model, image, device, amp=amp, input_size=input_size).numpy().astype(np.uint8))
    return out


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
    model = build_deeplab(k + 1, p.backbone, p.output_stride, p.aspp_rates, p.freeze_blocks, p.backbone_weights)
    batches = SemanticBatches(
        lambda i: torch.from_numpy(read_image(entries[i])).permute(2, 0, 1),
        lambda i: store.read_semantic_map(pseudo, row_of[entries[i].id]),
        p.crop_size,
        (p.scale_min, p.scale_max),
        p.max_rotation,
        p.flip_p,
        p.label_fill,
        p.seed,
        num_classes=k + 1,
    )
    runtime = {"device", "workers", "ckpt_every"}
    digest = H.params_digest(
        {key: v for key, v in vars(p).items() if key not in runtime},
        H.file_digest(args.semantic),
        k,
        [e.id for e in entries],
    )
    ckpt = H.CheckpointDir(args.ckpt, digest, info.is_main)
    best_file = ckpt.path / "best.pt"  # in the digest-guarded folder, so it survives an interruption
    on_epoch_end = None
    if p.select_best_on_val:
        val = [e for e in index.split(params.data.val_split)] if index.has_ground_truth else []
        if not val:
            raise UserError("deeplab.select_best_on_val needs a validation split with ground truth")

        def on_epoch_end(epoch: int) -> None:
            acc = ConfusionAccumulator(k + 1, len(index.classes), index.ignore_index)
            for pred, e in zip(predict_all(model, val, device, p.amp, p.crop_size), val, strict=True):
                acc.update(pred, index.read_semantic(e))
            score = evaluate_clusters(acc.matrix)["hungarian"]["miou"]
            best = read_checkpoint(best_file, "best epoch") if best_file.exists() else {"miou": -1.0}
            if score > best["miou"] and info.is_main:
                save_checkpoint({"miou": score, "epoch": epoch, "state": model.state_dict()}, best_file)

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
    preds = predict_all(model, index.images, device, p.amp, p.crop_size)
    store.write_semantic(
        args.out / "predictions.zarr",
        np.array([e.id for e in index.images]),
        preds,
        {"kind": "DeepLab-v3 predictions", "num_classes": k + 1},
    )
    shutil.copy(args.ckpt / "loss.csv", args.log)


if __name__ == "__main__":
    ap = parser(__doc__, "index", "pseudo_labels", "semantic", "out")
    ap.add_argument("--ckpt", type=Path, default=Path("artifacts/scratch/deeplab"))
    ap.add_argument("--log", type=Path, default=Path("artifacts/plots/deeplab_loss.csv"))
    run_stage("train_deeplab", main, ap)
