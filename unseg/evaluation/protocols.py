"""The evaluations of the ``evaluate`` stage that need a model or the raw images: the CRF row, the
linear protocols on frozen DeepLab features, the baselines and the mined masks' foreground IoU.

All of them use ground truth, on the validation split only (the linear protocols train a 1x1 conv with
the training split's labels, which is the protocol of the paper's App. A.2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unseg import store
from unseg.crf import crf_label_maps  # noqa: F401  (suites calls it as P.crf_label_maps)
from unseg.data.index import ImageEntry, read_image
from unseg.data.transforms import geometry, token_mask_to_pixels
from unseg.deeplab import deeplab_features, deeplab_from_bundle
from unseg.evaluation.dense import raw_pixel_kmeans_labels
from unseg.evaluation.metrics import ForegroundIoU
from unseg.evaluation.probe import images_within_budget, predict_probe, train_linear_probe
from unseg.evaluation.report import score_label_maps
from unseg.models.bundle import Preprocess, read_bundle
from unseg.progress import progress

Score = Callable[[dict[int, np.ndarray], int], dict]


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int
    lr: float
    memory_mb: int
    seed: int


def _image_tensor(e: ImageEntry) -> torch.Tensor:
    return torch.from_numpy(read_image(e)).permute(2, 0, 1)


def load_deeplab(path, device) -> tuple[torch.nn.Module, Preprocess]:
    """The trained DeepLab of ``train_deeplab`` (its ``model.pt`` bundle), in eval mode on ``device``, with its
    ``num_classes``, and its preprocessing."""
    bundle = read_bundle(path, "deeplab")
    model = deeplab_from_bundle(bundle)
    model.num_classes = bundle["num_classes"]
    return model.to(device), Preprocess(**bundle["preprocess"])


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def deeplab_feature_lists(
    model, entries: Sequence[ImageEntry], device, input_size: int, kinds=("backbone", "head"), batch_size: int = 16
) -> dict[str, list]:
    """:func:`unseg.deeplab.deeplab_features` of every entry, ``batch_size`` images at a time."""
    out: dict[str, list] = {kind: [] for kind in kinds}
    chunks = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    for chunk in progress(chunks, desc="linear features"):
        feats = deeplab_features(model, [_image_tensor(e) for e in chunk], device, input_size, kinds)
        for kind in kinds:
            out[kind].extend(feats[kind])
    return out


def linear_protocols(
    model,
    train: Sequence[ImageEntry],
    train_gts: Sequence[np.ndarray],
    val: Sequence[ImageEntry],
    val_gts: Sequence[np.ndarray],
    n_classes: int,
    ignore: int,
    cfg: ProbeConfig,
    device,
    input_size: int,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """The paper's probe on frozen DeepLab backbone features (App. A.2), and the released protocol that
    re-fits only DeepLab's last 1x1 conv (``linear_finetune.py``); both trained with ground truth, on the
    training images whose features fit in ``cfg.memory_mb`` (all of them when they do). When both kinds of
    features of every training image fit together, one feature pass serves both protocols."""
    first = deeplab_feature_lists(model, train[:1], device, input_size)
    area = train[0].height * train[0].width
    per_pixel = {kind: f[0].numel() * f[0].element_size() / area for kind, f in first.items()}
    pixels, budget = [e.height * e.width for e in train], cfg.memory_mb * 2**20
    joint = sum(per_pixel.values()) * sum(pixels) <= budget
    if joint:
        train_f, val_f = (deeplab_feature_lists(model, entries, device, input_size) for entries in (train, val))
    out = {}
    for where, name in (("backbone", "probe_backbone"), ("head", "refit_last_conv")):
        keep = list(range(len(train)))
        if not joint:
            keep = images_within_budget(pixels, per_pixel[where], budget, cfg.seed)
            if len(keep) < len(train):
                log(f"linear:{where}: features of {len(keep)} of {len(train)} training images fit")
            kept = [train[i] for i in keep]
            train_f, val_f = (deeplab_feature_lists(model, x, device, input_size, (where,)) for x in (kept, val))
        conv = train_linear_probe(
            train_f[where],
            [train_gts[i] for i in keep],
            n_classes,
            epochs=cfg.epochs,
            lr=cfg.lr,
            ignore_index=ignore,
            seed=cfg.seed,
            device=str(device),
        )
        preds = [predict_probe(conv, f, g.shape) for f, g in zip(val_f[where], val_gts, strict=True)]
        row = score_label_maps(zip(preds, val_gts, strict=True), n_classes, n_classes, ignore)
        out[name] = {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"]}
    return out


def baseline_rows(val: Sequence[ImageEntry], score: Score, n_classes: int, seed: int, pixels: int) -> dict:
    """Label-free references: every pixel in one class, and K-means on raw RGB pixels with k = classes."""
    rows = {"all one class": score({e.id: np.zeros((e.height, e.width), np.int64) for e in val}, 1)}
    raw = raw_pixel_kmeans_labels([read_image(e) for e in val], n_classes, seed, pixels)
    rows["K-means on raw pixels"] = score({e.id: r for e, r in zip(val, raw, strict=True)}, n_classes)
    return rows


def mined_mask_fg_iou(
    masks: store.RaggedStore, feature_attrs: dict, by_id: dict[int, ImageEntry], gts: dict, upsample: str
) -> float | None:
    """Dataset-level foreground IoU of the mined masks on the images of ``gts``."""
    grids, fg = masks.read("grid"), ForegroundIoU()
    a = feature_attrs
    for i, image_id in enumerate(masks.read("image_id")):
        if int(image_id) in gts:
            e = by_id[int(image_id)]
            g = geometry(e.height, e.width, a["short_side"], a["backbone"]["patch_size"], a["fit"])
            fg.update(token_mask_to_pixels(masks.rows("token_mask", i).reshape(grids[i]), g, upsample), gts[e.id])
    return fg.result()["iou"]
