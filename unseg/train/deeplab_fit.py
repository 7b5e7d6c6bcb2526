"""DeepLab trained on a semantic label store and applied to every image: what ``train_deeplab`` and each CRF
self-training round (``self_train``) do, in one place (MaskDistill Sec. 3.3 and 4.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from unseg import store
from unseg.data.index import ImageEntry, read_image
from unseg.deeplab import DeepLabTraining, SemanticBatches, architecture_of, build_deeplab, predict_entries
from unseg.deeplab import train_deeplab as train_loop
from unseg.models.bundle import Preprocess, load_state, make_bundle, read_bundle, save_bundle
from unseg.params import config_from
from unseg.train import harness as H

UNTRAINED = {"device", "workers", "ckpt_every"}  # deeplab params that do not change the trained weights


def fit_deeplab(
    deeplab,
    *,
    entries: Sequence[ImageEntry],
    labels: Path,
    num_classes: int,
    ckpt_dir: Path,
    log_path: Path,
    device: torch.device,
    info: H.DistInfo = H.SINGLE_PROCESS,
    init_weights: str | None = None,
    init_model: Path | None = None,
    on_epoch_end: Callable[[torch.nn.Module, H.CheckpointDir], Callable[[int], None]] | None = None,
) -> tuple[torch.nn.Module, int, str]:
    """Train the DeepLab of the ``deeplab`` params section on the label maps of ``labels`` (a semantic store
    holding every entry), resuming from ``ckpt_dir``; returns (model, steps run now, the training digest that
    guards ``ckpt_dir``). It starts from scratch, from ``init_weights`` (a ResNet checkpoint for the backbone), or
    from ``init_model`` (a DeepLab ``model.pt`` bundle of the same architecture: every weight)."""
    pseudo = store.RaggedStore(labels)
    row_of = {int(i): r for r, i in enumerate(pseudo.read("image_id"))}
    torch.manual_seed(deeplab.seed)
    model = build_deeplab(num_classes, backbone_weights=init_weights, **architecture_of(deeplab))
    if init_model is not None:
        load_state(model, read_bundle(init_model, "deeplab")).train()
    batches = SemanticBatches(
        images=lambda i: torch.from_numpy(read_image(entries[i])).permute(2, 0, 1),
        labels=lambda i: store.read_semantic_map(pseudo, row_of[entries[i].id]),
        crop_size=deeplab.crop_size,
        scale_range=(deeplab.scale_min, deeplab.scale_max),
        max_rotation=deeplab.max_rotation,
        flip_p=deeplab.flip_p,
        label_fill=deeplab.label_fill,
        seed=deeplab.seed,
        num_classes=num_classes,
    )
    trained = {key: v for key, v in vars(deeplab).items() if key not in UNTRAINED}
    ids = [e.id for e in entries]
    starts = [*H.init_digest(init_weights), *H.init_digest(init_model)]
    digest = H.params_digest(trained, H.file_digest(labels), num_classes - 1, ids, *starts)
    ckpt = H.CheckpointDir(ckpt_dir, digest, info.is_main)
    hook = on_epoch_end(model, ckpt) if on_epoch_end else None
    training = config_from(DeepLabTraining, deeplab)
    ran = train_loop(model, batches, len(entries), training, ckpt, log_path, device, info, hook)
    return model, ran, digest


def deeplab_bundle(model: torch.nn.Module, deeplab, num_classes: int, digest: str) -> dict:
    """The ``model.pt`` bundle of a DeepLab trained with the ``deeplab`` params section."""
    return make_bundle(
        "deeplab",
        model=model,
        architecture=architecture_of(deeplab),
        num_classes=num_classes,
        preprocess=Preprocess(input_size=deeplab.crop_size, output_stride=deeplab.output_stride),
        params_digest=digest,
    )


def predict_to_store(
    model: torch.nn.Module,
    entries: Sequence[ImageEntry],
    out: Path,
    *,
    device: torch.device,
    amp: bool,
    input_size: int | None,
    kind: str,
) -> Path:
    """The uint8 argmax map of each entry's image at its original resolution, written to the semantic store
    ``out`` (``attrs``: ``kind`` and ``num_classes``)."""
    maps = predict_entries(model, entries, device, amp, input_size)
    attrs = {"kind": kind, "num_classes": int(model.head[4].out_channels)}
    return store.write_semantic(out, np.array([e.id for e in entries]), maps, attrs)


def write_deeplab_outputs(
    model: torch.nn.Module,
    deeplab,
    entries: Sequence[ImageEntry],
    out: Path,
    *,
    num_classes: int,
    digest: str,
    device: torch.device,
    kind: str,
) -> None:
    """A trained DeepLab's stage outputs in ``out``: the ``model.pt`` bundle, ``predictions.zarr`` over ``entries``."""
    out.mkdir(parents=True, exist_ok=True)
    save_bundle(deeplab_bundle(model, deeplab, num_classes, digest), out / "model.pt")
    predict_to_store(
        model,
        entries,
        out / "predictions.zarr",
        device=device,
        amp=deeplab.amp,
        input_size=deeplab.crop_size,
        kind=kind,
    )
