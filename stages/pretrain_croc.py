"""pretrain_croc: the ViT that mask mining uses.

Reads: params ``backbone``, ``croc``; the image index. Writes: ``<out>`` (a checkpoint in the
official DINO training-checkpoint layout: ``teacher``/``student`` dicts of ``backbone.*`` weights).
When ``backbone.weights`` names a local checkpoint it is validated against ``backbone`` and
converted; otherwise (until CrOC training lands) a randomly initialised ViT is written.
"""

from __future__ import annotations

import torch

from unseg.cli import log, parser, run_stage
from unseg.models.vit import create_vit, load_vit_weights, save_dino_checkpoint


def main(args, params) -> None:
    b = params.backbone
    torch.manual_seed(params.croc.seed)
    model = create_vit(b.arch, b.patch_size, b.depth)
    if b.weights:
        load_vit_weights(model, b.weights, b.checkpoint_key)
        source = f"converted from {b.weights}"
    else:
        source = "random initialisation (placeholder: CrOC training not implemented yet)"
        log("pretrain_croc", "WARNING: writing a randomly initialised ViT; mined masks will be noise")
    save_dino_checkpoint(
        model, args.out, meta={"arch": b.arch, "patch_size": b.patch_size, "depth": b.depth, "source": source}
    )
    log("pretrain_croc", f"{args.out}: {source}")


if __name__ == "__main__":
    run_stage("pretrain_croc", main, parser(__doc__, "index", "out"))
