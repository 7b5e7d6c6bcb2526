"""Pictures of a run: one image at every stage as labelled panels, contact sheets, Table-1 bars.

Read from the standard artifact layout under a project root (``artifacts/features.zarr``, ``masks.zarr``,
the pseudo-labels, the Mask R-CNN predictions, ``semantic.zarr``, DeepLab's predictions), through
:mod:`unseg.store`, one image's rows at a time. Used by ``unseg inspect`` and by the evaluate stage
(its DVC image plots). Cluster ids are drawn in the colours of the ground-truth classes they are
matched to (Hungarian, as Table 1 scores them) when ground truth exists.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unseg import coco, store
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry, token_map_to_pixels, token_mask_to_pixels
from unseg.errors import UserError
from unseg.matching import ConfusionAccumulator, hungarian_mapping

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


def grid_sheet(root: Path, index: DatasetIndex, split: str | None, n: int, sort: str) -> Image.Image:
    """``n`` images of ``split`` (worst / best by DeepLab pixel accuracy, or random), one row of panels each,
    and the class legend when the clusters could be matched to ground truth."""
    mapping = cluster_mapping(root, index, split)
    rows = [stage_panels(root, i, index, mapping) for i in grid_ids(root, index, mapping, split, n, sort)]
    columns = max(len(r) for r in rows)
    extra = [legend(index.classes)] if mapping is not None else []
    return contact_sheet([p for r in rows for p in r + [blank()] * (columns - len(r))] + extra, columns)


def table1_bars(rows: dict[str, dict], baselines: dict[str, dict]) -> list[dict]:
    """One record ``{"row", "miou"}`` (%) per Table-1 row, then per baseline: the data of DVC's
    ``bar_horizontal`` plot (``dvc plots diff`` sets two experiments' bars side by side)."""
    short = {"random-init ViT, mined + K-means": "random-init ViT front half"}  # fits the axis labels
    named = list(rows.items()) + [(f"baseline: {short.get(name, name)}", r) for name, r in baselines.items()]
    return [{"row": name, "miou": round(100 * r["miou"], 2)} for name, r in named if "miou" in r]


def write_bars(path: Path, bars: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["row", "miou"])
        writer.writeheader()
        writer.writerows(bars)
    tmp.replace(path)


def write_sheets(root: Path, index: DatasetIndex, split: str | None, out: Path, n: int = 4) -> list[Path]:
    """Contact sheets of ``n`` validation images at every stage in the folder ``out``: ``worst.png`` and
    ``best.png`` by DeepLab pixel accuracy when the clusters match ground truth, else one ``random.png``
    (without labels there is no worst or best); sheets of an earlier run that no longer apply are removed."""
    out.mkdir(parents=True, exist_ok=True)
    sorts = ("worst", "best") if cluster_mapping(root, index, split) is not None else ("random",)
    for old in out.glob("*.png"):
        if old.stem not in sorts:
            old.unlink()
    written = []
    for sort in sorts:
        path = out / f"{sort}.png"
        tmp = path.with_name(f".{sort}.tmp.png")
        grid_sheet(root, index, split, n, sort).save(tmp)
        tmp.replace(path)
        written.append(path)
    return written
