"""pseudo_label: a class for every mined mask by K-means over CLS features (MaskDistill Sec. 3.2).

Reads: params ``cluster``; the image index, the backbone checkpoint, ``features.zarr`` (geometry)
and ``masks.zarr``. Writes ``<out>/instances.json`` (COCO instances: one annotation per non-empty
mask, RLE at the original resolution, category = cluster + 1) and ``<out>/kmeans.npz`` (centres,
whitening std, the cluster of every mask). Cluster ids carry no ground truth unless the
reproduction flag ``cluster.align_to_gt`` is set.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from unseg import clustering, coco, store
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry
from unseg.errors import UserError
from unseg.models.vit import create_vit, load_vit_weights
from unseg.train.harness import resolve_device


def cluster_model(params, backbone_path):
    """The ViT whose CLS tokens are clustered: the mining ViT, or ``cluster.weights`` (paper: ViT-S/8)."""
    c, b = params.cluster, params.backbone
    if c.weights is None:
        model = create_vit(b.arch, b.patch_size, b.depth)
        load_vit_weights(model, backbone_path, "teacher")
    else:
        model = create_vit(c.arch or b.arch, c.patch_size or b.patch_size, c.depth or b.depth)
        load_vit_weights(model, c.weights, b.checkpoint_key)
    return model


def main(args, params) -> None:
    c = params.cluster
    device = resolve_device(c.device)
    index = DatasetIndex.load(args.index)
    by_id = index.by_id
    masks = store.RaggedStore(args.masks)
    feats_attrs = store.RaggedStore(args.features).attrs
    model = cluster_model(params, args.backbone).eval().to(device)
    patch = int(model.patch_embed.patch_size[0])
    mine_patch = int(feats_attrs["backbone"]["patch_size"])
    image_ids = masks.read("image_id")
    grids = masks.read("grid")
    token_masks = masks.read("token_mask")
    inputs, records = [], []
    for i, image_id in enumerate(tqdm(image_ids, desc="mask inputs", mininterval=1.0)):
        entry = by_id[int(image_id)]
        tm = token_masks[masks.offsets[i] : masks.offsets[i + 1]].reshape(grids[i])
        geom = geometry(entry.height, entry.width, feats_attrs["short_side"], mine_patch, feats_attrs["fit"])
        x, pixel_mask = clustering.mask_input(read_image(entry), tm, geom, c.input, patch, params.mining.upsample)
        if x is not None:
            inputs.append(x)
            records.append((int(image_id), pixel_mask))
    k = c.classes * c.overcluster
    if len(records) < k:
        raise UserError(
            f"only {len(records)} non-empty masks for k = {k} clusters; "
            "lower cluster.classes/overcluster or use more images"
        )
    feats = clustering.cls_features(model, inputs, device, c.batch_size)
    km, std = clustering.cluster_features(feats, k, c.seed, c.whiten, c.algorithm, c.kmeans_batch_size)
    labels = km.labels
    if c.align_to_gt:
        labels = _align_to_gt(index, records, labels, k)
    anns = [coco.annotation(n + 1, image_id, int(labels[n]) + 1, m) for n, (image_id, m) in enumerate(records)]
    out = {
        "images": [{"id": e.id, "file_name": e.file, "height": e.height, "width": e.width} for e in index.images],
        "annotations": anns,
        "categories": [{"id": j + 1, "name": f"cluster_{j}"} for j in range(k)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    coco.write_json(out, args.out / "instances.json")
    np.savez(
        args.out / "kmeans.npz",
        centers=km.centers,
        std=std,
        labels=labels,
        image_ids=np.array([r[0] for r in records]),
    )
    counts = np.bincount(labels, minlength=k)
    log("pseudo_label", f"{len(records)} masks in {k} clusters (sizes {counts.tolist()}) -> {args.out}")


def _align_to_gt(index, records, labels, k) -> np.ndarray:
    """Reproduction of the released code: relabel clusters with GT classes (object-level Hungarian on box IoU)."""
    from unseg.evaluation.metrics import hungarian_mapping, majority_mapping

    if not index.instances:
        raise UserError("cluster.align_to_gt needs ground-truth instances, which this dataset has not")
    gt = index._gt_instances
    n_cls = len(index.classes)
    votes = np.zeros((k, n_cls), np.int64)
    for (image_id, mask), lab in zip(records, labels, strict=True):
        box = coco.mask_bbox(mask)
        best = max(gt.get(image_id, []), key=lambda a: _box_iou(box, a["bbox"]), default=None)
        if best is not None:
            votes[lab, best["category_id"]] += 1
    mapping = hungarian_mapping(votes) if k <= n_cls else majority_mapping(votes)
    return np.where(mapping[labels] >= 0, mapping[labels] - 1, labels)


def _box_iou(a, b) -> float:
    ax1, ay1, ax2, ay2 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx1, by1, bx2, by2 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage("pseudo_label", main, parser(__doc__, "index", "backbone", "features", "masks", "out"))
