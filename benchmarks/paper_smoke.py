"""The whole pipeline at the paper's geometry on a handful of images: does it run, and how much memory?

    python benchmarks/paper_smoke.py [--dir DIR] [--backends torchvision,detectron2] [--out FILE]

configs/paper.yaml with only what a CPU smoke run needs changed: the generated dataset (4 + 2 images of
480-640 px) instead of VOC, CrOC for 1 step instead of DINO weights, the R50-C4 Mask R-CNN from scratch for
1 step, DeepLab R50 OS8 at 512 px for 1 epoch, 1 probe epoch. Geometry is the paper's: ViT-S/16 at shortest
side 640, Mask R-CNN at 480-800 / test 800 (max 1333), DeepLab crops of 512. Each stage command of dvc.yaml
runs in order as its own process; its wall time and peak resident memory (``wait4``'s ru_maxrss, the process
and its children) are written to ``--out``. The first of ``--backends`` (``distill.backend``) runs every
stage; each further one reruns ``distill_maskrcnn`` and the stages downstream of it. Default: both backends
where detectron2 loads (``make detectron2``), torchvision alone otherwise.
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
sys.path.insert(0, str(ROOT))
from unseg.dvcfile import load_stages  # noqa: E402  (yaml only: this process stays free of torch)

SMOKE = {
    "data": {"dataset": "generated", "root": None, "train_split": "train", "val_split": "val", "n_train": 4},
    "backbone": {"weights": None},
    "croc": {"steps": 1, "batch_size": 2, "warmup_steps": 1, "freeze_last_layer_steps": 0, "workers": 0},
    "features": {"batch_size": 2, "workers": 0},
    "mining": {"batch_size": 4},
    "cluster": {"classes": 2, "weights": None, "arch": None, "patch_size": None, "batch_size": 2},
    "distill": {
        "backbone_weights": None,
        "trainable_layers": 5,
        "steps": 1,
        "batch_size": 1,
        "lr_steps": [],
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
    return where


def write_params(project: Path, backend: str) -> None:
    params = deep_update(yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()), SMOKE)
    params["distill"]["backend"] = backend
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def downstream_of(stages: dict, first: str) -> list[str]:
    """``first`` and every stage that depends, through its deps, on an out of a stage already in the list."""

    def paths(entries) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    chosen, outs = [first], paths(stages[first].get("outs"))
    for name, stage in stages.items():
        deps = paths(stage.get("deps"))
        if name != first and any(d == o or d.startswith(o + "/") for d in deps for o in outs):
            chosen.append(name)
            outs += paths(stage.get("outs"))
    return chosen


def run_stage(cmd: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(cwd), "UNSEG_QUIET": "1"}
    start = time.time()
    proc = subprocess.Popen(cmd.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"paper_smoke: `{cmd}` failed with status {proc.returncode}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def detectron2_loads() -> bool:
    """Whether detectron2 and its ops load, asked of a child process: torch imported here would count in every
    stage's peak memory (a forked child starts with its parent's resident pages)."""
    check = "from unseg.distill.detectron2_config import require_detectron2; require_detectron2()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", check], env=env, capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="project copy to run in (default: a temporary folder)")
    ap.add_argument("--backends", default="torchvision,detectron2" if detectron2_loads() else "torchvision")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "paper_smoke.json")
    args = ap.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="unseg_paper_smoke_"))
    where.mkdir(parents=True, exist_ok=True)
    project = make_project(where)
    stages = load_stages(ROOT / "dvc.yaml")
    runs = {}
    for i, backend in enumerate(args.backends.split(",")):
        write_params(project, backend)
        results = {}
        for name in stages if i == 0 else downstream_of(stages, "distill_maskrcnn"):
            results[name] = run_stage(" ".join(stages[name]["cmd"].split()), project)
            print(f"paper_smoke: {backend}: {name}: {results[name]}", flush=True)
        table1 = json.loads((project / "artifacts" / "metrics" / "table1.json").read_text())
        runs[backend] = {
            "stages": results,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
            "table1_rows": sorted(table1),
        }
    summary = {
        "geometry": "ViT-S/16 at 640, Mask R-CNN R50-C4 at 480-800 (test 800), DeepLab R50 OS8 at 512",
        "images": SMOKE["data"]["n_train"] + SMOKE["data"]["n_val"],
        "backends": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
