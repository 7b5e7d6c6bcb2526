"""HSG pretraining on unlabeled images, on the shared harness (resume, DDP, bf16 on GPU, loss log).

Each image gets two views (random resized crop, flip, colour jitter, grayscale; reference.md §3.1) and the
region map of each view: the image's Felzenszwalb superpixels (computed once per image and cached as
``.npy`` files) cropped and flipped with the view and sampled (nearest) at the embedding resolution, so a
region keeps its id in both views. Steps ``0 .. stage1_steps-1`` are the released first stage (SegSort only,
level-0 K-means from a 1x1 grid, 1 iteration); the rest the full objective. Optimiser: SGD with momentum,
linear warm-up from 0.1 lr, then x0.1 at the ``lr_milestones`` fractions of the steps (released: 0.32, 0.56,
0.75); the released per-module lr multipliers are not reproduced. Prototypes are not gathered across
processes under DDP (each rank contrasts its own batch; the released code gathers them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unseg.data.index import ImageEntry, read_image
from unseg.hsg.grouping import superpixels
from unseg.hsg.model import ClusteringTransformer, EmbeddingFCN
from unseg.hsg.objective import HSGConfig, hsg_losses
from unseg.pretrain.views import Photometric, crop_view, photometric, random_resized_crop_box, to_float_image
from unseg.train import harness as H


@dataclass(frozen=True)
class HSGTraining:
    backbone: str = "resnet18"
    dim: int = 128
    output_stride: int = 16
    fine_groups: int = 8
    coarse_groups: int = 4
    steps: int = 200
    stage1_steps: int = 100  # SegSort-only steps first (released: a separate 350k-step run)
    batch_size: int = 8  # images (two views each)
    crop_size: int = 128
    crop_scale_min: float = 0.5
    crop_scale_max: float = 1.0
    lr: float = 0.01
    stage2_lr: float | None = None  # None: one schedule over all steps; else the full objective restarts at it
    head_lr_mult: float = 1.0  # lr multiplier of the transformers and the positional tables (released: 10)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lr_milestones: tuple[float, ...] = (0.32, 0.56, 0.75)
    superpixel_scale: float = 100.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 20
    amp: bool = True
    seed: int = 0
    workers: int = 0
    ckpt_every: int = 100


class TwoViewRegions:
    """``make_batch(indices, step)`` for :class:`harness.StepBatches`: (views (2B, 3, S, S), regions (2B, s, s))."""

    def __init__(self, entries: Sequence[ImageEntry], t: HSGTraining, cache: Path):
        self.entries, self.t, self.cache = list(entries), t, Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.aug = Photometric(saturation=0.4, hue=0.1, blur_p=0.0, solarize_p=0.0)

    def regions(self, i: int, image: np.ndarray) -> np.ndarray:
        e = self.entries[i]
        path = self.cache / f"{e.id}_{H.file_digest(e.file)}.npy"  # another image under the same id: a new file
        if path.exists():
            sp = np.load(path)
            if sp.shape == image.shape[:2]:
                return sp
        sp = superpixels(image, self.t.superpixel_scale, self.t.superpixel_sigma, self.t.superpixel_min_size)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # workers and ranks may race on an image
        np.save(tmp, sp)
        tmp.replace(path)
        return sp

    def __call__(self, indices: list[int], step: int):
        t, grid = self.t, self.t.crop_size // self.t.output_stride
        views, regions = [], []
        for i in indices:
            array = read_image(self.entries[i])
            image, sp = (
                to_float_image(torch.from_numpy(array).permute(2, 0, 1)),
                torch.from_numpy(self.regions(i, array)),
            )
            gen = torch.Generator().manual_seed(H.step_seed(t.seed, step, salt=5000 + i))
            for _ in range(2):
                box = random_resized_crop_box(*sp.shape, (t.crop_scale_min, t.crop_scale_max), (3 / 4, 4 / 3), gen)
                flip = bool(torch.rand((), generator=gen) < 0.5)
                views.append(photometric(crop_view(image, box, t.crop_size, flip), self.aug, gen))
                top, left, h, w = box
                r = sp[top : top + h, left : left + w][None, None].float()
                r = F.interpolate(r, size=(grid, grid), mode="nearest")[0, 0].long()
                regions.append(r.flip(-1) if flip else r)
        return torch.stack(views), torch.stack(regions)


@dataclass
class HSGModels:
    net: EmbeddingFCN
    fine: ClusteringTransformer
    coarse: ClusteringTransformer


def build_models(t: HSGTraining, output_stride: int | None = None) -> HSGModels:
    """The FCN and the two transformers; ``output_stride``: the FCN's at test, when not the trained one."""
    return HSGModels(
        EmbeddingFCN(t.backbone, t.dim, output_stride or t.output_stride, trained_stride=t.output_stride),
        ClusteringTransformer(t.fine_groups, t.dim),
        ClusteringTransformer(t.coarse_groups, t.dim),
    )


def param_groups(models: HSGModels, head_lr_mult: float) -> list[dict]:
    """SGD groups, each with its lr multiplier ``mult``: one group when ``head_lr_mult`` is 1, else the trunk
    and embedding head, then the transformers and positional tables (released: 10x lr)."""
    everything = [p for m in (models.net, models.fine, models.coarse) for p in m.parameters()]
    if head_lr_mult == 1.0:
        return [{"params": everything, "mult": 1.0}]
    heads = {id(p) for m in (models.fine, models.coarse, models.net.position) for p in m.parameters()}
    return [{"params": [p for p in everything if id(p) not in heads], "mult": 1.0},
            {"params": [p for p in everything if id(p) in heads], "mult": head_lr_mult}]  # fmt: skip


def learning_rate(step: int, t: HSGTraining) -> float:
    """Warm-up from 0.1 lr, then x0.1 at each milestone (fractions of the schedule's length). One schedule over
    all steps, or (``stage2_lr`` set, as released) one per stage: the full objective restarts at ``stage2_lr``."""
    base, start, length = t.lr, 0, t.steps
    if t.stage2_lr is not None:
        length = t.stage1_steps
        if step >= t.stage1_steps:
            base, start, length = t.stage2_lr, t.stage1_steps, t.steps - t.stage1_steps
    at = step - start
    if at < t.warmup_steps:
        return base * (0.1 + 0.9 * at / t.warmup_steps)
    return H.step_decay(base, at, [int(f * length) for f in t.lr_milestones])


def train_hsg(
    models: HSGModels, entries: Sequence[ImageEntry], t: HSGTraining, objective: HSGConfig,
    ckpt: H.CheckpointDir, log_path, cache: Path, device, info: H.DistInfo = H.SINGLE_PROCESS,
) -> int:  # fmt: skip
    """Train in place for ``t.steps`` steps (resuming from ``ckpt``); returns the number of steps run."""
    parts = [models.net, models.fine, models.coarse]
    for m in parts:
        m.to(device)
    net = H.wrap_ddp(models.net, info, device, find_unused_parameters=True)
    fine, coarse = models.fine, models.coarse  # called once per image: their gradients are averaged by hand
    opt = torch.optim.SGD(param_groups(models, t.head_lr_mult), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay)  # fmt: skip
    batches = H.StepBatches(len(entries), t.batch_size, t.seed, TwoViewRegions(entries, t, cache), info)
    first_stage = replace(objective, hierarchy=False, kmeans_grid=(1, 1), kmeans_iters=1)

    def step_fn(step: int, batch) -> dict[str, float]:
        views, regions = batch
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, t) * g["mult"]
        net.train(), fine.train(), coarse.train()
        with H.autocast(device, t.amp):
            emb, pos = net(views.to(device, non_blocking=True))
        cfg = first_stage if step < t.stage1_steps else objective
        out = hsg_losses(emb.float(), pos.float(), regions.to(device), cfg, fine, coarse)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        H.average_gradients([fine, coarse])
        opt.step()
        logged = {"loss": out["loss"], **out}  # loss first: the log's column order
        values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logged.items()}
        return values | {"lr": opt.param_groups[0]["lr"]}

    return H.train_loop(
        step_fn,
        lambda start: H.step_loader(batches, start, t.steps, t.workers),
        {"net": models.net, "fine": models.fine, "coarse": models.coarse, "opt": opt},
        t.steps, ckpt, log_path, t.ckpt_every, t.seed, info, desc="hsg",
    )  # fmt: skip


def export_state(models: HSGModels, meta: dict) -> dict:
    """The trained weights: ``state_dict`` = the ResNet trunk in torchvision names (what Mask R-CNN and DeepLab
    load through ``unseg.models.resnet.load_resnet_weights``), ``embedding_head`` = conv_out and positions,
    ``transformers``, and ``meta`` (provenance, digest)."""
    trunk = {k: v for k, v in models.net.resnet.state_dict().items() if not k.startswith("fc.")}
    head = {k: v for k, v in models.net.state_dict().items() if not k.startswith("resnet.")}
    transformers = {"fine": models.fine.state_dict(), "coarse": models.coarse.state_dict()}
    return {"state_dict": trunk, "embedding_head": head, "transformers": transformers, "meta": meta}


def load_exported(models: HSGModels, state: dict) -> HSGModels:
    """The weights of :func:`export_state` back into ``models`` (strictly: every tensor must match)."""
    missing = models.net.load_state_dict(
        {**{f"resnet.{k}": v for k, v in state["state_dict"].items()}, **state["embedding_head"]}, strict=False
    ).missing_keys
    if [k for k in missing if not k.startswith("resnet.fc.")]:
        raise ValueError(f"the HSG checkpoint lacks {missing[:3]}")
    models.fine.load_state_dict(state["transformers"]["fine"])
    models.coarse.load_state_dict(state["transformers"]["coarse"])
    return models
