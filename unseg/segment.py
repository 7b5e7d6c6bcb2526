"""``unseg segment``: a trained model applied to new images, as files a user opens.

    unseg segment photos/ more/*.jpg -o out/                 # DeepLab of the workspace: label PNG + overlay + index
    unseg segment photos/ -o out/ --instances                # Mask R-CNN: COCO results json + instance PNGs
    unseg segment photos/ -o out/ --model run2/model.pt --crf --names matched --format label,json

Images are read by the pipeline's reader (EXIF, 16-bit, alpha; :mod:`unseg.data.images`) and fed exactly as
``train_deeplab`` feeds its own predictions (:class:`unseg.models.bundle.Preprocess`), so on the images the
pipeline saw the labels equal the stage's. Per image ``OUT/<name>.png`` (palette PNG of cluster ids, 0 =
background), ``OUT/<name>.overlay.jpg``, and one ``OUT/segments.json`` index (image, size, classes present, mean
confidence); ``<name>`` is the image's path under the folder it was found in, without its suffix. With
``--instances``: ``OUT/<name>.instances.png`` (instance k = k-th most confident) and ``OUT/instances.json``
(COCO results, RLE; ``image_id`` = the record's position in ``segments.json``).

Every file is written by rename, ``segments.json`` last: an interrupted run leaves finished images and its
partial index (``OUT/.segments.partial.jsonl``), and the rerun skips them. Unreadable files are skipped with one
line each and counted at the end.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unseg import coco
from unseg.data.images import ImageError, read_image
from unseg.data.index import IMAGE_SUFFIXES
from unseg.errors import UserError
from unseg.figures import PALETTE, blend
from unseg.models.bundle import Preprocess, read_bundle
from unseg.models.loading import build_from_bundle
from unseg.progress import progress
from unseg.train.harness import autocast, resolve_device

FORMATS = ("label", "overlay", "json")
INDEX, PARTIAL = "segments.json", ".segments.partial.jsonl"


@dataclass(frozen=True)
class Source:
    path: Path
    name: str  # output name: the path under the folder it was found in, without its suffix


# ---------------------------------------------------------------- inputs


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def collect_images(sources: Sequence[str | Path]) -> tuple[list[Source], list[str]]:
    """The images named by files, folders (recursive) and glob patterns, in order; and the files passed over
    (not image files by their suffix). One line when a source matches nothing or nothing is an image."""
    found: list[tuple[Path, str]] = []
    passed: list[str] = []
    for source in map(str, sources):
        path = Path(source)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((file, file.relative_to(path).with_suffix("").as_posix()))
                else:
                    passed.append(str(file))
            continue
        files = [path] if path.is_file() else [Path(p) for p in sorted(glob.glob(source, recursive=True))]
        if not files:
            raise UserError(f"{source}: no such file or folder, and no file matches it")
        for file in (f for f in files if f.is_file()):
            (found.append((file, file.stem)) if file.suffix.lower() in IMAGE_SUFFIXES else passed.append(str(file)))
    if not found:
        raise UserError(f"no image files in {', '.join(map(str, sources))} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    names = _unique([name for _, name in found])
    return [Source(path, name) for (path, _), name in zip(found, names, strict=True)], passed


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".unseg-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{out}: cannot write there ({err.strerror or err})") from err


# ---------------------------------------------------------------- the model


@torch.no_grad()
def predict_deeplab(
    model: torch.nn.Module, prep: Preprocess, images: Sequence[np.ndarray], device: torch.device, amp: bool = True
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Per image (H, W, 3) uint8: its (C, H, W) float32 logits at full size (on the CPU) and the argmax (H, W)
    uint8, exactly as :func:`unseg.deeplab.predict_semantic` computes them (one forward for same-sized inputs)."""
    inputs = [prep.tensor(image) for image in images]
    groups = [inputs] if len({tuple(x.shape) for x in inputs}) == 1 else [[x] for x in inputs]
    logits = []
    for group in groups:
        with autocast(device, amp):
            logits.extend(model(torch.cat(group).to(device)).float())
    out = []
    for image, lg in zip(images, logits, strict=True):
        if lg.shape[-2:] != image.shape[:2]:
            lg = F.interpolate(lg[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        lg = lg.cpu()
        out.append((lg, lg.argmax(0).numpy().astype(np.uint8)))
    return out


def confidence(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Mean over pixels of the softmax probability of the label each pixel got."""
    probs = torch.softmax(logits, 0)
    return float(probs.gather(0, torch.from_numpy(labels.astype(np.int64))[None]).mean())


# ---------------------------------------------------------------- outputs


def palette_png(labels: np.ndarray) -> Image.Image:
    """(H, W) uint8 ids as a palette PNG: 0 black, id i the i-th palette colour (as ``unseg inspect`` draws)."""
    ids = np.arange(256)
    colours = PALETTE[np.where(ids == 0, 0, 1 + (ids - 1) % (len(PALETTE) - 1))]
    image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    image.putpalette(colours.astype(np.uint8).ravel().tolist())
    return image


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG" if path.suffix == ".png" else "JPEG", **kwargs)
    os.replace(tmp, path)


def instance_map(results: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8: instance k (1-based, most confident first) where its mask is, the more confident on top."""
    out = np.zeros((height, width), np.uint8)
    for k, rec in reversed(list(enumerate(results[:255], start=1))):
        out[coco.decode_rle(rec["segmentation"])] = k
    return out


class Writer:
    """The files of one run in ``out``: each image's outputs by rename, then its record appended to the partial
    index; :meth:`finish` writes ``segments.json`` (and ``instances.json``) and removes the partial index."""

    def __init__(self, out: Path, formats: Sequence[str], instances: bool, run: dict):
        self.out, self.formats, self.instances = out, tuple(formats), instances
        self.run = run  # what made the outputs (model, options): a record of another run is redone, not kept
        self.records = self._resumed()
        self.partial = open(out / PARTIAL, "a")

    def _resumed(self) -> dict[str, dict]:
        records = {}
        for path in (self.out / INDEX, self.out / PARTIAL):
            if not path.is_file():
                continue
            text = path.read_text()
            rows = json.loads(text)["images"] if path.name == INDEX else []
            if path.name == PARTIAL:
                for line in text.splitlines():  # a line cut by a kill is not a record
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
            if path.name == INDEX and self.instances and (self.out / "instances.json").is_file():
                per_row = coco.group_by_image(coco.read_json(self.out / "instances.json"))  # a finished run's
                for i, row in enumerate(rows, start=1):
                    row["instances"] = [_bare(r) for r in per_row.get(i, [])]
            records.update({r["name"]: r for r in rows if all((self.out / f).is_file() for f in r["files"])})
        return records

    def done(self, source: Source) -> bool:
        rec = self.records.get(source.name)
        return rec is not None and rec["image"] == str(source.path) and rec.get("run") == self.run

    def write(self, source: Source, image: np.ndarray, labels: np.ndarray, record: dict) -> None:
        files = []
        if "label" in self.formats:
            _save(palette_png(labels), self.out / f"{source.name}.png")
            files.append(f"{source.name}.png")
        if "overlay" in self.formats:
            _save(Image.fromarray(blend(image, labels)), self.out / f"{source.name}.overlay.jpg", quality=90)
            files.append(f"{source.name}.overlay.jpg")
        if self.instances:
            name = f"{source.name}.instances.png"
            _save(palette_png(instance_map(record["instances"], *image.shape[:2])), self.out / name)
            files.append(name)
        record = {"name": source.name, "image": str(source.path), **record, "files": files, "run": self.run}
        self.partial.write(json.dumps(record) + "\n")
        self.partial.flush()
        self.records[source.name] = record

    def finish(self, order: Sequence[Source]) -> list[dict]:
        self.partial.close()
        rows = [self.records[s.name] for s in order if s.name in self.records]
        if self.instances:
            results = [{**r, "image_id": i} for i, row in enumerate(rows, start=1) for r in row.get("instances", [])]
            coco.write_json(coco.number_results(results), self.out / "instances.json")
        if "json" in self.formats or self.instances:
            index = [{k: v for k, v in row.items() if k != "instances"} for row in rows]
            coco.write_json({"images": index}, self.out / INDEX)
        (self.out / PARTIAL).unlink(missing_ok=True)
        return rows


# ---------------------------------------------------------------- the run


def _bare(result: dict) -> dict:
    """A COCO result without its ids (they are given when ``instances.json`` is written)."""
    return {k: v for k, v in result.items() if k not in ("id", "image_id")}


def _batches(sources: Sequence[Source], batch_size: int, skipped: list[str]) -> Iterator[list]:
    batch = []
    for source in sources:
        try:
            batch.append((source, read_image(source.path)))
        except ImageError as err:
            print(f"unseg segment: skipped {err}", file=sys.stderr)
            skipped.append(str(source.path))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetched(batches: Iterator) -> Iterator:
    """``batches`` decoded one batch ahead in a thread (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = pool.submit(next, batches, None)
            yield batch


@dataclass
class Summary:
    segmented: int
    resumed: int
    skipped: list[str]
    passed_over: list[str]
    seconds: float


def segment(
    sources: Sequence[str | Path],
    out: Path,
    *,
    model_path: Path,
    instances: bool = False,
    crf: bool = False,
    formats: Sequence[str] = FORMATS,
    class_names: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> Summary:
    """Segment every image of ``sources`` into ``out`` (see the module docstring); resumes an interrupted run."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UserError(f"--format: {', '.join(unknown) or 'nothing'}; choose from {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    start = time.time()
    images, passed = collect_images(sources)
    bundle = read_bundle(model_path, "maskrcnn" if instances else "deeplab")
    check_writable(out)
    dev = resolve_device(device)
    model = build_from_bundle(bundle).to(dev)
    prep = Preprocess(**bundle["preprocess"])
    run = {"model": str(model_path), "instances": instances, "crf": crf, "formats": sorted(formats)}
    writer = Writer(out, formats, instances, run)
    todo = [s for s in images if not writer.done(s)]
    skipped: list[str] = []
    bar = progress(total=len(todo), desc="segment", unit="image")
    for batch in _prefetched(_batches(todo, batch_size, skipped)):
        arrays = [image for _, image in batch]
        if instances:
            outputs = _instances_of(model, bundle, prep, arrays, dev)
        else:
            outputs = _semantic_of(model, prep, arrays, dev, crf, class_names)
        for (source, image), (labels, record) in zip(batch, outputs, strict=True):
            writer.write(source, image, labels, record)
        bar.update(len(batch))
    bar.close()
    writer.finish(images)
    return Summary(len(todo) - len(skipped), len(images) - len(todo), skipped, passed, time.time() - start)


def _semantic_of(model, prep, images, device, crf: bool, class_names) -> list[tuple[np.ndarray, dict]]:
    out = []
    for image, (logits, labels) in zip(images, predict_deeplab(model, prep, images, device), strict=True):
        if crf:
            from unseg.crf import dense_crf

            labels = dense_crf(image, logits).astype(np.uint8)
        present = sorted(int(c) for c in np.unique(labels))
        classes = [class_names[c] if class_names and c < len(class_names) else c for c in present]
        record = {"height": image.shape[0], "width": image.shape[1], "classes": classes}
        out.append((labels, {**record, "mean_confidence": round(confidence(logits, labels), 4)}))
    return out


def _instances_of(model, bundle, prep, images, device) -> list[tuple[np.ndarray, dict]]:
    ids = bundle["category_ids"]
    numbered = list(enumerate(images))
    if bundle["backend"] == "detectron2":
        from unseg.distill.detectron2_backend import build_cfg, predict_detectron2

        cfg = build_cfg({**bundle["architecture"], "MODEL.DEVICE": device.type})
        results = predict_detectron2(model, cfg, numbered, category_ids=ids, batch_size=len(images))
    else:
        from unseg.distill.maskrcnn import predict_instances

        tensors = [(i, torch.from_numpy(im).permute(2, 0, 1)) for i, im in numbered]
        results = predict_instances(model, tensors, device, category_ids=ids, batch_size=len(images))
    per_image = coco.group_by_image(results)
    out = []
    for i, image in numbered:
        mine = per_image.get(i, [])
        labels = np.zeros(image.shape[:2], np.uint8)  # the semantic view: each pixel its instance's category
        for rec in reversed(mine):
            labels[coco.decode_rle(rec["segmentation"])] = int(rec["category_id"])
        scores = [r["score"] for r in mine]
        record = {
            "height": image.shape[0],
            "width": image.shape[1],
            "classes": sorted({int(r["category_id"]) for r in mine}),
            "mean_confidence": round(float(np.mean(scores)), 4) if scores else None,
            "instances": [_bare(r) for r in mine],
        }
        out.append((labels, record))
    return out


# ---------------------------------------------------------------- command line

CLASSES_FILE = Path("artifacts/metrics/cluster_classes.json")  # evaluate's cluster -> class match


def class_names_of(names: str, root: Path) -> list[str] | None:
    """``ids``: None (cluster ids are written); ``matched``: evaluate's Hungarian cluster -> class names."""
    if names == "ids":
        return None
    path = root / CLASSES_FILE
    if not path.is_file():
        raise UserError(f"--names matched needs {path}, which `evaluate` writes where the data has ground truth")
    matched = coco.read_json(path)
    if "clusters" not in matched:
        raise UserError(f"--names matched: {path} has no match ({matched.get('note', 'no clusters')})")
    return [c["class"] or f"cluster {c['id']}" for c in matched["clusters"]]


def add_arguments(ap) -> None:
    ap.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders (recursive) or glob patterns")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    ap.add_argument("--model", type=Path, help="a model.pt bundle (default: the workspace's DeepLab, or Mask R-CNN)")
    ap.add_argument("--instances", action="store_true", help="Mask R-CNN instances: instances.json + instance PNGs")
    ap.add_argument("--crf", action="store_true", help="refine DeepLab's labels with the dense CRF (released settings)")
    ap.add_argument("--format", default="label,overlay,json", help="which of label,overlay,json to write")
    ap.add_argument("--names", choices=("ids", "matched"), default="ids", help="classes in segments.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--root", type=Path, default=Path("."), help="project root of the default model (default: .)")


def run(args) -> None:
    default = "artifacts/maskrcnn/model.pt" if args.instances else "artifacts/deeplab/model.pt"
    model = args.model or args.root / default
    if not model.is_file():
        remedy = "run `make repro` (or `dvc repro`) first, or pass --model" if args.model is None else "check the path"
        raise UserError(f"{model}: no such model file; {remedy}")
    summary = segment(
        args.sources,
        args.out,
        model_path=model,
        instances=args.instances,
        crf=args.crf,
        formats=[f.strip() for f in args.format.split(",") if f.strip()],
        class_names=class_names_of(args.names, args.root),
        batch_size=args.batch_size,
        device=args.device,
    )
    extra = f", {summary.resumed} already done" if summary.resumed else ""
    bad = f", {len(summary.skipped)} unreadable skipped" if summary.skipped else ""
    other = f", {len(summary.passed_over)} non-image files passed over" if summary.passed_over else ""
    print(f"unseg segment: {summary.segmented} images in {summary.seconds:.1f} s{extra}{bad}{other} -> {args.out}")
