"""extract_features: one ViT forward pass per image; keep what mask mining needs.

Reads: params ``backbone``, ``features``; the image index; the backbone checkpoint. Writes
``features.zarr`` (see unseg/store.py): last-block patch keys (float16, concatenated over heads),
raw per-head CLS logits q_CLS(h)·k_j(h), the CLS token, token grids. Every mining param works on
these, so no mining param forces re-extraction. Batched, streamed, resumable after an interrupt.
Under ``torchrun`` (any number of processes and nodes) rank r extracts a contiguous share of the
images into its own shard store (resumable too); rank 0 then merges the shards into ``<out>``.
"""

from __future__ import annotations

import torch

from unseg import features as F
from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.launch import relaunch_under_torchrun
from unseg.models.vit import create_vit, load_vit_weights
from unseg.progress import progress
from unseg.train.harness import barrier, file_digest, params_digest, resolve_device, setup_distributed


def main(args, params) -> None:
    b, fp = params.backbone, params.features
    device = resolve_device(fp.device)
    index = DatasetIndex.load(args.index)
    model = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
    load_vit_weights(model, args.backbone)
    model.eval().to(device)
    entries = index.images
    geoms = F.geometries(entries, fp.short_side, b.patch_size, fp.fit)
    grids = F.grids_in_order(geoms)
    attrs = {
        "backbone": {"arch": b.arch, "patch_size": b.patch_size, "depth": b.depth},
        "short_side": fp.short_side,
        "fit": fp.fit,
        "heads": model.blocks[-1].attn.num_heads,
        "dataset": index.name,
    }
    files = [(e.id, e.file) for e in entries]
    digest = params_digest(b.arch, b.patch_size, b.depth, fp.short_side, fp.fit, file_digest(args.backbone), files)
    info = setup_distributed(device)
    lo, hi = store.shard_bounds(len(entries), info.rank, info.world_size)
    path = args.out if info.world_size == 1 else store.shard_path(args.out, info.rank, info.world_size)
    if not store.is_finished(path, digest, hi - lo):  # a rank's finished shard survives an interrupted merge
        writer = store.feature_writer(path, grids[lo:hi], model.embed_dim, attrs["heads"], attrs, digest)
        if writer.done:
            log("extract_features", f"resuming after {writer.done} of {hi - lo} images")
        bar = progress(total=hi - lo, initial=writer.done, desc="extract", unit="img")
        F.write_features(writer, model, entries, geoms, fp.batch_size, device, fp.workers, lo, hi, bar.update)
        bar.close()
        writer.finalize()
    if info.world_size > 1:
        barrier()
        if not info.is_main:
            return
        specs = store.feature_specs(model.embed_dim, attrs["heads"])
        store.merge_shards(args.out, grids[:, 0] * grids[:, 1], specs, attrs, digest, info.world_size)
    log("extract_features", f"{len(entries)} images, {int(grids.prod(1).sum())} tokens -> {args.out}")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.extract_features")
    torch.set_grad_enabled(False)
    run_stage("extract_features", main, parser(__doc__, "index", "backbone", "out"))
