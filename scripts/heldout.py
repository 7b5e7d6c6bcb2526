"""Does the trained DeepLab generalise? ``unseg segment`` on embedded images that no stage saw, scored like Table 1.

    python scripts/heldout.py MODEL.pt [MODEL.pt ...] [--seed 7] [--n 120] [--out artifacts/metrics/heldout.json]

Generates ``--n`` images of the embedded dataset with ``data.seed`` = ``--seed`` (the profile's other ``data``
params; the pipeline trained and validated on ``data.seed``'s), segments them with each model through
``unseg.segment.segment`` and scores the label PNGs against their ground truth: Hungarian mIoU over the classes,
per model, then mean and std. A mean within a few points of Table 1's DeepLab row (its validation images were
never trained on either) says the model learned the classes, not the images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from unseg.data.images import read_image
from unseg.data.index import prepare_generated
from unseg.evaluation.report import score_label_maps
from unseg.models.bundle import read_bundle
from unseg.params import load_params
from unseg.segment import segment


def heldout_miou(model: Path, images: Path, index, out: Path) -> float:
    segment([images], out, model_path=model, device="cpu", formats=("label", "overlay"))
    n_pred = read_bundle(model, "deeplab")["num_classes"]
    pairs = ((np.asarray(Image.open(out / f"{Path(e.file).stem}.png")), index.read_semantic(e)) for e in index.images)
    return float(score_label_maps(pairs, n_pred, len(index.classes), index.ignore_index)["miou"])


def draw_sheet(index, segmented: Path, path: Path, n: int = 4) -> None:
    from unseg import figures

    panels = []
    for e in index.images[:n]:
        name = Path(e.file).stem
        panels += [
            figures.panel(read_image(e.file), f"held-out image {name}"),
            figures.panel(np.asarray(Image.open(segmented / f"{name}.overlay.jpg")), "unseg segment"),
            figures.panel(figures.colour(index.read_semantic(e)), "ground truth (own ids)"),
        ]
    figures.contact_sheet(panels, columns=3).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--seed", type=int, default=7, help="data.seed of the held-out images (not the profile's)")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--out", type=Path, default=Path("artifacts/metrics/heldout.json"))
    ap.add_argument("--sheet", type=Path, help="also draw the first model's first 4 images: input, overlay, truth")
    args = ap.parse_args()
    d = load_params("params.yaml").data
    if args.seed == d.seed:
        raise SystemExit(f"--seed {args.seed} is the profile's own data.seed: those images are not held out")
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = prepare_generated(
            tmp / "data",
            0,
            args.n,
            d.n_categories,
            d.max_instances,
            d.min_side,
            d.max_side,
            args.seed,
            palette=d.palette,
        )
        for i, model in enumerate(args.models):
            scores[str(model)] = heldout_miou(model, tmp / "data" / "images", index, tmp / f"out{i}")
            print(f"{model}: held-out mIoU {100 * scores[str(model)]:.1f}", flush=True)
        if args.sheet:
            draw_sheet(index, tmp / "out0", args.sheet)
    values = np.array(list(scores.values()))
    summary = {
        "data_seed": args.seed,
        "images": args.n,
        "per_model": scores,
        "miou_mean": float(values.mean()),
        "miou_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
