"""pseudo_label: a class for every mined mask by K-means over CLS features (MaskDistill Sec. 3.2).

Reads: params ``cluster`` (and ``mining.upsample``, ``backbone``); the image index, the backbone
checkpoint, ``features.zarr`` (geometry attributes) and ``masks.zarr``. Writes
``<out>/instances.json`` (COCO instances: one annotation per non-empty mask, RLE at the original
resolution, ``category_id`` = cluster + 1; with ``cluster.background_clusters`` the masks of the clusters on the
image border are left out) and ``<out>/kmeans.npz`` (centres, whitening std, the category of every mask, -1
for a dropped one). Cluster ids carry no ground truth unless the reproduction flag
``cluster.align_to_gt`` is set. Inputs are streamed: memory holds one batch of images.
"""

from __future__ import annotations

import numpy as np
import torch

from unseg import clustering, coco, store
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.errors import UserError
from unseg.launch import relaunch_under_torchrun
from unseg.pseudo_labels import cluster_model, gather_mask_features, mined_items
from unseg.train.harness import resolve_device, setup_distributed


def main(args, params) -> None:
    c = params.cluster
    device = resolve_device(c.device)
    index = DatasetIndex.load(args.index)
    masks = store.RaggedStore(args.masks)
    attrs = store.RaggedStore(args.features).attrs
    model = cluster_model(params.cluster, params.backbone, args.backbone).eval().to(device)
    info = setup_distributed(device)  # under torchrun each rank computes the features of a share of images
    rows = range(*store.shard_bounds(len(masks), info.rank, info.world_size))
    items = mined_items(index, masks, attrs, rows)
    gathered = gather_mask_features(
        *clustering.mask_features(model, items, c.input, device, c.batch_size, params.mining.upsample), info
    )
    if gathered is None:
        return
    feats, anns = gathered
    k = c.classes * c.overcluster
    if len(anns) < k + c.background_clusters:
        raise UserError(
            f"only {len(anns)} non-empty masks for k = {k + c.background_clusters} clusters; "
            "lower cluster.classes/overcluster/background_clusters or use more images"
        )
    ids = np.array([a["image_id"] for a in anns])  # of every mask, as kmeans.npz's labels
    km, std, anns = clustering.assign_clusters(
        feats, anns, k, c.seed, c.whiten, c.algorithm, c.kmeans_batch_size, c.background_clusters
    )
    if c.align_to_gt:
        if not index.instances:
            raise UserError("cluster.align_to_gt needs ground-truth instances, which this dataset has not")
        anns = clustering.align_to_ground_truth(anns, index.gt_instances, k, len(index.classes) - 1)
        log("pseudo_label", "cluster.align_to_gt: cluster ids replaced by ground-truth classes (reproduction only)")
    out = {
        "images": [{"id": e.id, "file_name": e.file, "height": e.height, "width": e.width} for e in index.images],
        "annotations": anns,
        "categories": [{"id": j + 1, "name": f"cluster_{j}"} for j in range(k)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    coco.write_json(out, args.out / "instances.json")
    np.savez(args.out / "kmeans.npz", centers=km.centers, std=std, labels=km.labels, image_ids=ids)
    counts = np.bincount(km.labels[km.labels >= 0], minlength=k)
    dropped = f", {len(ids) - len(anns)} in background clusters dropped" if c.background_clusters else ""
    log("pseudo_label", f"{len(anns)} masks in {k} clusters (sizes {counts.tolist()}){dropped} -> {args.out}")


if __name__ == "__main__":
    relaunch_under_torchrun("stages.pseudo_label")
    torch.set_grad_enabled(False)
    run_stage("pseudo_label", main, parser(__doc__, "index", "backbone", "features", "masks", "out"))
