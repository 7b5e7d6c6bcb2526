"""prepare: materialise the dataset named in ``data`` and write the image index.

Reads: params ``data``. Writes: ``<out>/index.json`` (and, for the generated dataset, its images,
semantic maps and COCO instances json; other datasets are indexed in place, never copied) and
``<out>/skipped.json``: the images of a real dataset that do not fully decode, whose shorter side is
below MIN_SIDE pixels or that are over the pixel and aspect budget, each skipped with one warning line
(unseg/data/images.py states the reading rules), and the files of a folder that are not images, named.
"""

from __future__ import annotations

import json
import shutil

from unseg.cli import log, parser, run_stage, write_text
from unseg.data import index as data_index
from unseg.progress import progress

MIN_SIDE = 16  # px: a shorter image side is skipped (features.short_side's lower bound)


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
        idx = generate(d, out, progress=lambda it: progress(it, desc="generate"))
        if d.video_sequences:
            data_index.prepare_generated_video(
                out / "video", d.video_sequences, d.video_frames, d.max_side, d.max_side, d.n_categories, d.seed
            )
    elif d.dataset == "folder":
        idx = data_index.index_folder(d.root, d.limit, d.train_split, d.val_split, d.folder_val_fraction)
    elif d.dataset == "coco":
        idx = data_index.index_coco(d.root, splits, out, d.limit)
    elif d.dataset == "voc":
        idx = data_index.index_voc(d.root, splits, d.limit)
    else:
        idx = data_index.index_camvid(d.root, splits, d.limit)
    skipped: dict[str, str] = {}
    ignored = data_index.not_images(d.root) if d.dataset == "folder" else []
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        log("prepare", f"warning: {len(ignored)} files under data.root are not images and are ignored: {shown}")
    if d.dataset != "generated":
        idx, skipped = data_index.drop_unreadable(idx, MIN_SIDE)
        for file, reason in skipped.items():
            log("prepare", f"warning: skipping {file}: {reason}")
    listing = {"count": len(skipped), "images": skipped, "not_images": ignored}
    write_text(out / "skipped.json", json.dumps(listing, indent=2) + "\n")
    idx.save(out / "index.json")
    counts = {s: len(idx.split(s)) for s in sorted({e.split for e in idx.images})}
    gt = "yes" if idx.has_ground_truth else "no"
    log("prepare", f"{d.dataset}: {counts} images ({len(skipped)} skipped); ground truth: {gt}")


if __name__ == "__main__":
    run_stage("prepare", main, parser(__doc__, "out"))
