"""Which detectron2 Mask R-CNN fits the tiny budget: seconds per training step and per predicted image of the
tiny profile's R18-FPN (``distill`` as in params.yaml) against the paper's R50-C4 layout at the same image sizes,
on the workspace's own pseudo-labels. Run after ``make repro`` and ``make detectron2``:

    python -m benchmarks.detectron2_tiny [--steps 20] [--images 32]

Writes ``benchmarks/results/detectron2_tiny.json``. The first 3 steps of each run are left out of the step time
(allocator warm-up); the tiny budget is ``distill.steps`` steps plus predicting every image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from unseg.coco import read_json
from unseg.data.index import DatasetIndex
from unseg.distill.detectron2_config import detectron2_config, require_detectron2
from unseg.distill.params import split_instances
from unseg.params import load_params

CANDIDATES = {"r18_fpn": {}, "r50_c4": {"backbone": "resnet50", "fpn": False, "trainable_layers": 5}}
WARMUP = 3


def measure(distill, index: DatasetIndex, pseudo: dict, images: int, budget_steps: int) -> dict:
    from unseg.distill import detectron2_backend as D2

    train_ids = {e.id for e in index.split("train")}
    paths = {e.id: e.file for e in index.images}
    times: list[float] = []

    class Clock(D2.HookBase):
        def before_step(self):
            self.start = time.perf_counter()

        def after_step(self):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = D2.build_cfg(detectron2_config(distill, num_classes=len(pseudo["categories"])))
        records = D2.register_pseudo_labels(split_instances(pseudo, train_ids), paths)
        model, _, _ = D2.train_detectron2(
            cfg,
            records,
            ckpt_dir=Path(tmp),
            log_path=Path(tmp) / "loss.csv",
            seed=0,
            flip_p=distill.flip_p,
            clip_grad=distill.clip_grad,
            amp=False,
            workers=0,
            extra_hooks=[Clock()],
        )
        start = time.perf_counter()
        val = [(e.id, e.file) for e in index.split("val")][:images]
        D2.predict_detectron2(model, cfg, val, category_ids=D2.category_ids(), batch_size=distill.batch_size)
        predict_s = (time.perf_counter() - start) / len(val)
    step_s = sum(times[WARMUP:]) / len(times[WARMUP:])
    return {
        "step_s": step_s,
        "predict_s_per_image": predict_s,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "budget_steps": budget_steps,
        "tiny_budget_min": (budget_steps * step_s + len(index.images) * predict_s) / 60,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "detectron2_tiny.json")
    args = ap.parse_args()
    require_detectron2()
    params = load_params("params.yaml")
    index = DatasetIndex.load("data/prepared/index.json")
    pseudo = read_json("artifacts/pseudo_labels/instances.json")
    results = {"threads": torch.get_num_threads(), "steps_timed": args.steps - WARMUP}
    for name, changes in CANDIDATES.items():
        distill = dataclasses.replace(params.distill, steps=args.steps, lr_steps=[], ckpt_every=args.steps, **changes)
        results[name] = measure(distill, index, pseudo, args.images, params.distill.steps)
        print(name, json.dumps(results[name]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
