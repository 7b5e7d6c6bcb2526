"""The front half of the chain in memory (extract -> mine -> cluster) for small image sets.

The stages stream the same steps through Zarr stores; this composition serves baselines (e.g. the
random-init ViT in ``evaluate``) and tests, on at most a few thousand images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unseg import clustering
from unseg.data.index import ImageEntry, read_image
from unseg.data.transforms import Geometry
from unseg.features import geometries, iterate_batches, plan_batches, plan_order, run_vit
from unseg.mining import MiningConfig, mine_masks


@dataclass
class MinedImage:
    entry: ImageEntry
    geom: Geometry
    token_mask: np.ndarray  # (gh, gw) bool


@torch.no_grad()
def mine_images(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    short_side: int,
    fit: str,
    cfg: MiningConfig,
    device: torch.device,
    batch_size: int = 32,
) -> list[MinedImage]:
    """One mined token mask per image, in the order of ``entries``."""
    patch = int(model.patch_embed.patch_size[0])
    geoms = geometries(entries, short_side, patch, fit)
    order = plan_order(geoms)
    batches = plan_batches(geoms, order, batch_size)
    out: list[MinedImage | None] = [None] * len(entries)
    for k, images in iterate_batches(entries, geoms, order, batches):
        vo = run_vit(model, images, device)
        mined = mine_masks(vo.cls_logits, vo.patch_keys, vo.grid, cfg)
        for row, pos in enumerate(batches[k]):
            i = int(order[pos])
            out[i] = MinedImage(entries[i], geoms[i], mined.mask[row].view(vo.grid).cpu().numpy())
    return out  # type: ignore[return-value]


@dataclass
class LabelledMask:
    image_id: int
    pixel_mask: np.ndarray  # (H, W) bool at the original resolution
    cluster: int


def cluster_mined(
    model: torch.nn.Module,
    mined: Sequence[MinedImage],
    input_mode: str,
    k: int,
    seed: int,
    device: torch.device,
    whiten: bool = True,
    algorithm: str = "minibatch",
    upsample: str = "nearest",
    batch_size: int = 32,
) -> list[LabelledMask]:
    """K-means over the CLS features of the non-empty mined masks (empty masks are dropped)."""
    patch = int(model.patch_embed.patch_size[0])
    inputs, kept = [], []
    for m in mined:
        x, pixel_mask = clustering.mask_input(read_image(m.entry), m.token_mask, m.geom, input_mode, patch, upsample)
        if x is not None:
            inputs.append(x)
            kept.append((m.entry.id, pixel_mask))
    feats = clustering.cls_features(model, inputs, device, batch_size)
    km, _ = clustering.cluster_features(feats, k, seed, whiten, algorithm)
    return [LabelledMask(i, pm, int(c)) for (i, pm), c in zip(kept, km.labels, strict=True)]
