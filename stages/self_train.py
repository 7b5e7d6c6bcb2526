"""self_train: round r of MaskDistill's CRF self-training (Sec. 4.3: 45.8 -> 48.9 mIoU; released train_plus_crf.sh).

One DVC stage per round (``self_train@1`` .. ``@3`` in dvc.yaml). Round r <= ``self_training.rounds``: the
previous round's DeepLab (round 1: train_deeplab's) predicts the training split, the dense CRF (released
settings, :mod:`unseg.crf`) refines each map into labels, and a DeepLab trained on them with the ``deeplab``
params predicts every image. It starts where train_deeplab started (``deeplab.backbone_weights``; the released
code retrains "from scratch", i.e. from its MoCo init); ``self_training.init: previous`` fine-tunes the previous
round's weights instead. Writes ``<out>/labels.zarr`` (the CRF labels), ``<out>/model.pt`` (a bundle),
``<out>/predictions.zarr``, ``<out>/loss.csv`` and ``<out>/round.json``; a round above the count writes only
``round.json`` (``trained: false``), so changing the count reruns the rounds it adds or removes and evaluate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from unseg import store
from unseg.cli import log, parser, run_stage, write_text
from unseg.crf import crf_label_maps
from unseg.data.index import DatasetIndex
from unseg.deeplab import deeplab_from_bundle
from unseg.launch import relaunch_under_torchrun
from unseg.models.bundle import Preprocess, read_bundle
from unseg.models.resnet import resolve_backbone_weights
from unseg.train import harness as H
from unseg.train.deeplab_fit import fit_deeplab, write_deeplab_outputs


def main(args, params) -> None:
    deeplab, rounds = params.deeplab, params.self_training.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    args.ckpt.mkdir(parents=True, exist_ok=True)  # the scratch folder exists even when the round is off
    if args.round > rounds:
        off = json.dumps({"round": args.round, "trained": False}) + "\n"
        write_text(args.out / "round.json", off)
        write_text(args.ckpt / "round.json", off)  # no DIGEST: emptied when the round is turned on
        log("self_train", f"round {args.round} is off (self_training.rounds: {rounds})")
        return
    index = DatasetIndex.load(args.index)
    entries = index.split(params.data.train_split)
    previous = read_bundle(args.previous / "model.pt", "deeplab")
    device = H.resolve_device(deeplab.device)
    info = H.setup_distributed(device)
    labels, fine_tune = args.out / "labels.zarr", params.self_training.init == "previous"
    if info.is_main:
        teacher = deeplab_from_bundle(previous).to(device)
        size = Preprocess(**previous["preprocess"]).input_size
        maps = crf_label_maps(teacher, entries, device, size, amp=deeplab.amp)
        store.write_semantic(
            labels,
            np.array([e.id for e in entries]),
            [maps[e.id].astype(np.uint8) for e in entries],
            {"kind": f"CRF self-training labels, round {args.round}"},
        )
    H.barrier()
    model, ran, digest = fit_deeplab(
        deeplab,
        entries=entries,
        labels=labels,
        num_classes=previous["num_classes"],
        ckpt_dir=args.ckpt,
        log_path=args.ckpt / "loss.csv",
        device=device,
        info=info,
        init_weights=None
        if fine_tune
        else resolve_backbone_weights(deeplab.backbone_weights, args.hsg, "deeplab.backbone_weights"),
        init_model=args.previous / "model.pt" if fine_tune else None,
    )
    if not info.is_main:
        return
    log("self_train", f"round {args.round}: {ran} steps run now; predicting on {len(index.images)} images")
    write_deeplab_outputs(
        model, deeplab, index.images, args.out, num_classes=previous["num_classes"], digest=digest, device=device,
        kind=f"DeepLab-v3 predictions, CRF self-training round {args.round}",
    )  # fmt: skip
    shutil.copy(args.ckpt / "loss.csv", args.out / "loss.csv")
    write_text(args.out / "round.json", json.dumps({"round": args.round, "trained": True}) + "\n")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.self_train")
    ap = parser(__doc__, "index", "previous", "out")
    ap.add_argument("--round", type=int, required=True, help="this round's number, 1..3")
    ap.add_argument("--ckpt", type=Path, required=True, help="resumable scratch of this round's training")
    ap.add_argument("--hsg", type=Path, default=Path("artifacts/hsg/resnet.pth"), help="backbone_weights: hsg")
    run_stage("self_train", main, ap)
