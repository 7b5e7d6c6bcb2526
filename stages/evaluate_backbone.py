"""evaluate_backbone: CrOC's protocols and the front half of MaskDistill, against a random-init ViT.

Reads: params ``evaluate`` (probe, video, seed, device), ``features``, ``mining`` and ``cluster`` (to run
the front half in memory); the image index and the backbone checkpoint. Writes ``<out>`` (json): for
the pretrained ViT and for a randomly initialised ViT of the same shape, on the validation split,
dense K-means mIoU (k = number of classes, Hungarian), linear-probe mIoU (1x1 conv trained on the
training split's ground truth), DAVIS J&F by label propagation (the generated videos or
``evaluate.video_root``) and the foreground IoU of the mined masks; plus the whole front half
(mine -> K-means) with the random ViT, the baseline row of Table 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unseg.cli import log, parser, run_stage, write_text
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.evaluation.backbone import backbone_suite, front_half_row
from unseg.evaluation.video import read_davis_sequences
from unseg.models.vit import create_vit, load_vit_weights
from unseg.train.harness import resolve_device


def main(args, params) -> None:
    ev, b = params.evaluate, params.backbone
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    train, train_gts = index.labelled(params.data.train_split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not val or not train:
        note = "no ground truth on the training and validation splits: nothing to score"
        write_text(args.out, json.dumps({"note": note}) + "\n")
        log("evaluate_backbone", note)
        return
    device = resolve_device(ev.device)
    root = Path(ev.video_root) if ev.video_root else args.index.parent / "video"
    videos = read_davis_sequences(root) if root.is_dir() else []
    if ev.video_root and not videos:
        raise UserError(f"evaluate.video_root: no DAVIS sequences under {root}")
    pretrained = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    load_vit_weights(pretrained, args.backbone)
    torch.manual_seed(ev.seed)
    random_vit = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    result, mined = {}, {}
    for name, model in (("pretrained", pretrained), ("random_init", random_vit)):
        model.eval().to(device)
        splits = (train, train_gts, val, val_gts)
        result[name], mined[name] = backbone_suite(
            model, params, index, splits, videos, device, lambda m: log("evaluate_backbone", m)
        )
        log("evaluate_backbone", f"{name}: {json.dumps(result[name])}")
    # the Table-1 baseline: the whole front half (mine -> K-means) with the random ViT
    result["random_init_front_half"] = front_half_row(
        random_vit, mined["random_init"], params, index, val, val_gts, device
    )
    write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_stage("evaluate_backbone", main, parser(__doc__, "index", "backbone", "out"))
