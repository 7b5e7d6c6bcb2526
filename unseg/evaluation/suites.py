"""The evaluate stage's work, from the typed params to metric dicts: MaskDistill's Table 1, class-agnostic
mask AP, the linear protocols and the baselines of one run's artifacts, on the validation split with
ground truth. Nothing here reads params.yaml (the stage passes it) or writes files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unseg import coco, store
from unseg.data.index import DatasetIndex, ImageEntry
from unseg.evaluation import protocols as P
from unseg.evaluation.table1 import ground_truth_subset, mask_ap_rows, score_split, table1_rows
from unseg.matching import ConfusionAccumulator, hungarian_mapping
from unseg.models.bundle import read_bundle
from unseg.params import Params

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunArtifacts:
    """The artifacts of one run that ``run_suite`` scores."""

    features: Path
    masks: Path
    pseudo_labels: Path
    maskrcnn: Path
    semantic: Path
    deeplab: Path
    backbone_metrics: Path


def run_suite(
    params: Params, index: DatasetIndex, val: Sequence[ImageEntry], val_gts, art: RunArtifacts, device, log: Log
) -> dict[str, dict]:
    """``{"table1", "instances", "linear", "baselines"}`` of one run on the validation images ``val``, and
    ``"clusters"``: the number of pseudo-label categories."""
    ev = params.evaluate
    gts = {e.id: g for e, g in zip(val, val_gts, strict=True)}
    n_gt, ignore = len(index.classes), index.ignore_index
    pseudo = coco.read_json(art.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])

    def score(maps: dict[int, np.ndarray], n_pred: int) -> dict:
        return score_split(maps, val, gts, n_pred, n_gt, ignore)

    preds = coco.read_json(art.maskrcnn / "predictions.json")
    deeplab_maps = art.deeplab / "predictions.zarr"
    rows = table1_rows(pseudo["annotations"], preds, art.semantic, deeplab_maps, val, gts, score, k, ev.maskrcnn_score)
    if index.classes[0].lower() == "background":
        masks, attrs = store.RaggedStore(art.masks), store.RaggedStore(art.features).attrs
        fg = P.mined_mask_fg_iou(masks, attrs, index.by_id, gts, params.mining.upsample)
        rows["1 mined masks + K-means"]["mask_fg_iou"] = fg
    model, prep = P.load_deeplab(art.deeplab / "model.pt", device)
    if ev.crf and P.crf_available():
        rows["5 + CRF"] = score(P.crf_label_maps(model, val, device, prep.input_size), model.num_classes)
    elif ev.crf:
        rows["5 + CRF"] = {"note": "skipped: pydensecrf is not installed (pip install pydensecrf2)"}
    instances = {}
    if index.instances:
        mined = [{**a, "score": 1.0} for a in pseudo["annotations"]]
        instances = mask_ap_rows(ground_truth_subset(index, gts), {"mined_masks": mined, "maskrcnn": preds})
    train, train_gts = index.labelled(params.data.train_split)
    probe = P.ProbeConfig(epochs=ev.probe_epochs, lr=ev.probe_lr, memory_mb=ev.probe_memory_mb, seed=ev.seed)
    linear = {}
    if train:
        linear = P.linear_protocols(
            model, train, train_gts, val, val_gts, n_gt, ignore, probe, device, prep.input_size, log
        )  # fmt: skip
    baselines = P.baseline_rows(val, score, n_gt, ev.seed, ev.raw_kmeans_pixels) if ev.baselines else {}
    backbone = json.loads(art.backbone_metrics.read_text()) if art.backbone_metrics.exists() else {}
    if ev.baselines and "random_init_front_half" in backbone:
        baselines["random-init ViT, mined + K-means"] = backbone["random_init_front_half"]
    return {"table1": rows, "instances": instances, "linear": linear, "baselines": baselines, "clusters": k}


def cluster_classes(deeplab: Path, val: Sequence[ImageEntry], val_gts, classes: Sequence[str], ignore) -> dict:
    """The ground-truth class each DeepLab cluster is matched to by the Hungarian algorithm on the validation
    split, as Table 1's DeepLab row scores it, with where it came from (``unseg segment --names matched``)."""
    bundle = read_bundle(deeplab / "model.pt", "deeplab")
    predictions = store.RaggedStore(deeplab / "predictions.zarr")
    row_of = {int(i): r for r, i in enumerate(predictions.read("image_id"))}
    acc = ConfusionAccumulator(bundle["num_classes"], len(classes), ignore)
    for e, gt in zip(val, val_gts, strict=True):
        acc.update(store.read_semantic_map(predictions, row_of[e.id]), gt)
    mapping = hungarian_mapping(acc.matrix)
    return {
        "method": "Hungarian match of DeepLab's predictions to the ground truth (Table 1, row 4)",
        "split_images": len(val),
        "model": {"params_digest": bundle["params_digest"], "commit": bundle["commit"]},
        "clusters": [{"id": c, "class": classes[m] if m >= 0 else None} for c, m in enumerate(mapping.tolist())],
    }


def self_training_rows(rounds: Sequence[Path], val: Sequence[ImageEntry], val_gts, n_gt: int, ignore) -> dict:
    """Table 1's "+ CRF self-training, round r" rows: each trained round's DeepLab predictions scored like row 4
    (rounds that are off, ``round.json`` ``trained: false``, give no row)."""
    gts = {e.id: g for e, g in zip(val, val_gts, strict=True)}
    rows = {}
    for path in rounds:
        info = json.loads((path / "round.json").read_text())
        if not info["trained"]:
            continue
        predictions = store.RaggedStore(path / "predictions.zarr")
        row_of = {int(i): r for r, i in enumerate(predictions.read("image_id"))}
        maps = {e.id: store.read_semantic_map(predictions, row_of[e.id]) for e in val}
        n_pred = int(predictions.attrs["num_classes"])
        rows[f"6 + CRF self-training, round {info['round']}"] = score_split(maps, val, gts, n_pred, n_gt, ignore)
    return rows
