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
from unseg.features import forward_images, geometries
from unseg.mining import MiningConfig, mine_masks


@dataclass
class MinedImage:
    entry: ImageEntry
    geom: Geometry
    token_label: np.ndarray  # (gh, gw) uint8: 0 outside every mask, m inside the m-th
    bottom: bool = False  # mined from the least attended side of a_CLS

    @property
    def token_mask(self) -> np.ndarray:
        """(gh, gw) bool: inside any of the image's masks."""
        return self.token_label > 0

    def masks(self) -> list[np.ndarray]:
        """The image's token masks in mining order."""
        return [self.token_label == m for m in range(1, int(self.token_label.max(initial=0)) + 1)]


def mine_images(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    short_side: int,
    fit: str,
    cfg: MiningConfig,
    device: torch.device,
    batch_size: int = 32,
) -> list[MinedImage]:
    """The mined token masks of every image, in the order of ``entries``."""
    geoms = geometries(entries, short_side, int(model.patch_embed.patch_size[0]), fit)
    out: list[MinedImage | None] = [None] * len(entries)
    for batch in forward_images(model, entries, geoms, batch_size, device):
        vo = batch.out
        mined = mine_masks(vo.cls_logits, vo.patch_keys, vo.grid, cfg)
        for row, i in enumerate(batch.indices):
            label = mined.label[row].view(vo.grid).cpu().numpy()
            out[i] = MinedImage(entries[i], geoms[i], label, bool(mined.bottom[row]))
    return out  # type: ignore[return-value]


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
    kmeans_batch_size: int = 1000,
    background: int = 0,
) -> list[dict]:
    """K-means over one feature per non-empty mined mask: COCO annotations, category = cluster + 1
    (``background`` more clusters, dropped: :func:`unseg.clustering.assign_clusters`)."""

    def items():
        for m in mined:
            image = read_image(m.entry)
            for mask in m.masks():
                yield m.entry.id, image, mask, m.geom

    feats, anns = clustering.mask_features(model, items(), input_mode, device, batch_size, upsample)
    return clustering.assign_clusters(feats, anns, k, seed, whiten, algorithm, kmeans_batch_size, background)[2]
