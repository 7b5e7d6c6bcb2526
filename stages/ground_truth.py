"""ground_truth: the training split's ground truth in the pseudo-labels' format (supervised ceiling only).

Reads: params ``data.train_split``; the image index. Writes ``<out>/instances.json`` (COCO instances,
categories = ground-truth object classes 1..C) and ``<out>/semantic.zarr`` (labels 0..C, 0 = background),
the inputs ``distill_maskrcnn`` and ``train_deeplab`` take from ``pseudo_label`` and ``filter_confident``.
Part of ``ceiling/dvc.yaml``: it uses labels, so a plain ``dvc repro`` never runs it.
"""

from __future__ import annotations

from unseg import coco, store
from unseg.ceiling import ground_truth_instances, ground_truth_semantic
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex
from unseg.errors import UserError


def main(args, params) -> None:
    index = DatasetIndex.load(args.index)
    if not index.has_ground_truth:
        raise UserError(f"dataset {index.name!r} has no ground truth: there is no supervised ceiling to train")
    entries = index.split(params.data.train_split)
    ids, labels = ground_truth_semantic(index, entries)
    if not len(ids):
        raise UserError(f"no semantic ground truth in the training split {params.data.train_split!r}")
    instances = ground_truth_instances(index, entries)
    coco.write_json(instances, args.out / "instances.json")
    store.write_semantic(args.out / "semantic.zarr", ids, labels, {"kind": "ground truth", "background": 0})
    log("ground_truth", f"{len(ids)} label maps, {len(instances['annotations'])} instances -> {args.out}")


if __name__ == "__main__":
    run_stage("ground_truth", main, parser(__doc__, "index", "out"))
