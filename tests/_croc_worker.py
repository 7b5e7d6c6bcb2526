"""Run a few CrOC steps on a tiny generated dataset (used by test_pretrain.py, also under torchrun)."""

import sys
from pathlib import Path

import torch

from unseg.data.index import prepare_generated
from unseg.pretrain.croc import CrOCConfig
from unseg.pretrain.trainer import CrOCTraining, build_models, train_croc
from unseg.train import harness as H

TRAINING = dict(
    steps=3,
    batch_size=4,
    crop_size=32,
    lr=0.01,
    out_dim=64,
    out_dim_c=32,
    head_hidden=32,
    head_bottleneck=16,
    drop_path=0.0,
    ckpt_every=1,
    amp=False,
)


def run(workdir: Path, out: Path, alpha_s: float = 0.0, **overrides) -> None:
    device = torch.device("cpu")
    info = H.setup_distributed(device)
    index = prepare_generated(workdir / "data", 8, 0, 3, 2, 48, 48, seed=0) if info.is_main else None
    if info.enabled:
        torch.distributed.barrier()
    if index is None:
        from unseg.data.index import DatasetIndex, ImageEntry

        files = sorted((workdir / "data" / "images").glob("*.png"))
        index = DatasetIndex("generated", [ImageEntry(i, str(f), 48, 48, "train") for i, f in enumerate(files)])
    t = CrOCTraining(**{**TRAINING, **overrides})
    torch.manual_seed(0)
    models = build_models("vit_tiny_patch16_224", 8, 2, t)
    ckpt = H.CheckpointDir(workdir / f"ckpt_{info.world_size}", "digest", info.is_main)
    train_croc(models, index.split("train"), t, CrOCConfig(alpha_s=alpha_s), ckpt, workdir / "log.csv", device, info)
    if info.is_main:
        torch.save(models.teacher.state_dict(), out)
        torch.save(models.student.state_dict(), out.with_suffix(".student.pt"))


if __name__ == "__main__":  # workdir, out[, alpha_s]
    run(Path(sys.argv[1]), Path(sys.argv[2]), *(float(a) for a in sys.argv[3:4]))
