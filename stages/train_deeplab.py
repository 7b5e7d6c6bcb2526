"""train_deeplab: DeepLab-v3 on the semantic pseudo-ground-truth, with hard pixel mining (Sec. 3.3).

Reads: params ``deeplab``; the index, ``<pseudo_labels>/instances.json`` (number of clusters k) and
``semantic.zarr`` (labels 0..k, training split). Writes ``<out>/model.pt`` (a portable bundle:
:func:`unseg.load_model`) and
``<out>/predictions.zarr`` (argmax map of every image at its original resolution, uint8).
``deeplab.backbone_weights: hsg`` initialises the backbone from ``--hsg`` (pretrain_hsg's ResNet trunk).
The model of the last epoch is kept; ``deeplab.select_best_on_val`` (reproduction only: it uses
ground-truth labels) keeps the epoch with the best validation mIoU instead, like the released code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.coco import read_json
from unseg.data.index import DatasetIndex
from unseg.deeplab import BestEpochOnVal
from unseg.errors import UserError
from unseg.launch import relaunch_under_torchrun
from unseg.models.checkpoint import read_checkpoint
from unseg.models.resnet import resolve_backbone_weights
from unseg.train import harness as H
from unseg.train.deeplab_fit import fit_deeplab, write_deeplab_outputs


def main(args, params) -> None:
    deeplab = params.deeplab
    index = DatasetIndex.load(args.index)
    k = len(read_json(args.pseudo_labels / "instances.json")["categories"])
    labelled = {int(i) for i in store.RaggedStore(args.semantic).read("image_id")}
    entries = [e for e in index.split(params.data.train_split) if e.id in labelled]
    if not entries:
        raise UserError(f"no pseudo-ground-truth for the training split {params.data.train_split!r}")
    device = H.resolve_device(deeplab.device)
    info = H.setup_distributed(device)
    weights = resolve_backbone_weights(deeplab.backbone_weights, args.hsg, "deeplab.backbone_weights")
    best_on_val = None
    if deeplab.select_best_on_val:
        val = [e for e in index.split(params.data.val_split)] if index.has_ground_truth else []
        if not val:
            raise UserError("deeplab.select_best_on_val needs a validation split with ground truth")

        def best_on_val(model, ckpt):  # in the digest-guarded folder, so it survives an interruption
            return BestEpochOnVal(
                model, index, val, k + 1, ckpt.path / "best.pt", device, deeplab.amp, deeplab.crop_size, info.is_main
            )

    model, ran, digest = fit_deeplab(
        deeplab,
        entries=entries,
        labels=args.semantic,
        num_classes=k + 1,
        ckpt_dir=args.ckpt,
        log_path=args.ckpt / "loss.csv",
        device=device,
        info=info,
        init_weights=weights,
        on_epoch_end=best_on_val,
    )
    if not info.is_main:
        return
    best_file = args.ckpt / "best.pt"
    if deeplab.select_best_on_val and best_file.exists():
        best = read_checkpoint(best_file, "best epoch")
        model.load_state_dict(best["state"])
        log("train_deeplab", f"select_best_on_val: keeping epoch {best['epoch']} (val mIoU {best['miou']:.3f})")
    log("train_deeplab", f"{ran} steps run now; predicting on {len(index.images)} images")
    write_deeplab_outputs(
        model, deeplab, index.images, args.out, num_classes=k + 1, digest=digest, device=device,
        kind="DeepLab-v3 predictions",
    )  # fmt: skip
    shutil.copy(args.ckpt / "loss.csv", args.log)


if __name__ == "__main__":
    relaunch_under_torchrun("stages.train_deeplab")
    ap = parser(__doc__, "index", "pseudo_labels", "semantic", "out")
    ap.add_argument("--ckpt", type=Path, default=Path("artifacts/scratch/deeplab"))
    ap.add_argument("--hsg", type=Path, default=Path("artifacts/hsg/resnet.pth"), help="backbone_weights: hsg")
    ap.add_argument("--log", type=Path, default=Path("artifacts/plots/deeplab_loss.csv"))
    run_stage("train_deeplab", main, ap)
