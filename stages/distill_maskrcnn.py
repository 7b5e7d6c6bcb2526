"""distill_maskrcnn: Mask R-CNN trained on the K-means pseudo-labels, then run on every image (Sec. 3.2).

Reads: params ``distill``; the image index and ``<pseudo_labels>/instances.json`` (training split only).
Writes ``<out>/model.pt`` and ``<out>/predictions.json`` (COCO results: RLE masks at the original
resolution, scores, ``category_id`` = pseudo-label category). Scratch: ``--ckpt`` (resumable,
guarded by a params digest). Backend: torchvision (default) or detectron2 (the paper's R50-C4).
``distill.backbone_weights: hsg`` initialises the backbone from ``--hsg`` (pretrain_hsg's ResNet trunk).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from unseg import coco
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.distill.detectron2_config import require_detectron2
from unseg.distill.maskrcnn import CocoInstanceDataset, load_image, predict_instances
from unseg.distill.params import maskrcnn_architecture, split_instances, torchvision_maskrcnn, training_digest
from unseg.distill.trainer import MaskRCNNTraining, train_maskrcnn
from unseg.errors import UserError
from unseg.launch import relaunch_under_torchrun
from unseg.models.bundle import Preprocess, make_bundle, save_bundle
from unseg.models.resnet import resolve_backbone_weights
from unseg.params import config_from
from unseg.progress import progress
from unseg.train import harness as H


def main(args, params) -> None:
    d = params.distill
    index = DatasetIndex.load(args.index)
    pseudo = coco.read_json(args.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])
    train_ids = {e.id for e in index.split(params.data.train_split)}
    train_json = split_instances(pseudo, train_ids)
    if not train_json["annotations"]:
        raise UserError(f"no pseudo-labels in the training split {params.data.train_split!r}")
    paths = {e.id: e.file for e in index.images}
    device = H.resolve_device(d.device)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = resolve_backbone_weights(d.backbone_weights, args.hsg, "distill.backbone_weights")
    digest = training_digest(d, args.pseudo_labels / "instances.json", train_ids, weights)
    d = dataclasses.replace(d, backbone_weights=weights)  # hsg -> the file pretrain_hsg wrote
    if d.backend == "detectron2":
        return distill_detectron2(args, d, train_json, paths, index, device, digest)
    info = H.setup_distributed(device)
    torch.manual_seed(d.seed)
    model = torchvision_maskrcnn(d, k)
    dataset = CocoInstanceDataset(
        train_json, paths, [d.train_min_size, d.train_max_size], d.max_size, d.size_sampling, d.flip_p
    )
    training = config_from(MaskRCNNTraining, d)
    ckpt = H.CheckpointDir(args.ckpt, digest, info.is_main)
    ran = train_maskrcnn(model, dataset, training, ckpt, args.ckpt / "loss.csv", device, info)
    if not info.is_main:
        return
    log("distill_maskrcnn", f"{ran} of {d.steps} steps run now; predicting on {len(index.images)} images")
    bundle = make_bundle(
        "maskrcnn",
        model=model,
        architecture=maskrcnn_architecture(d),
        num_classes=k,
        preprocess=Preprocess(short_side=d.test_size, max_size=d.max_size),
        params_digest=digest,
        backend="torchvision",
        category_ids=dataset.category_ids,
    )
    save_bundle(bundle, args.out / "model.pt")
    images = ((e.id, load_image(e.file)) for e in progress(index.images, desc="predict"))
    preds = predict_instances(
        model, images, device, d.score_threshold, category_ids=dataset.category_ids, batch_size=d.batch_size, amp=d.amp
    )
    coco.write_json(preds, args.out / "predictions.json")
    shutil.copy(args.ckpt / "loss.csv", args.log)
    log("distill_maskrcnn", f"{len(preds)} predictions -> {args.out / 'predictions.json'}")


def distill_detectron2(args, d, train_json: dict, paths: dict, index: DatasetIndex, device, digest: str) -> None:
    require_detectron2()
    from unseg.distill.detectron2_backend import distill_with_detectron2

    info = H.setup_distributed(device)
    ckpt = H.CheckpointDir(args.ckpt, digest, info.is_main)
    done = distill_with_detectron2(
        d,
        instances=train_json,
        image_paths=paths,
        predict=((e.id, e.file) for e in progress(index.images, desc="predict")),
        backbone_weights=d.backbone_weights,
        ckpt_dir=ckpt.path,
        log_path=ckpt.path / "loss.csv",
        device=device,
        info=info,
    )
    if done is None:  # not the main process
        return
    log("distill_maskrcnn", f"detectron2: backbone {done.init_report}; {done.steps_run} of {d.steps} steps run now")
    bundle = make_bundle(
        "maskrcnn",
        model=done.model,
        architecture=done.config,
        num_classes=len(done.category_ids),
        preprocess=Preprocess(short_side=d.test_size, max_size=d.max_size),
        params_digest=digest,
        backend="detectron2",
        category_ids=done.category_ids,
    )
    save_bundle(bundle, args.out / "model.pt")
    coco.write_json(done.predictions, args.out / "predictions.json")
    shutil.copy(ckpt.path / "loss.csv", args.log)
    log("distill_maskrcnn", f"{len(done.predictions)} predictions -> {args.out / 'predictions.json'}")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.distill_maskrcnn")
    ap = parser(__doc__, "index", "pseudo_labels", "out")
    ap.add_argument("--ckpt", type=Path, default=Path("artifacts/scratch/maskrcnn"))
    ap.add_argument("--hsg", type=Path, default=Path("artifacts/hsg/resnet.pth"), help="backbone_weights: hsg")
    ap.add_argument("--log", type=Path, default=Path("artifacts/plots/maskrcnn_loss.csv"))
    run_stage("distill_maskrcnn", main, ap)
