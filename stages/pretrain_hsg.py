"""pretrain_hsg: a ResNet FCN trained with HSG (Ke et al., CVPR 2022) on the unlabeled training images.

Reads: params ``hsg``; the image index (training split). Writes ``<out>``: the ResNet trunk in torchvision
names (``state_dict``, what ``distill.backbone_weights`` / ``deeplab.backbone_weights`` load), the embedding
head, the clustering transformers and ``meta`` (params digest). Scratch: ``<ckpt>`` (resumable checkpoints
guarded by the digest, and the cached superpixels of every image) and the loss log, copied to ``<log>``.
``hsg.reuse``: a checkpoint written by this stage with the same digest is used as is. ``hsg.train: auto``
trains only when ``distill.backbone_weights`` or ``deeplab.backbone_weights`` is ``hsg``; otherwise ``<out>``
is a placeholder without weights (its bytes never change, so Mask R-CNN and DeepLab, which depend on it,
stay cached when HSG params change). Runs under torchrun.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.hsg.objective import HSGConfig
from unseg.hsg.trainer import HSGTraining, build_models, export_state, train_hsg
from unseg.launch import relaunch_under_torchrun
from unseg.models.checkpoint import save_checkpoint
from unseg.models.resnet import HSG_WEIGHTS
from unseg.params import config_from
from unseg.pretrain.reuse import reuse_checkpoint
from unseg.train import harness as H

RUNTIME = {"reuse", "train", "device", "workers", "ckpt_every", "test_output_stride"}  # not what is trained
PLACEHOLDER = {"meta": {"trained": False}}  # what Mask R-CNN and DeepLab refuse to load as weights


def main(args, params) -> None:
    h = params.hsg
    entries = DatasetIndex.load(args.index).split(params.data.train_split)
    if not entries:
        raise UserError(f"no images in split {params.data.train_split!r} to pretrain on")
    trained = {k: v for k, v in vars(h).items() if k not in RUNTIME}
    digest = H.params_digest(trained, [H.file_digest(e.file) for e in entries])
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.ckpt.mkdir(parents=True, exist_ok=True)  # a declared output, even when nothing trains
    if h.train == "auto" and HSG_WEIGHTS not in (params.distill.backbone_weights, params.deeplab.backbone_weights):
        save_checkpoint(PLACEHOLDER, args.out)
        args.log.write_text("step,loss\n")
        log("pretrain_hsg", "no backbone_weights is hsg (hsg.train: auto): nothing trained, a placeholder written")
        return
    if h.reuse and reuse_checkpoint(h.reuse, digest, args.out, lambda m: log("pretrain_hsg", m), "hsg.reuse"):
        args.log.write_text("step,loss\n")
        log("pretrain_hsg", f"hsg.reuse: {h.reuse} was trained with these exact params and data; used as is")
        return
    if h.crop_size % h.output_stride:
        raise UserError(f"hsg.crop_size = {h.crop_size}: must be a multiple of hsg.output_stride ({h.output_stride})")
    training = config_from(HSGTraining, h, lr_milestones=tuple(h.lr_milestones))
    objective = config_from(HSGConfig, h, kmeans_grid=tuple(h.kmeans_grid), hierarchy=True)
    device = H.resolve_device(h.device)
    info = H.setup_distributed(device)
    torch.manual_seed(h.seed)
    models = build_models(training)
    ckpt = H.CheckpointDir(args.ckpt / "train", digest, info.is_main)
    sp = f"scale{h.superpixel_scale:g}_sigma{h.superpixel_sigma:g}_min{h.superpixel_min_size}"
    regions = args.ckpt / f"superpixels_{sp}"  # kept across runs
    ran = train_hsg(models, entries, training, objective, ckpt, ckpt.path / "loss.csv", regions, device, info)
    if not info.is_main:
        return
    save_checkpoint(export_state(models, {"digest": digest, "steps": h.steps, "backbone": h.backbone}), args.out)
    loss = ckpt.path / "loss.csv"
    args.log.write_text(loss.read_text() if loss.exists() else "step,loss\n")
    log("pretrain_hsg", f"{ran} of {h.steps} HSG steps run now -> {args.out}")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.pretrain_hsg")
    ap = parser(__doc__, "index", "out")
    ap.add_argument("--ckpt", type=Path, default=Path("artifacts/scratch/hsg"))
    ap.add_argument("--log", type=Path, default=Path("artifacts/plots/hsg_loss.csv"))
    run_stage("pretrain_hsg", main, ap)
