"""The image index every stage reads, and the adapters that build it.

An index lists images (id, path, size, split, optional semantic label file) plus what is known
about ground truth: class names, an ignore index, a label remapping and an optional COCO instances
json. Adapters index a dataset in place (images are never copied): a plain image folder (no ground
truth: the real unsupervised use), COCO instances json, the VOC 2012 layout, the CamVid/SegNet
layout. The embedded generated dataset is written by :func:`prepare_generated`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from unseg import coco
from unseg.data import generated, images
from unseg.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
IGNORE = 255


@dataclass
class ImageEntry:
    id: int
    file: str
    height: int
    width: int
    split: str
    semantic: str | None = None


@dataclass
class DatasetIndex:
    """Images plus ground-truth facts. Semantic labels: 0..C-1 class ids, ``ignore_index`` ignored."""

    name: str
    images: list[ImageEntry]
    classes: list[str] | None = None  # GT class names (index = label value); None: no ground truth
    ignore_index: int = IGNORE
    label_map: dict[int, int] = field(default_factory=dict)  # raw label value -> label (e.g. CamVid void -> 255)
    instances: str | None = None  # COCO instances json with ground truth (ids = image ids)
    semantic_from_instances: bool = False  # rasterise semantic GT from `instances` (COCO)

    # ---- persistence
    def save(self, path: str | Path) -> None:
        obj = asdict(self)
        obj["label_map"] = {str(k): v for k, v in self.label_map.items()}
        coco.write_json(obj, path)

    @classmethod
    def load(cls, path: str | Path) -> DatasetIndex:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no image index (run the prepare stage first)")
        obj = json.loads(path.read_text())
        obj["images"] = [ImageEntry(**e) for e in obj["images"]]
        obj["label_map"] = {int(k): v for k, v in obj.get("label_map", {}).items()}
        return cls(**obj)

    # ---- access
    def split(self, name: str | None) -> list[ImageEntry]:
        return [e for e in self.images if name is None or e.split == name]

    def labelled(self, split: str | None) -> tuple[list[ImageEntry], list[np.ndarray]]:
        """The images of ``split`` that have semantic ground truth, and their label maps."""
        if not split or not self.has_ground_truth:
            return [], []
        pairs = [(e, self.read_semantic(e)) for e in self.split(split)]
        pairs = [(e, g) for e, g in pairs if g is not None]
        return [e for e, _ in pairs], [g for _, g in pairs]

    @property
    def has_ground_truth(self) -> bool:
        return self.classes is not None

    @property
    def by_id(self) -> dict[int, ImageEntry]:
        return {e.id: e for e in self.images}

    @cached_property
    def gt_instances(self) -> dict[int, list[dict]]:
        """Ground-truth COCO annotations per image id (empty without an instances json)."""
        per_image: dict[int, list[dict]] = {}
        if self.instances:
            for ann in coco.read_json(self.instances)["annotations"]:
                per_image.setdefault(ann["image_id"], []).append(ann)
        return per_image

    def read_semantic(self, entry: ImageEntry) -> np.ndarray | None:
        """(H, W) uint8 ground-truth labels, or None when the image has none."""
        if self.semantic_from_instances:
            return self._semantic_from_instances(entry)
        if entry.semantic is None:
            return None
        lab = np.asarray(Image.open(entry.semantic))
        if lab.ndim == 3:
            raise UserError(f"{entry.semantic}: semantic labels must be single-channel index images")
        lab = lab.astype(np.uint8)
        if self.label_map:
            lut = np.arange(256, dtype=np.uint8)
            for src, dst in self.label_map.items():
                lut[src] = dst
            lab = lut[lab]
        return lab

    def _semantic_from_instances(self, entry: ImageEntry) -> np.ndarray:
        lab = np.zeros((entry.height, entry.width), np.uint8)
        for ann in sorted(self.gt_instances.get(entry.id, []), key=lambda a: -a.get("area", 0)):
            m = coco.decode_segmentation(ann["segmentation"], entry.height, entry.width)
            lab[m] = self.ignore_index if ann.get("iscrowd", 0) else ann["category_id"]
        return lab


def read_image(entry: ImageEntry | str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an index entry or an image path (:func:`unseg.data.images.read_image`)."""
    return images.read_image(entry.file if isinstance(entry, ImageEntry) else entry)


def drop_unreadable(index: DatasetIndex, min_side: int = 1) -> tuple[DatasetIndex, dict[str, str]]:
    """The index without the images that do not fully decode (or disagree with their stored size).

    Returns the kept index and {file: reason} of the dropped images; stops with one line when none is left.
    """
    good, bad = images.check_images((e.file for e in index.images), min_side)
    for e in index.images:
        if e.file in good and good[e.file] != (e.height, e.width):
            bad[e.file] = f"decodes to {good[e.file][1]}x{good[e.file][0]}, the dataset says {e.width}x{e.height}"
    kept = [e for e in index.images if e.file not in bad]
    if not kept:
        raise UserError(
            f"data.root: none of the {len(index.images)} images can be read (first: {next(iter(bad.items()))})"
        )
    return dataclasses.replace(index, images=kept), bad


# ---------------------------------------------------------------- the generated dataset


def prepare_generated(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_categories: int,
    max_instances: int,
    min_side: int,
    max_side: int,
    seed: int,
    progress=None,
    palette: str = "random",
) -> DatasetIndex:
    """Write the embedded dataset (PNG images, PNG semantic maps, COCO instances json) and its index."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "semantic").mkdir(parents=True, exist_ok=True)
    entries, anns = [], []
    splits = ["train"] * n_train + ["val"] * n_val
    it = progress(range(len(splits))) if progress else range(len(splits))
    for i in it:
        img, sem, instances = generated.render_sample(i, seed, n_categories, max_instances, min_side, max_side, palette)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(out / "images" / name, optimize=False, compress_level=1)
        Image.fromarray(sem).save(out / "semantic" / name, compress_level=1)
        h, w = sem.shape
        entries.append(ImageEntry(i, str(out / "images" / name), h, w, splits[i], str(out / "semantic" / name)))
        anns += [coco.annotation(len(anns) + 1, i, inst.category, inst.mask) for inst in instances]
    categories = [{"id": c + 1, "name": generated.CATEGORIES[c]} for c in range(n_categories)]
    gt = {
        "images": [{"id": e.id, "file_name": Path(e.file).name, "height": e.height, "width": e.width} for e in entries],
        "annotations": anns,
        "categories": categories,
    }
    coco.write_json(gt, out / "instances.json")
    return DatasetIndex(
        name="generated",
        images=entries,
        classes=["background", *generated.CATEGORIES[:n_categories]],
        instances=str(out / "instances.json"),
    )


# ---------------------------------------------------------------- adapters


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header; (0, 0) for a file that is not an image (dropped by drop_unreadable)."""
    try:
        return images.image_size(path)
    except images.ImageError:
        return 0, 0


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def _require_dir(path: Path, what: str) -> Path:
    if path.is_file():
        raise UserError(f"data.root: {what} {path} is a file, not a folder")
    if not path.is_dir():
        raise UserError(f"data.root: {what} folder {path} does not exist")
    return path


def folder_split(relative_path: str, val_fraction: float) -> bool:
    """Whether an image goes to the validation split: a hash of its path below ``data.root``, so the
    split of an image never changes when others are added or removed."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def index_folder(
    root: str | Path,
    limit: int | None = None,
    split: str = "train",
    val_split: str | None = None,
    val_fraction: float = 0.0,
) -> DatasetIndex:
    """Every image under ``root`` (recursively), no ground truth: in ``split`` (the training split), or in
    ``val_split`` for a ``val_fraction`` share of them (:func:`folder_split`)."""
    root = _require_dir(Path(root), "image")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    files = _limit(files, limit)

    def split_of(f: Path) -> str:
        held_out = val_split and val_split != split and folder_split(f.relative_to(root).as_posix(), val_fraction)
        return val_split if held_out else split

    entries = [ImageEntry(i, str(f.resolve()), *_image_size(f), split_of(f)) for i, f in enumerate(files)]
    return DatasetIndex(name="folder", images=entries)


def not_images(root: str | Path) -> list[str]:
    """The non-hidden files under ``root`` that a folder dataset ignores (no image suffix), relative to it."""
    root = Path(root)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and not any(x.startswith(".") for x in p.parts)
    )


def index_coco(root: str | Path, splits: list[str], out_dir: str | Path, limit: int | None = None) -> DatasetIndex:
    """COCO layout: ``images/<split>/`` (or ``<split>/``) and ``annotations/instances_<split>.json``.

    Categories are remapped to contiguous labels 1..C (0 = background); crowd regions are ignored.
    The ground truth of all splits is written, merged, to ``out_dir/instances.json``.
    """
    root = _require_dir(Path(root), "COCO")
    entries, anns, cats = [], [], None
    for split in splits:
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise UserError(f"data.root: {ann_file} not found (COCO layout: annotations/instances_<split>.json)")
        img_dir = root / "images" / split if (root / "images" / split).is_dir() else root / split
        _require_dir(img_dir, "COCO image")
        gt = coco.read_json(ann_file)
        cats = cats or sorted(gt["categories"], key=lambda c: c["id"])
        images = _limit(sorted(gt["images"], key=lambda im: im["id"]), limit)
        keep = {im["id"] for im in images}
        for im in images:
            if not Path(os.path.normpath(img_dir / im["file_name"])).is_relative_to(os.path.normpath(root)):
                raise UserError(
                    f"{ann_file}: image {im['id']} file_name {im['file_name']!r} lies outside data.root {root}"
                )
        entries += [
            ImageEntry(im["id"], str((img_dir / im["file_name"]).resolve()), im["height"], im["width"], split)
            for im in images
        ]
        anns += [a for a in gt["annotations"] if a["image_id"] in keep]
    contiguous = {c["id"]: i + 1 for i, c in enumerate(cats)}
    for a in anns:
        a["category_id"] = contiguous[a["category_id"]]
    merged = {
        "images": [{"id": e.id, "file_name": Path(e.file).name, "height": e.height, "width": e.width} for e in entries],
        "annotations": anns,
        "categories": [{"id": contiguous[c["id"]], "name": c["name"]} for c in cats],
    }
    out = Path(out_dir) / "instances.json"
    coco.write_json(merged, out)
    return DatasetIndex(
        name="coco",
        images=entries,
        classes=["background"] + [c["name"] for c in cats],
        instances=str(out),
        semantic_from_instances=True,
    )


VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def index_voc(root: str | Path, splits: list[str], limit: int | None = None) -> DatasetIndex:
    """VOC 2012 layout: JPEGImages/, SegmentationClass(Aug)/, ImageSets/Segmentation/<split>.txt."""
    root = _require_dir(Path(root), "VOC")
    entries = []
    for split in splits:
        lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise UserError(f"data.root: {lst} not found (VOC layout: ImageSets/Segmentation/<split>.txt)")
        names = _limit(lst.read_text().split(), limit)
        for name in names:
            img = root / "JPEGImages" / f"{name}.jpg"
            lab = next(
                (
                    d / f"{name}.png"
                    for d in (root / "SegmentationClass", root / "SegmentationClassAug")
                    if (d / f"{name}.png").is_file()
                ),
                None,
            )
            h, w = _image_size(img)
            entries.append(
                ImageEntry(len(entries), str(img.resolve()), h, w, split, str(lab.resolve()) if lab else None)
            )
    return DatasetIndex(name="voc", images=entries, classes=list(VOC_CLASSES))


def index_camvid(root: str | Path, splits: list[str], limit: int | None = None) -> DatasetIndex:
    """CamVid (SegNet tutorial) layout: ``<split>/images/*.png`` and ``<split>/labels/*.png``, 11 = void."""
    root = _require_dir(Path(root), "CamVid")
    names_file = root / "classes.txt"
    classes = None
    if names_file.is_file():
        classes = [ln.split(maxsplit=1)[-1].strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        classes = [c for c in classes if c.lower() not in ("void", "unlabelled", "unlabeled")][:11]
    entries = []
    for split in splits:
        img_dir = _require_dir(root / split / "images", "CamVid image")
        files = _limit(sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), limit)
        for f in files:
            lab = root / split / "labels" / f.name
            h, w = _image_size(f)
            entries.append(
                ImageEntry(len(entries), str(f.resolve()), h, w, split, str(lab.resolve()) if lab.is_file() else None)
            )
    classes = classes or [
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    ]
    return DatasetIndex(name="camvid", images=entries, classes=classes, label_map={11: IGNORE})


def prepare_generated_video(
    out_dir: str | Path, n_sequences: int, n_frames: int, height: int, width: int, n_categories: int, seed: int
) -> Path:
    """Write generated videos in the DAVIS 2017 layout (``JPEGImages/480p/<seq>/``, ``Annotations/480p/<seq>/``).

    Frames are PNG (lossless) and annotations palette-free index PNGs; ``ImageSets/2017/val.txt`` lists them.
    """
    root = Path(out_dir)
    names = []
    for s in range(n_sequences):
        name = f"shapes{s:02d}"
        names.append(name)
        frames, anns = generated.render_video(s, seed, n_frames, height, width, n_categories)
        for sub, items in (("JPEGImages", frames), ("Annotations", anns)):
            d = root / sub / "480p" / name
            d.mkdir(parents=True, exist_ok=True)
            for t, item in enumerate(items):
                Image.fromarray(item).save(d / f"{t:05d}.png", compress_level=1)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return root
