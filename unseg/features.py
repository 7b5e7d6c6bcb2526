"""Batched, streamed ViT feature extraction for mask mining.

Images are ordered by their token grid so that a batch holds images of one canvas size (no
padding between images); the store keeps that order and an ``image_id`` per row. Memory is
bounded by a few batches whatever the dataset size; images are decoded one batch ahead of the model (in
DataLoader workers, or a thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
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


def plan_batches(
    geoms: Sequence[Geometry], order: np.ndarray, batch_size: int, start: int = 0, stop: int | None = None
) -> list[list[int]]:
    """Consecutive runs of ``order[start:stop]`` with one grid, cut to at most ``batch_size`` (positions in
    ``order``).

    ``start`` is where a resumed run picks up: any position, so a changed batch size resumes too; ``stop``
    ends a rank's share under ``torchrun``.
    """
    batches: list[list[int]] = []
    for pos, i in enumerate(order[start:stop], start):
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
    """Yield (batch number, (B, 3, h', w') tensor) from ``start_batch`` on, images decoded in ``workers``
    processes; with none, in a thread one batch ahead (decoding releases the GIL), so it overlaps the model."""
    ds = _Batches(entries, geoms, order, batches, transform or (lambda img, g, i: vit_input(img, g)))
    loader = DataLoader(ds, batch_size=None, sampler=range(start_batch, len(batches)), num_workers=workers)
    yield from (loader if workers else prefetched(loader))


def prefetched(iterable: Iterable, depth: int = 1) -> Iterator:
    """The items of ``iterable``, produced by a background thread at most ``depth`` items ahead of the consumer;
    an exception there is raised here, and a consumer that stops early stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer
            put((end, e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


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
    stop: int | None = None,
) -> Iterator[ForwardBatch]:
    """The ViT on every image, batched by token grid, in float32 (bf16 would change the signs that mining
    tests, so mined masks would depend on the device). Images are decoded in ``workers`` processes.
    ``start``, ``stop``: the positions of the grid-sorted order to run (from a resumed store's ``done``; to
    the end of a rank's share)."""
    order = plan_order(geoms)
    batches = plan_batches(geoms, order, batch_size, start, stop)
    for k, images in iterate_batches(entries, geoms, order, batches, 0, workers):
        positions = batches[k]
        out = forward_with_qk(model, images.to(device, non_blocking=True))
        yield ForwardBatch(k, positions, [int(order[p]) for p in positions], out)


def grids_in_order(geoms: Sequence[Geometry]) -> np.ndarray:
    """(N, 2) token grids in the grid-sorted order of :func:`plan_order` (the row order of features.zarr)."""
    return np.array([geoms[i].grid for i in plan_order(geoms)], np.int64)


def write_features(
    writer, model, entries: Sequence[ImageEntry], geoms: Sequence[Geometry], batch_size: int, device,
    workers: int, lo: int, hi: int, on_images: Callable[[int], object] = lambda n: None,
) -> None:  # fmt: skip
    """Positions ``lo + writer.done .. hi-1`` of the grid-sorted order through the ViT into ``writer``, a
    :func:`unseg.store.feature_writer` over exactly those ``hi - lo`` images (row 0 = position ``lo``).

    A batch is written (Zarr compression, which releases the GIL) in a thread while the next one runs
    through the ViT; at most one write is in flight, and the store counts a batch only once it is written,
    so an interrupted run resumes at the first batch not written. The writer buffers up to a shard per array
    (:class:`unseg.store.RaggedWriter`); on an exception (Ctrl-C included) what it holds is flushed first, so
    only a kill loses work, at most ``flush_every_s`` seconds of it."""
    grids = grids_in_order(geoms)
    pending, pending_images = None, 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for batch in forward_images(model, entries, geoms, batch_size, device, workers, lo + writer.done, hi):
                feats = batch_features(batch.out)
                values = {
                    "keys": feats.keys,
                    "cls_logits": feats.cls_logits,
                    "cls_token": feats.cls_token,
                    "grid": grids[batch.positions],
                    "input_size": np.array([geoms[i].resized for i in batch.indices], np.int32),
                    "image_id": np.array([entries[i].id for i in batch.indices], np.int64),
                }
                if pending is not None:
                    pending.result()  # in order, and a failed write stops the run here
                    on_images(pending_images)
                pending = pool.submit(writer.write, batch.positions[0] - lo, values)
                pending_images = len(batch.positions)
            if pending is not None:
                pending.result()
                on_images(pending_images)
        except BaseException:
            if pending is not None:
                wait([pending])  # the write in flight ends before the writer is flushed
            writer.flush()
            raise
