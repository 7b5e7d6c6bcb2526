"""Batched, streamed ViT feature extraction for mask mining.

Images are ordered by their token grid so that a batch holds images of one canvas size (no
padding between images); the store keeps that order and an ``image_id`` per row. Memory is
bounded by one batch whatever the dataset size, and a DataLoader decodes images in workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unseg.data.index import ImageEntry, read_image
from unseg.data.transforms import Geometry, geometry, vit_input
from unseg.models.vit import ViTOutput, forward_with_qk


def plan_order(geoms: Sequence[Geometry]) -> np.ndarray:
    """Indices of images sorted by (grid, original index): images of one canvas size are adjacent."""
    keys = [(g.grid, i) for i, g in enumerate(geoms)]
    return np.array([i for _, i in sorted(keys)], dtype=np.int64)


def plan_batches(geoms: Sequence[Geometry], order: np.ndarray, batch_size: int, start: int = 0) -> list[list[int]]:
    """Consecutive runs of ``order[start:]`` with one grid, cut to at most ``batch_size`` (positions in ``order``).

    ``start`` is where a resumed run picks up: any position, so a changed batch size resumes too.
    """
    batches: list[list[int]] = []
    for pos, i in enumerate(order[start:], start):
        if batches and len(batches[-1]) < batch_size and geoms[order[batches[-1][0]]].grid == geoms[i].grid:
            batches[-1].append(pos)
        else:
            batches.append([pos])
    return batches


class _Batches(Dataset):
    def __init__(self, entries, geoms, order, batches, transform):
        self.entries, self.geoms, self.order, self.batches, self.transform = (
            entries,
            geoms,
            order,
            batches,
            transform,
        )

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        idx = [int(self.order[p]) for p in self.batches[b]]
        return b, torch.stack([self.transform(read_image(self.entries[i]), self.geoms[i], i) for i in idx])


def iterate_batches(
    entries: Sequence[ImageEntry],
    geoms: Sequence[Geometry],
    order: np.ndarray,
    batches: list[list[int]],
    start_batch: int = 0,
    workers: int = 0,
    transform: Callable[[np.ndarray, Geometry, int], torch.Tensor] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (batch number, (B, 3, h', w') tensor) from ``start_batch`` on, images decoded in workers."""
    ds = _Batches(entries, geoms, order, batches, transform or (lambda img, g, i: vit_input(img, g)))
    loader = DataLoader(ds, batch_size=None, sampler=range(start_batch, len(batches)), num_workers=workers)
    yield from loader


@dataclass
class BatchFeatures:
    """Numpy views of one batch, ready for the store (B images, N tokens each)."""

    keys: np.ndarray  # (B*N, D) float16
    cls_logits: np.ndarray  # (B*N, H) float32
    cls_token: np.ndarray  # (B, D) float32


def batch_features(out: ViTOutput) -> BatchFeatures:
    keys = out.patch_keys
    return BatchFeatures(
        keys=keys.reshape(-1, keys.shape[-1]).to(torch.float16).cpu().numpy(),
        cls_logits=out.cls_logits.reshape(-1, out.cls_logits.shape[-1]).float().cpu().numpy(),
        cls_token=out.cls_token.float().cpu().numpy(),
    )


def geometries(entries: Sequence[ImageEntry], short_side: int | None, patch: int, fit: str) -> list[Geometry]:
    return [geometry(e.height, e.width, short_side, patch, fit) for e in entries]


@dataclass
class ForwardBatch:
    number: int  # batch number in the plan
    positions: list[int]  # positions in the grid-sorted order (rows of a store written in that order)
    indices: list[int]  # indices into ``entries``
    out: ViTOutput


@torch.no_grad()
def forward_images(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    geoms: Sequence[Geometry],
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    start: int = 0,
) -> Iterator[ForwardBatch]:
    """The ViT on every image, batched by token grid, in float32 (bf16 would change the signs that mining
    tests, so mined masks would depend on the device). Images are decoded in ``workers`` processes.
    ``start``: the first position of the grid-sorted order to run (a resumed store's ``done``)."""
    order = plan_order(geoms)
    batches = plan_batches(geoms, order, batch_size, start)
    for k, images in iterate_batches(entries, geoms, order, batches, 0, workers):
        positions = batches[k]
        out = forward_with_qk(model, images.to(device, non_blocking=True))
        yield ForwardBatch(k, positions, [int(order[p]) for p in positions], out)
