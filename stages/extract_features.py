"""extract_features: one ViT forward pass per image; keep what mask mining needs.

Reads: params ``backbone``, ``features``; the image index; the backbone checkpoint. Writes
``features.zarr`` (see unseg/store.py): last-block patch keys (float16, concatenated over heads),
raw per-head CLS logits q_CLS(h)·k_j(h), the CLS token, token grids. Every mining param works on
these, so no mining param forces re-extraction. Batched, streamed, resumable after an interrupt.
"""

from __future__ import annotations

import numpy as np
import torch

from unseg import features as F
from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.models.vit import create_vit, load_vit_weights
from unseg.progress import progress
from unseg.train.harness import file_digest, params_digest, resolve_device


def main(args, params) -> None:
    b, fp = params.backbone, params.features
    device = resolve_device(fp.device)
    index = DatasetIndex.load(args.index)
    model = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    load_vit_weights(model, args.backbone)
    model.eval().to(device)
    entries = index.images
    geoms = F.geometries(entries, fp.short_side, b.patch_size, fp.fit)
    order = F.plan_order(geoms)
    grids = np.array([geoms[i].grid for i in order], np.int64)
    attrs = {
        "backbone": {"arch": b.arch, "patch_size": b.patch_size, "depth": b.depth},
        "short_side": fp.short_side,
        "fit": fp.fit,
        "heads": model.blocks[-1].attn.num_heads,
        "dataset": index.name,
    }
    digest = params_digest(
        b.arch,
        b.patch_size,
        b.depth,
        fp.short_side,
        fp.fit,
        file_digest(args.backbone),
        [(e.id, e.file) for e in entries],
    )
    writer = store.feature_writer(args.out, grids, model.embed_dim, attrs["heads"], attrs, digest)
    if writer.done:
        log("extract_features", f"resuming after {writer.done} of {len(entries)} images")
    bar = progress(total=len(entries), initial=writer.done, desc="extract", unit="img")
    for batch in F.forward_images(model, entries, geoms, fp.batch_size, device, fp.workers, writer.done):
        feats = F.batch_features(batch.out)
        writer.write(
            batch.positions[0],
            {
                "keys": feats.keys,
                "cls_logits": feats.cls_logits,
                "cls_token": feats.cls_token,
                "grid": grids[batch.positions],
                "input_size": np.array([geoms[i].resized for i in batch.indices], np.int32),
                "image_id": np.array([entries[i].id for i in batch.indices], np.int64),
            },
        )
        bar.update(len(batch.positions))
    bar.close()
    writer.finalize()
    log("extract_features", f"{len(entries)} images, {int(writer.offsets[-1])} tokens -> {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage("extract_features", main, parser(__doc__, "index", "backbone", "out"))
