"""The ``unseg`` command: ``inspect`` what each stage of a run wrote, ``segment`` new images with the trained
model (:mod:`unseg.segment`), ``export`` the trained DeepLab (:mod:`unseg.export`).

    unseg inspect                          # every artifact: stage, up to date, size, files, images, params
    unseg inspect PATH                     # one store, COCO json or checkpoint: arrays, attributes, stats
    unseg inspect show IMAGE_ID [-o F.png] # that image at every stage, one labelled panel each
    unseg inspect grid [--n 8] [--sort worst|best|random] [-o F.png]  # one row of panels per image
    unseg segment SRC... -o OUT [--instances] [--crf]   # new images: label PNGs, overlays, segments.json
    unseg export artifacts/deeplab/model.pt -o deeplab.pt2 [--format onnx]

Run from the project root (``python -m unseg inspect`` works too). Stores are read through
:mod:`unseg.store`, one image's rows at a time; a missing artifact names the stage that writes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from unseg import coco, store
from unseg import export as export_tool
from unseg import figures as F
from unseg import segment as segment_tool
from unseg.data.index import DatasetIndex
from unseg.dvcfile import load_stages
from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint
from unseg.params import load_params

# ---------------------------------------------------------------- the artifact table


def pipeline_outs(root: Path) -> list[tuple[str, str]]:
    """(path, stage) of every out and metric of both pipelines."""
    found = []
    for name in ("dvc.yaml", "ceiling/dvc.yaml", "hsg/dvc.yaml"):
        if not (root / name).is_file():
            continue
        prefix = "" if name == "dvc.yaml" else f"{name}:"
        for stage, spec in load_stages(root / name).items():
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


def params_digests(root: Path) -> dict[str, str]:
    """Stage -> the first 8 hex digits of a sha256 of the params its last run used (from the dvc.lock files)."""
    digests = {}
    for name in ("dvc.lock", "ceiling/dvc.lock", "hsg/dvc.lock"):
        if not (root / name).is_file():
            continue
        prefix = "" if name == "dvc.lock" else name.replace(".lock", ".yaml") + ":"
        for stage, spec in (yaml.safe_load((root / name).read_text()) or {}).get("stages", {}).items():
            if spec.get("params"):
                text = json.dumps(spec["params"], sort_keys=True, default=str)
                digests[prefix + stage] = hashlib.sha256(text.encode()).hexdigest()[:8]
    return digests


def artifact_rows(root: Path, stale: set[str] | None) -> list[dict]:
    rows, digests = [], params_digests(root)
    for rel, stage in pipeline_outs(root):
        path = root / rel
        size, files = disk_usage(path) if path.exists() else (0, 0)
        images = None
        if path.exists() and path.suffix == ".zarr":
            images = len(store.RaggedStore(path))
        state = "missing" if not path.exists() else "?" if stale is None else "stale" if stage in stale else "ok"
        rows.append(
            {"path": rel, "stage": stage, "state": state, "mb": size / 2**20, "files": files, "images": images,
             "params": digests.get(stage, "")}
        )  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'path':44} {'stage':34} {'state':8} {'MB':>9} {'files':>6} {'images':>7} {'params':8}"]
    for r in rows:
        images = "" if r["images"] is None else str(r["images"])
        lines.append(
            f"{r['path']:44} {r['stage']:34} {r['state']:8} {r['mb']:9.2f} {r['files']:6d} {images:>7} {r['params']:8}"
        )
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
    if "format" in ckpt:  # a model bundle (unseg.models.bundle)
        fields = {k: ckpt.get(k) for k in ("kind", "backend", "num_classes", "params_digest", "commit")}
        lines.append(f"model bundle {ckpt['format']}: {fields}; preprocess {ckpt.get('preprocess')}")
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


# ---------------------------------------------------------------- command line


def check_view_arguments(args: argparse.Namespace) -> None:
    """``show IMAGE_ID`` and ``grid --n N`` as the usage says, else one line naming what is wrong."""
    if args.target[0] == "show" and (len(args.target) != 2 or not args.target[1].isdigit()):
        given = f"{' '.join(args.target[1:])!r} is not an image id" if len(args.target) > 1 else "no image id given"
        raise UserError(f"show needs one image id, a number (`unseg inspect grid` prints them): {given}")
    if args.target[0] == "grid" and (len(args.target) != 1 or args.n < 1):
        extra = f"unexpected {' '.join(args.target[1:])!r}" if len(args.target) > 1 else f"--n {args.n}"
        raise UserError(f"grid takes --n N (at least 1 image) and no other word: {extra}")


TOOLS = {
    "segment": (segment_tool, "apply the trained model to images: label PNGs, overlays, an index"),
    "export": (export_tool, "the trained DeepLab as a torch.export or ONNX file"),
}


def main(argv: Sequence[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="unseg", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="what the pipeline wrote")
    ins.add_argument("target", nargs="*", help="nothing | PATH ... | show IMAGE_ID | grid")
    ins.add_argument("--n", type=int, default=8, help="images in a grid (default 8)")
    ins.add_argument("--sort", choices=("worst", "best", "random"), default="worst", help="grid order")
    ins.add_argument("-o", "--out", type=Path, default=None, help="PNG to write (show)")
    ins.add_argument("--root", type=Path, default=Path("."), help="project root (default: .)")
    for name, (module, what) in TOOLS.items():
        tool = sub.add_parser(name, help=what, description=module.__doc__, formatter_class=raw)
        module.add_arguments(tool)
    args = ap.parse_args(argv)
    if args.command in TOOLS:
        try:
            TOOLS[args.command][0].run(args)
        except UserError as err:
            print(f"unseg {args.command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    os.chdir(args.root)  # index paths of the generated dataset are relative to the project root
    args.root = Path(".")
    try:
        if not args.target:
            print(format_rows(artifact_rows(args.root, stale_stages(args.root))))
        elif args.target[0] in ("show", "grid"):
            check_view_arguments(args)
            drawn = {"extract_features", "mine_masks", "pseudo_label", "distill_maskrcnn", "filter_confident",
                     "train_deeplab"}  # fmt: skip
            stale = sorted((stale_stages(args.root) or set()) & drawn)
            if stale:  # drawn anyway: what is on disk, from the params of the last run
                names = ", ".join(stale)
                print(f"unseg inspect: warning: stale from {names} on; `dvc repro` updates them", file=sys.stderr)
            index = DatasetIndex.load(args.root / "data/prepared/index.json")
            split = load_params(args.root / "params.yaml").data.val_split
            if args.target[0] == "show":
                image_id = int(args.target[1])
                if image_id not in index.by_id:
                    ids = sorted(index.by_id)
                    raise UserError(f"show {image_id}: no such image id (ids run {ids[0]}..{ids[-1]})")
                out = args.out or Path(f"inspect_{image_id}.png")
                mapping = F.cluster_mapping(args.root, index, split)
                extra = [F.legend(index.classes)] if mapping is not None else []
                sheet = F.contact_sheet(F.stage_panels(args.root, image_id, index, mapping) + extra)
            else:
                out = args.out or Path(f"inspect_grid_{args.sort}.png")
                sheet = F.grid_sheet(args.root, index, split, args.n, args.sort)
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
