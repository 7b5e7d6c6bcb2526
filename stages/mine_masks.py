"""mine_masks: one object mask per image from the stored last-block q/k (MaskDistill Sec. 3.2).

Reads: params ``mining``; ``features.zarr``. Writes ``masks.zarr``: a token mask aligned row-for-row
with the features, and the source token of each image. Images sharing a token grid are mined
together as one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.errors import UserError
from unseg.memory import trim_heap
from unseg.mining import MiningConfig, mine_masks
from unseg.params import config_from
from unseg.progress import progress


def grid_runs(grids: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive images with the same grid, at most ``batch_size`` long."""
    runs, start = [], 0
    for i in range(1, len(grids) + 1):
        if i == len(grids) or not np.array_equal(grids[i], grids[start]) or i - start == batch_size:
            runs.append((start, i))
            start = i
    return runs


def main(args, params) -> None:
    m = params.mining
    cfg = config_from(MiningConfig, m)
    feats = store.RaggedStore(args.features)
    heads = int(feats.attrs["heads"])
    if m.heads is not None and m.heads > heads:
        raise UserError(f"params.yaml: mining.heads = {m.heads}: the backbone has only {heads} heads")
    grids = feats.read("grid")
    token_label = np.zeros(int(feats.offsets[-1]), np.uint8)
    source = np.zeros(len(feats), np.int64)
    bottom = np.zeros(len(feats), bool)
    for start, stop in progress(grid_runs(grids, m.batch_size), desc="mine"):
        grid = tuple(int(v) for v in grids[start])
        n = grid[0] * grid[1]
        keys = torch.from_numpy(feats.span("keys", start, stop)).view(stop - start, n, -1)
        logits = torch.from_numpy(feats.span("cls_logits", start, stop)).view(stop - start, n, -1)
        mined = mine_masks(logits, keys, grid, cfg)
        token_label[feats.offsets[start] : feats.offsets[stop]] = mined.label.reshape(-1).numpy()
        source[start:stop] = mined.source.numpy()
        bottom[start:stop] = mined.bottom.numpy()
        trim_heap()  # the batch's freed keys back to the OS, or peak RSS grows with the number of batches
    attrs = {**feats.attrs, "mining": vars(cfg)}
    attrs.pop("images_done", None)
    attrs.pop("digest", None)
    store.write_masks(args.out, feats, token_label, source, bottom, attrs)
    starts = feats.offsets[:-1]
    covered = np.add.reduceat(token_label > 0, starts) / np.diff(feats.offsets)
    n_masks = np.maximum.reduceat(token_label, starts)  # rounds after an empty one are empty too
    log(
        "mine_masks",
        f"{int(n_masks.sum())} masks on {len(feats)} images, covering {covered.mean():.1%} of an image on average, "
        f"{bottom.mean():.0%} from the least attended side -> {args.out}",
    )


if __name__ == "__main__":
    run_stage("mine_masks", main, parser(__doc__, "features", "out"))
