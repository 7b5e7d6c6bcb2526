"""pretrain_croc: the ViT that mask mining uses, trained with CrOC (Stegmüller et al., CVPR 2023).

Reads: params ``backbone``, ``croc``; the image index (training split). Writes ``<out>``: a
checkpoint in the DINO training-checkpoint layout (``teacher``/``student`` dicts of ``backbone.*``
weights), which ``extract_features`` loads like an official DINO file. Scratch: ``<ckpt>`` (resumable
checkpoints guarded by a params digest) and the loss log, copied to ``<log>`` at the end.

- ``backbone.weights`` set: that checkpoint is validated against ``backbone`` and converted; no training.
- ``croc.reuse`` set: a checkpoint written earlier by this stage with exactly the current params and
  training images (checked by a digest stored in it) is used as is; the tiny profile ships one
  (``checkpoints/croc_tiny.pth``). Another digest (your own images, a changed param): one warning
  line, then training as below.
- otherwise: train ``croc.steps`` steps from scratch (resumes after an interrupt). Runs under
  ``torchrun`` for DDP.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.launch import relaunch_under_torchrun
from unseg.models.vit import create_vit, load_vit_weights, save_dino_checkpoint
from unseg.pretrain.reuse import reuse_checkpoint, split_croc_params, training_digest
from unseg.pretrain.trainer import build_models, train_croc
from unseg.train import harness as H


def write_empty_outs(args, why: str) -> None:
    """The scratch folder (with a note saying why it is empty) and the declared loss log, when nothing is trained."""
    args.ckpt.mkdir(parents=True, exist_ok=True)
    (args.ckpt / "NOT_TRAINED").write_text(why + "\n")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("step,loss\n")


def main(args, params) -> None:
    b, c = params.backbone, params.croc
    meta = {"arch": b.arch, "patch_size": b.patch_size, "depth": b.depth, "stem": b.stem}
    if b.weights:
        write_empty_outs(args, f"backbone.weights: {b.weights}")
        model = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
        load_vit_weights(model, b.weights, b.checkpoint_key)
        save_dino_checkpoint(model, args.out, meta={**meta, "source": f"converted from {b.weights}"})
        log("pretrain_croc", f"backbone.weights given: validated and converted {b.weights} -> {args.out}")
        return
    index = DatasetIndex.load(args.index)
    entries = index.split(params.data.train_split)
    if not entries:
        raise UserError(f"no images in split {params.data.train_split!r} to pretrain on")
    digest = training_digest(b, c, entries)
    if c.reuse and reuse_checkpoint(c.reuse, digest, args.out, lambda m: log("pretrain_croc", m)):
        write_empty_outs(args, f"croc.reuse: {c.reuse}")
        log("pretrain_croc", f"croc.reuse: {c.reuse} was trained with these exact params and data; used as is")
        return
    device = H.resolve_device(c.device)
    info = H.setup_distributed(device)
    training, objective = split_croc_params(c)
    torch.manual_seed(c.seed)
    models = build_models(b.arch, b.patch_size, b.depth, training, stem=b.stem)
    if c.steps == 0:
        log("pretrain_croc", "WARNING: croc.steps = 0: writing a randomly initialised ViT")
    ckpt = H.CheckpointDir(args.ckpt, digest, info.is_main)
    ran = train_croc(models, entries, training, objective, ckpt, args.ckpt / "loss.csv", device, info)
    if info.is_main:
        save_dino_checkpoint(models.teacher, args.out, meta={**meta, "steps": c.steps, "digest": digest})
        args.log.parent.mkdir(parents=True, exist_ok=True)
        loss = args.ckpt / "loss.csv"
        args.log.write_text(loss.read_text() if loss.exists() else "step,loss\n")
        log("pretrain_croc", f"{ran} of {c.steps} CrOC steps run now -> {args.out}")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.pretrain_croc")
    ap = parser(__doc__, "index", "out")
    ap.add_argument("--ckpt", type=Path, default="artifacts/scratch/croc")
    ap.add_argument("--log", type=Path, default="artifacts/plots/croc_loss.csv")
    run_stage("pretrain_croc", main, ap)
