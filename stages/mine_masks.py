"""mine_masks: one object mask per image from the stored last-block q/k (MaskDistill Sec. 3.2).

Reads: params ``mining``; ``features.zarr``. Writes ``masks.zarr``: a token mask aligned row-for-row
with the features, and the source token of each image. Images sharing a token grid are mined
together as one batch.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from unseg import store
from unseg.cli import log, parser, run_stage
from unseg.errors import UserError
from unseg.mining import MiningConfig, mine_masks


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
    cfg = MiningConfig(m.heads, m.cls_mass, m.topk_fraction, m.keep_component, m.proposals)
    feats = store.RaggedStore(args.features)
    heads = int(feats.attrs["heads"])
    if m.heads is not None and m.heads > heads:
        raise UserError(f"params.yaml: mining.heads = {m.heads}: the backbone has only {heads} heads")
    grids = feats.read("grid")
    token_mask = np.zeros(int(feats.offsets[-1]), bool)
    source = np.zeros(len(feats), np.int64)
    for start, stop in tqdm(grid_runs(grids, m.batch_size), desc="mine", mininterval=1.0):
        grid = tuple(int(v) for v in grids[start])
        n = grid[0] * grid[1]
        keys = torch.from_numpy(feats.span("keys", start, stop)).view(stop - start, n, -1)
        logits = torch.from_numpy(feats.span("cls_logits", start, stop)).view(stop - start, n, -1)
        mined = mine_masks(logits, keys, grid, cfg)
        token_mask[feats.offsets[start] : feats.offsets[stop]] = mined.mask.reshape(-1).numpy()
        source[start:stop] = mined.source.numpy()
    attrs = {
        **feats.attrs,
        "mining": {k: getattr(m, k) for k in ("heads", "cls_mass", "topk_fraction", "keep_component", "proposals")},
    }
    attrs.pop("images_done", None)
    attrs.pop("digest", None)
    store.write_masks(args.out, feats, token_mask, source, attrs)
    sizes = np.add.reduceat(token_mask, feats.offsets[:-1]) / np.diff(feats.offsets)
    log("mine_masks", f"{len(feats)} masks, mean area {sizes.mean():.1%} of the image -> {args.out}")


if __name__ == "__main__":
    run_stage("mine_masks", main, parser(__doc__, "features", "out"))
