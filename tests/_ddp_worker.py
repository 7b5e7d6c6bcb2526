"""A few DeepLab or Mask R-CNN steps on made-up images, in one process or under torchrun (test_ddp_training.py).

    python _ddp_worker.py {deeplab,maskrcnn} WORKDIR [frozen_bn] [ohem]

``frozen_bn``: every BatchNorm a fixed affine map (FrozenBatchNorm2d); ``ohem``: DeepLab's hard-pixel loss at 0.2
(plain cross-entropy without it). Writes WORKDIR/log_<world size>.csv (the harness's loss log) and
WORKDIR/weights_<world size>.pt.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from unseg.train import harness as H

N_IMAGES, SIZE, STEPS, BATCH = 8, 64, 4, 4


def shapes(i: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Image ``i``: noise with one or two bright rectangles (x0, y0, x1, y1) on it."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
    boxes = []
    for _ in range(1 + i % 2):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 24, 2))
        w, h = (int(v) for v in rng.integers(12, 24, 2))
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(150, 256, 3, dtype=np.uint8)
        boxes.append((x0, y0, x0 + w, y0 + h))
    return image, boxes


def deeplab_model(frozen_bn: bool) -> torch.nn.Module:
    """The DeepLab every run starts from: seed 0, no dropout (its masks would come from each rank's stream)."""
    from unseg.deeplab import build_deeplab
    from unseg.distill.maskrcnn import freeze_batchnorm

    torch.manual_seed(0)
    model = build_deeplab(3, "resnet18", 16, (6, 12), freeze_blocks=0, dropout=0.0)
    return freeze_batchnorm(model) if frozen_bn else model


def deeplab(workdir: Path, info: H.DistInfo, frozen_bn: bool, ohem: bool) -> torch.nn.Module:
    from unseg.deeplab import DeepLabTraining, SemanticBatches, train_deeplab

    model = deeplab_model(frozen_bn)
    data = [shapes(i) for i in range(N_IMAGES)]
    labels = [np.zeros((SIZE, SIZE), np.int64) for _ in data]
    for label, (_, boxes) in zip(labels, data, strict=True):
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            label[y0:y1, x0:x1] = 1 + k
    batches = SemanticBatches(
        lambda i: torch.from_numpy(data[i][0]).permute(2, 0, 1), lambda i: labels[i], 48, (1.0, 1.3), 0.0, 0.5, 255, 0
    )  # zoom in, never out, and no rotation: no pixel is ignored, every rank's share has the same pixel count
    t = DeepLabTraining(
        epochs=STEPS * BATCH // N_IMAGES, batch_size=BATCH, lr=0.02, ohem_fraction=0.2 if ohem else 1.0, amp=False
    )
    ckpt = H.CheckpointDir(workdir / f"ckpt_{info.world_size}", "digest", info.is_main)
    train_deeplab(model, batches, N_IMAGES, t, ckpt, workdir / f"log_{info.world_size}.csv", torch.device("cpu"), info)
    return model


def maskrcnn(workdir: Path, info: H.DistInfo, frozen_bn: bool) -> torch.nn.Module:
    from PIL import Image

    from unseg.distill.maskrcnn import CocoInstanceDataset, build_maskrcnn
    from unseg.distill.trainer import MaskRCNNTraining, train_maskrcnn

    images, annotations, paths = [], [], {}
    for i in range(N_IMAGES):
        image, boxes = shapes(i)
        paths[i] = workdir / "images" / f"{i}.png"
        if info.is_main:
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(paths[i])
        images.append({"id": i, "width": SIZE, "height": SIZE, "file_name": paths[i].name})
        for x0, y0, x1, y1 in boxes:
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
            annotations.append({"id": len(annotations), "image_id": i, "category_id": 1, "segmentation": [polygon]})
    H.barrier()
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
    dataset = CocoInstanceDataset(coco, paths, train_sizes=(SIZE,), max_size=2 * SIZE)
    torch.manual_seed(0)
    model = build_maskrcnn(
        1, "resnet18", 5, SIZE, 2 * SIZE, anchor_sizes=(8, 16, 32, 64, 128), representation_size=64,
        mask_head_channels=(32,), fpn_channels=32, norm="frozen" if frozen_bn else "bn",
    )  # fmt: skip
    t = MaskRCNNTraining(steps=STEPS, batch_size=BATCH, lr=0.01, lr_steps=(), warmup_steps=0, amp=False)
    ckpt = H.CheckpointDir(workdir / f"ckpt_{info.world_size}", "digest", info.is_main)
    train_maskrcnn(model, dataset, t, ckpt, workdir / f"log_{info.world_size}.csv", torch.device("cpu"), info)
    return model


def run(kind: str, workdir: Path, frozen_bn: bool = False, ohem: bool = False) -> None:
    info = H.setup_distributed(torch.device("cpu"))
    model = maskrcnn(workdir, info, frozen_bn) if kind == "maskrcnn" else deeplab(workdir, info, frozen_bn, ohem)
    if info.is_main:
        torch.save(model.state_dict(), workdir / f"weights_{info.world_size}.pt")


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), "frozen_bn" in sys.argv[3:], "ohem" in sys.argv[3:])
