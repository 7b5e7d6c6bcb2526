"""Train detectron2's Mask R-CNN on a COCO json in a process of its own (tests/test_detectron2.py kills it).

    python tests/_detectron2_worker.py PSEUDO_JSON CKPT_DIR STEPS CKPT_EVERY

Writes ``CKPT_DIR/final.pt`` (the trained weights) and ``CKPT_DIR/predictions.json`` when training ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from unseg.coco import read_json, write_json
from unseg.params import parse_params

# the torchvision test's micro Mask R-CNN (tests/test_maskrcnn.py TINY) in params form, at 64-80 px
MICRO_DISTILL = {
    "backend": "detectron2",
    "batch_size": 2,
    "lr": 0.02,
    "warmup_steps": 10,
    "train_min_size": 64,
    "train_max_size": 80,
    "test_size": 64,
    "max_size": 96,
    "anchor_sizes": [8, 16, 24, 32, 48],
    "representation_size": 64,
    "mask_head_channels": [32],
    "fpn_channels": 64,
    "train_proposals": 100,
    "test_proposals": 50,
    "box_batch_size_per_image": 64,
    "rpn_batch_size_per_image": 64,
}


def micro_distill(steps: int, ckpt_every: int, **changes):
    section = {**MICRO_DISTILL, "steps": steps, "lr_steps": [steps * 4 // 5], "ckpt_every": ckpt_every, **changes}
    return parse_params({"distill": section}).distill


def train(pseudo_json: Path, ckpt_dir: Path, steps: int, ckpt_every: int):
    from unseg.distill.detectron2_backend import distill_with_detectron2

    coco = read_json(pseudo_json)
    paths = {int(im["id"]): pseudo_json.parent / im["file_name"] for im in coco["images"]}
    return distill_with_detectron2(
        micro_distill(steps, ckpt_every),
        instances=coco,
        image_paths=paths,
        predict=sorted(paths.items()),
        backbone_weights=None,
        ckpt_dir=ckpt_dir,
        log_path=ckpt_dir / "loss.csv",
        device=torch.device("cpu"),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    json_path, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    done = train(json_path, ckpt, int(sys.argv[3]), int(sys.argv[4]))
    torch.save(done.model.state_dict(), ckpt / "final.pt")
    write_json(done.predictions, ckpt / "predictions.json")
