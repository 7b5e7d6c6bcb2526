"""prepare: materialise the dataset named in ``data`` and write the image index.

Reads: params ``data``. Writes: ``<out>/index.json`` (and, for the generated dataset, its images,
semantic maps and COCO instances json; other datasets are indexed in place, never copied).
"""

from __future__ import annotations

import shutil

from tqdm import tqdm

from unseg.cli import log, parser, run_stage
from unseg.data import index as data_index


def generate(d, out, progress=None) -> data_index.DatasetIndex:
    """The embedded dataset that the ``data`` params section ``d`` describes, written to ``out``."""
    return data_index.prepare_generated(
        out,
        d.n_train,
        d.n_val,
        d.n_categories,
        d.max_instances,
        d.min_side,
        d.max_side,
        d.seed,
        progress=progress,
        palette=d.palette,
    )


def main(args, params) -> None:
    d = params.data
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    splits = list(dict.fromkeys(s for s in (d.train_split, d.val_split) if s))  # one split for both: indexed once
    if d.dataset == "generated":
        idx = generate(d, out, progress=lambda it: tqdm(it, desc="generate", mininterval=1.0))
        if d.video_sequences:
            data_index.prepare_generated_video(
                out / "video", d.video_sequences, d.video_frames, d.max_side, d.max_side, d.n_categories, d.seed
            )
    elif d.dataset == "folder":
        idx = data_index.index_folder(d.root, d.limit)
    elif d.dataset == "coco":
        idx = data_index.index_coco(d.root, splits, out, d.limit)
    elif d.dataset == "voc":
        idx = data_index.index_voc(d.root, splits, d.limit)
    else:
        idx = data_index.index_camvid(d.root, splits, d.limit)
    idx.save(out / "index.json")
    counts = {s: len(idx.split(s)) for s in sorted({e.split for e in idx.images})}
    log("prepare", f"{d.dataset}: {counts} images; ground truth: {'yes' if idx.has_ground_truth else 'no'}")


if __name__ == "__main__":
    run_stage("prepare", main, parser(__doc__, "out"))
