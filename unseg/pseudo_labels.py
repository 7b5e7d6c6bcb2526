"""The inputs of pseudo-labelling: the ViT whose CLS tokens are clustered, and the mined masks of a run
streamed with their images (one image decoded at a time)."""

from __future__ import annotations

import numpy as np
import torch

from unseg import store
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry
from unseg.models.vit import create_vit, load_vit_weights
from unseg.progress import progress


def cluster_model(c, b, backbone_path) -> torch.nn.Module:
    """The ViT whose CLS tokens are clustered (params sections ``cluster`` = c, ``backbone`` = b): the mining
    ViT at ``backbone_path``, or ``cluster.weights`` (paper: a ViT-S/8)."""
    if c.weights is None:
        model = create_vit(b.arch, b.patch_size, b.depth, stem=b.stem)
        load_vit_weights(model, backbone_path, "teacher")
    else:
        model = create_vit(c.arch or b.arch, c.patch_size or b.patch_size, c.depth or b.depth)
        load_vit_weights(model, c.weights, b.checkpoint_key)
    return model


def mined_items(index: DatasetIndex, masks: store.RaggedStore, attrs: dict, rows: range | None = None):
    """(image id, image, token mask, mining geometry) for every mask of ``masks.zarr`` (of the store rows
    ``rows``: a rank's share under torchrun), in store order (an image's masks in their mining order)."""
    by_id = index.by_id
    grids = masks.read("grid")
    token_labels = masks.read("token_label")
    image_ids = masks.read("image_id")
    patch = int(attrs["backbone"]["patch_size"])
    for i in progress(rows if rows is not None else range(len(image_ids)), desc="mask features"):
        e = by_id[int(image_ids[i])]
        geom = geometry(e.height, e.width, attrs["short_side"], patch, attrs["fit"])
        labels = token_labels[masks.offsets[i] : masks.offsets[i + 1]].reshape(grids[i])
        image = read_image(e)
        for m in range(1, int(labels.max(initial=0)) + 1):
            yield e.id, image, labels == m, geom


def gather_mask_features(feats: np.ndarray, anns: list[dict], info) -> tuple[np.ndarray, list[dict]] | None:
    """Every rank's (features, annotations) on rank 0, in rank order, annotation ids renumbered 1..M (the
    order and ids of a single process); None on the other ranks. No-op without a process group."""
    if info.world_size == 1:
        return feats, anns
    shares = [None] * info.world_size
    torch.distributed.all_gather_object(shares, (feats, anns))
    if not info.is_main:
        return None
    feats = np.concatenate([f for f, _ in shares])
    anns = [a for _, share in shares for a in share]
    for i, a in enumerate(anns, 1):
        a["id"] = i
    return feats, anns
