"""``unseg inspect``: what each stage of a run wrote, without writing Zarr or pycocotools code.

    unseg inspect                          # every artifact: stage, up to date, size, files, images
    unseg inspect PATH                     # one store, COCO json or checkpoint: arrays, attributes, stats
    unseg inspect show IMAGE_ID [-o F.png] # that image at every stage, one labelled panel each
    unseg inspect grid [--n 8] [--sort worst|best|random] [-o F.png]  # one row of panels per image

Run from the project root (``python -m unseg inspect`` works too). Stores are read through
:mod:`unseg.store`, one image's rows at a time; a missing artifact names the stage that writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from unseg import coco, store
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry, token_map_to_pixels, token_mask_to_pixels
from unseg.errors import UserError
from unseg.matching import ConfusionAccumulator, hungarian_mapping
from unseg.models.checkpoint import read_checkpoint
from unseg.params import load_params

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]],
    np.uint8,
)  # fmt: skip
PANEL, TITLE = 192, 16  # panel side and title band, px


def colour(labels: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) colours: 0 black, id i the i-th palette colour (cycled), 255 grey (ignored)."""
    labels = np.asarray(labels, np.int64)
    out = PALETTE[np.where(labels == 0, 0, 1 + (labels - 1) % (len(PALETTE) - 1))]
    out[labels == 255] = (128, 128, 128)
    return out


# ---------------------------------------------------------------- the artifact table


def pipeline_outs(root: Path) -> list[tuple[str, str]]:
    """(path, stage) of every out and metric of both pipelines."""
    found = []
    for name in ("dvc.yaml", "ceiling/dvc.yaml"):
        if not (root / name).is_file():
            continue
        prefix = "" if name == "dvc.yaml" else f"{name}:"
        for stage, spec in yaml.safe_load((root / name).read_text())["stages"].items():
            for key in ("outs", "metrics", "plots"):
                for out in spec.get(key, []):
                    found.append((next(iter(out)) if isinstance(out, dict) else out, prefix + stage))
    return found


def stale_stages(root: Path) -> set[str] | None:
    """Stages ``dvc status`` reports as changed (None when DVC cannot say)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        return None
    status = json.loads(proc.stdout or "{}")
    return {k for k, v in status.items() if v != ["always changed"]}


def disk_usage(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def artifact_rows(root: Path, stale: set[str] | None) -> list[dict]:
    rows = []
    for rel, stage in pipeline_outs(root):
        path = root / rel
        size, files = disk_usage(path) if path.exists() else (0, 0)
        images = None
        if path.exists() and path.suffix == ".zarr":
            images = len(store.RaggedStore(path))
        state = "missing" if not path.exists() else "?" if stale is None else "stale" if stage in stale else "ok"
        rows.append({"path": rel, "stage": stage, "state": state, "mb": size / 2**20, "files": files, "images": images})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'path':44} {'stage':34} {'state':8} {'MB':>9} {'files':>6} {'images':>7}"]
    for r in rows:
        images = "" if r["images"] is None else str(r["images"])
        lines.append(f"{r['path']:44} {r['stage']:34} {r['state']:8} {r['mb']:9.2f} {r['files']:6d} {images:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------- one artifact


def describe_store(path: Path) -> str:
    s = store.RaggedStore(path)
    lines = [f"{path}: Zarr store, {len(s)} images", f"attributes: {json.dumps(s.attrs, default=str)[:400]}"]
    for name in sorted(s.group.array_keys()):
        a = s[name]
        lines.append(f"  {name:12} shape {tuple(a.shape)} {a.dtype} chunks {tuple(a.chunks)}")
    per_image = np.diff(s.offsets)
    lines.append(f"rows per image: min {per_image.min()} mean {per_image.mean():.1f} max {per_image.max()}")
    if "token_mask" in s:
        area = [float(s.rows("token_mask", i).mean()) for i in range(len(s))]
        lines.append(f"mined mask area (share of the token grid): mean {np.mean(area):.3f}, min {min(area):.3f}")
    if "label" in s:
        counts = np.bincount(s.read("label").astype(np.int64), minlength=256)
        shares = {int(i): round(float(c / counts.sum()), 4) for i, c in enumerate(counts) if c}
        lines.append(f"label shares: {shares}")
    return "\n".join(lines)


def describe_json(path: Path) -> str:
    data = coco.read_json(path)
    if isinstance(data, list):  # COCO results
        scores = np.array([p["score"] for p in data]) if data else np.zeros(0)
        images = len({p["image_id"] for p in data})
        hist = np.histogram(scores, np.linspace(0, 1, 11))[0].tolist()
        return f"{path}: COCO results, {len(data)} predictions on {images} images; score histogram (0.1 bins) {hist}"
    if "annotations" in data:
        per_cat = {}
        for a in data["annotations"]:
            per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
        return (
            f"{path}: COCO instances, {len(data['images'])} images, {len(data['annotations'])} annotations, "
            f"{len(data.get('categories', []))} categories; annotations per category {dict(sorted(per_cat.items()))}"
        )
    return f"{path}: json with keys {sorted(data)[:20]}"


def describe_checkpoint(path: Path) -> str:
    ckpt = read_checkpoint(path, "checkpoint")
    lines = [f"{path}: torch checkpoint, keys {sorted(ckpt)[:12]}"]
    if isinstance(ckpt.get("meta"), dict):
        lines.append(f"provenance: {json.dumps(ckpt['meta'], default=str)[:400]}")
    for key in ("teacher", "model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            tensors = [v for v in ckpt[key].values() if hasattr(v, "numel")]
            lines.append(f"{key}: {len(tensors)} tensors, {sum(t.numel() for t in tensors) / 1e6:.2f} M parameters")
    return "\n".join(lines)


def describe(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: not found (run `dvc repro` to write it)")
    if path.suffix == ".zarr" or (path / "zarr.json").exists():
        return describe_store(path)
    if path.suffix == ".json":
        return describe_json(path)
    if path.suffix in (".pt", ".pth"):
        return describe_checkpoint(path)
    raise UserError(f"{path}: not a store, COCO json or checkpoint")


# ---------------------------------------------------------------- one image at every stage


def store_row(path: Path, image_id: int, stage: str) -> tuple[store.RaggedStore, int]:
    if not path.exists():
        raise UserError(f"{path}: missing; run `dvc repro {stage}`")
    s = store.RaggedStore(path)
    rows = np.flatnonzero(s.read("image_id") == image_id)
    if not len(rows):
        raise UserError(f"image {image_id} is not in {path}")
    return s, int(rows[0])


def cluster_mapping(root: Path, index: DatasetIndex, split: str | None, limit: int = 200) -> np.ndarray | None:
    """Cluster id -> ground-truth class (-1: unmatched) by the Hungarian match of DeepLab's predictions on
    up to ``limit`` validation images, as Table 1 scores them; None without ground truth or predictions."""
    path = root / "artifacts/deeplab/predictions.zarr"
    labelled = [e for e in index.images if e.split == split and (e.semantic or index.semantic_from_instances)][:limit]
    if not path.exists() or not labelled:
        return None
    s = store.RaggedStore(path)
    row_of = {int(i): r for r, i in enumerate(s.read("image_id"))}
    maps = [(store.read_semantic_map(s, row_of[e.id]), index.read_semantic(e)) for e in labelled if e.id in row_of]
    n_pred = 1 + max(int(m.max()) for m, _ in maps)
    acc = ConfusionAccumulator(n_pred, len(index.classes), index.ignore_index)
    for pred, gt in maps:
        acc.update(pred, gt)
    return hungarian_mapping(acc.matrix)


def as_classes(labels: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    """Cluster ids shown in class colours (unmatched: grey); unchanged without a mapping."""
    if mapping is None:
        return labels
    lut = np.full(max(int(labels.max()) + 1, len(mapping)), 255, np.int64)
    lut[: len(mapping)] = np.where(mapping >= 0, mapping, 255)
    lut[255:] = 255
    return lut[np.asarray(labels, np.int64)]


def legend(names: Sequence[str]) -> Image.Image:
    out = Image.new("RGB", (PANEL, PANEL + TITLE), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((3, 2), "classes (clusters matched)", fill=(0, 0, 0))
    for i, name in enumerate(list(names)[:12]):
        y = TITLE + 4 + i * 15
        draw.rectangle([4, y, 16, y + 10], fill=tuple(int(c) for c in colour(np.array([[i]]))[0, 0]))
        draw.text((22, y), name, fill=(0, 0, 0))
    y = TITLE + 4 + min(len(names), 12) * 15
    draw.rectangle([4, y, 16, y + 10], fill=(128, 128, 128))
    draw.text((22, y), "unmatched / ignored", fill=(0, 0, 0))
    return out


def panel(picture: np.ndarray, title: str) -> Image.Image:
    im = Image.fromarray(np.asarray(picture, np.uint8))
    scale = PANEL / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    out = Image.new("RGB", (PANEL, PANEL + TITLE), (255, 255, 255))
    out.paste(im, ((PANEL - im.width) // 2, TITLE + (PANEL - im.height) // 2))
    ImageDraw.Draw(out).text((3, 2), title, fill=(0, 0, 0))
    return out


def blank() -> Image.Image:
    return Image.new("RGB", (PANEL, PANEL + TITLE), (255, 255, 255))


def blend(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shown = colour(labels).astype(np.float32)
    keep = (np.asarray(labels) == 0)[..., None]
    return np.where(keep, image * 0.35, 0.45 * image + 0.55 * shown).astype(np.uint8)


def stage_panels(root: Path, image_id: int, index: DatasetIndex, mapping: np.ndarray | None) -> list[Image.Image]:
    """The panels of one image: input, CLS attention, mined mask, pseudo-label, Mask R-CNN, filtered
    pseudo-GT, DeepLab, ground truth (the ones whose artifact exists). With a ``mapping`` the cluster
    panels are drawn in the colours of their matched classes, as the ground truth is."""
    if image_id not in index.by_id:
        raise UserError(f"image {image_id} is not in the index (ids {index.images[0].id}..{index.images[-1].id})")
    e = index.by_id[image_id]
    image = read_image(e)
    panels = [panel(image, f"image {image_id} ({e.split})")]
    feats, fi = store_row(root / "artifacts/features.zarr", image_id, "extract_features")
    a = feats.attrs
    geom = geometry(e.height, e.width, a["short_side"], a["backbone"]["patch_size"], a["fit"])
    grid = tuple(feats.read("grid")[fi])
    attn = feats.rows("cls_logits", fi).mean(1).reshape(grid)
    attn = (attn - attn.min()) / max(float(np.ptp(attn)), 1e-8)
    heat = token_map_to_pixels((attn * 255).astype(np.uint8), geom)
    panels.append(panel(np.stack([heat, heat // 3, 255 - heat], -1), "CLS attention a_CLS"))
    masks, mi = store_row(root / "artifacts/masks.zarr", image_id, "mine_masks")
    mined = token_mask_to_pixels(masks.rows("token_mask", mi).reshape(grid), geom)
    side = "bottom" if "bottom" in masks and masks.read("bottom")[mi] else "top"
    highlight = np.where(mined[..., None], 0.45 * image + 0.55 * 255, 0.35 * image).astype(np.uint8)
    panels.append(panel(highlight, f"mined mask ({side})"))  # white: a mask, not a class
    pseudo = coco.read_json(root / "artifacts/pseudo_labels/instances.json")
    label = np.zeros(mined.shape, np.int64)
    for ann in coco.group_by_image(pseudo["annotations"]).get(image_id, []):
        label[coco.decode_rle(ann["segmentation"])] = ann["category_id"]
    panels.append(panel(blend(image, as_classes(label, mapping)), "pseudo-label cluster"))
    preds_path = root / "artifacts/maskrcnn/predictions.json"
    if preds_path.exists():
        preds = sorted(coco.group_by_image(coco.read_json(preds_path)).get(image_id, []), key=lambda p: p["score"])
        shown = np.zeros(mined.shape, np.int64)
        for p in (p for p in preds if p["score"] >= 0.5):
            shown[coco.decode_rle(p["segmentation"])] = p["category_id"]
        best = ", ".join(f"{p['score']:.2f}" for p in preds[::-1][:3])
        panels.append(panel(blend(image, as_classes(shown, mapping)), f"Mask R-CNN >= 0.5 ({best})"))
    for rel, title, stage in (
        ("artifacts/semantic.zarr", "filtered pseudo-GT", "filter_confident"),
        ("artifacts/deeplab/predictions.zarr", "DeepLab-v3", "train_deeplab"),
    ):
        if (root / rel).exists():
            s, r = store_row(root / rel, image_id, stage)
            panels.append(panel(blend(image, as_classes(store.read_semantic_map(s, r), mapping)), title))
    if e.semantic or index.semantic_from_instances:
        gt = index.read_semantic(e)
        panels.append(panel(blend(image, np.where(gt == index.ignore_index, 255, gt)), "ground truth"))
    return panels


def image_scores(root: Path, index: DatasetIndex, mapping: np.ndarray, split: str | None) -> dict[int, float]:
    """Per validation image: pixel accuracy of DeepLab's matched prediction (ignored pixels left out)."""
    s = store.RaggedStore(root / "artifacts/deeplab/predictions.zarr")
    row_of = {int(i): r for r, i in enumerate(s.read("image_id"))}
    scores = {}
    for e in index.images:
        if e.split == split and (e.semantic or index.semantic_from_instances) and e.id in row_of:
            gt = index.read_semantic(e)
            pred = as_classes(store.read_semantic_map(s, row_of[e.id]), mapping)
            valid = gt != index.ignore_index
            scores[e.id] = float((pred[valid] == gt[valid]).mean()) if valid.any() else 0.0
    return scores


def grid_ids(
    root: Path, index: DatasetIndex, mapping: np.ndarray | None, split: str | None, n: int, sort: str, seed: int = 0
) -> list:
    """``n`` image ids of ``split``: the worst or best by DeepLab pixel accuracy (needs ground truth), or random."""
    if sort == "random" or mapping is None:
        ids = [e.id for e in index.images if e.split == split] or [e.id for e in index.images]
        return sorted(np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False).tolist())
    scores = image_scores(root, index, mapping, split)
    ranked = sorted(scores, key=lambda i: scores[i], reverse=sort == "best")
    return ranked[:n]


def contact_sheet(panels: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * PANEL, rows * (PANEL + TITLE)), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % columns) * PANEL, (i // columns) * (PANEL + TITLE)))
    return sheet


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="unseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="what the pipeline wrote")
    ins.add_argument("target", nargs="*", help="nothing | PATH ... | show IMAGE_ID | grid")
    ins.add_argument("--n", type=int, default=8, help="images in a grid (default 8)")
    ins.add_argument("--sort", choices=("worst", "best", "random"), default="worst", help="grid order")
    ins.add_argument("-o", "--out", type=Path, default=None, help="PNG to write (show)")
    ins.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    args = ap.parse_args(argv)
    os.chdir(args.root)  # index paths of the generated dataset are relative to the project root
    args.root = Path(".")
    try:
        if not args.target:
            print(format_rows(artifact_rows(args.root, stale_stages(args.root))))
        elif args.target[0] in ("show", "grid"):
            index = DatasetIndex.load(args.root / "data/prepared/index.json")
            split = load_params(args.root / "params.yaml").data.val_split
            mapping = cluster_mapping(args.root, index, split)
            extra = [legend(index.classes)] if mapping is not None else []
            if args.target[0] == "show":
                if len(args.target) != 2 or not args.target[1].isdigit():
                    raise UserError("usage: unseg inspect show IMAGE_ID [-o out.png]")
                image_id = int(args.target[1])
                out = args.out or Path(f"inspect_{image_id}.png")
                sheet = contact_sheet(stage_panels(args.root, image_id, index, mapping) + extra)
            else:
                ids = grid_ids(args.root, index, mapping, split, args.n, args.sort)
                out = args.out or Path(f"inspect_grid_{args.sort}.png")
                rows = [stage_panels(args.root, i, index, mapping) for i in ids]
                columns = max(len(r) for r in rows)
                sheet = contact_sheet([p for r in rows for p in r + [blank()] * (columns - len(r))] + extra, columns)
            sheet.save(out)
            print(f"wrote {out}")
        else:
            for target in args.target:
                print(describe(args.root / target))
    except UserError as err:
        print(f"unseg inspect: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
