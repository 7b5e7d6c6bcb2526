"""The whole pipeline at the paper's geometry on a handful of images: does it run, and how much memory?

    python benchmarks/paper_smoke.py [--dir DIR] [--out benchmarks/results/paper_smoke.json]

configs/paper.yaml with only what a CPU smoke run needs changed: the generated dataset (4 + 2 images of
480-640 px) instead of VOC, CrOC for 1 step instead of DINO weights, torchvision's R50-C4 Mask R-CNN
(detectron2 is not installable here) for 1 step, DeepLab R50 OS8 at 512 px for 1 epoch, 1 probe epoch.
Geometry is the paper's: ViT-S/16 at shortest side 640, Mask R-CNN at 480-800 / test 800 (max 1333),
DeepLab crops of 512. Each stage command of dvc.yaml runs in order as its own process; its wall time
and peak resident memory (``wait4``'s ru_maxrss, the process and its children) are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {
    "data": {"dataset": "generated", "root": None, "train_split": "train", "val_split": "val", "n_train": 4},
    "backbone": {"weights": None},
    "croc": {"steps": 1, "batch_size": 2, "warmup_steps": 1, "freeze_last_layer_steps": 0, "workers": 0},
    "features": {"batch_size": 2, "workers": 0},
    "mining": {"batch_size": 4},
    "cluster": {"classes": 2, "weights": None, "arch": None, "patch_size": None, "batch_size": 2},
    "distill": {
        "backend": "torchvision",
        "backbone_weights": None,
        "trainable_layers": 5,
        "steps": 1,
        "batch_size": 1,
        "lr_steps": [1],
        "warmup_steps": 1,
        "ckpt_every": 1,
        "workers": 0,
    },
    "deeplab": {"backbone_weights": None, "freeze_blocks": 0, "epochs": 1, "batch_size": 2, "lr_step_epochs": []},
    "evaluate": {"probe_epochs": 1},
}
SMOKE["data"].update(n_val=2, n_categories=2, max_instances=2, min_side=480, max_side=640, video_sequences=0)
SMOKE["deeplab"].update(ckpt_every=1, workers=0)


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k) or {}, v) if isinstance(v, dict) else v
    return base


def make_project(where: Path) -> Path:
    for name in ("stages", "unseg", "checkpoints"):
        shutil.copytree(ROOT / name, where / name)
    params = deep_update(yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()), SMOKE)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return where


def run_stage(cmd: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(cwd), "UNSEG_QUIET": "1"}
    start = time.time()
    proc = subprocess.Popen(cmd.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"paper_smoke: `{cmd}` failed with status {proc.returncode}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="project copy to run in (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "paper_smoke.json")
    args = ap.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="unseg_paper_smoke_"))
    where.mkdir(parents=True, exist_ok=True)
    project = make_project(where)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    results = {}
    for name, stage in stages.items():
        results[name] = run_stage(" ".join(stage["cmd"].split()), project)
        print(f"paper_smoke: {name}: {results[name]}", flush=True)
    table1 = json.loads((project / "artifacts" / "metrics" / "table1.json").read_text())
    summary = {
        "geometry": "ViT-S/16 at 640, Mask R-CNN R50-C4 at 480-800 (test 800), DeepLab R50 OS8 at 512",
        "images": SMOKE["data"]["n_train"] + SMOKE["data"]["n_val"],
        "stages": results,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
        "table1_rows": sorted(table1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
