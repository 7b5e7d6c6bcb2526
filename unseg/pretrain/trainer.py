"""CrOC pretraining of a timm ViT on unlabeled images, on the shared harness (DINO-style loop).

Student and EMA teacher share the architecture; each has a ``CrOCHead``. One step: two
position-aware views per image -> ``croc_forward_loss`` -> AdamW step (cosine lr and weight-decay
schedules, DINO's linear scaling lr = base_lr * batch / 256, gradient clipping, last layer frozen for
the first steps) -> EMA teacher update with the cosine momentum schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from unseg.data.index import ImageEntry, read_image
from unseg.models.heads import CrOCHead, cancel_last_layer_grads
from unseg.models.vit import create_vit
from unseg.pretrain.croc import CrOCConfig, CrOCLoss, TokenOutput, croc_forward_loss, ema_update, teacher_momentum
from unseg.pretrain.views import Photometric, ViewConfig, batch_of_views
from unseg.train import harness as H


@dataclass(frozen=True)
class CrOCTraining:
    """Optimisation and architecture knobs (the objective's constants are in ``CrOCConfig``)."""

    steps: int
    schedule_steps: int | None = None  # length of the lr / weight-decay / momentum schedules (None: steps)
    batch_size: int = 32
    crop_size: int = 64
    crop_scale_min: float = 0.25
    crop_scale_max: float = 1.0
    blur_sigma_max: float = 2.0  # DINO: sigma in [0.1, 2] px at 224 px views
    hue: float = 0.1
    saturation: float = 0.2
    grayscale_p: float = 0.2
    lr: float = 5e-4  # per 256 images (DINO linear scaling)
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 0
    drop_path: float = 0.1
    momentum_teacher: float = 0.996
    out_dim: int = 65536
    out_dim_c: int = 8192
    head_hidden: int = 2048
    head_bottleneck: int = 256
    amp: bool = True
    seed: int = 0
    workers: int = 0
    ckpt_every: int = 100


@dataclass
class CrOCModels:
    student: nn.Module
    teacher: nn.Module
    student_head: CrOCHead
    teacher_head: CrOCHead


def build_models(
    arch: str, patch: int, depth: int | None, t: CrOCTraining, reg_tokens: int = 0, stem: str = "patch"
) -> CrOCModels:
    """Student (with drop-path) and a teacher that starts as its exact copy, each with a CrOC head."""
    kw = dict(img_size=t.crop_size, reg_tokens=reg_tokens, stem=stem)
    student = create_vit(arch, patch, depth, drop_path_rate=t.drop_path, **kw)
    teacher = create_vit(arch, patch, depth, **kw)
    teacher.load_state_dict(student.state_dict())
    dim = student.embed_dim

    def head():
        return CrOCHead(dim, t.out_dim, t.out_dim_c, t.head_hidden, t.head_bottleneck)

    s_head, t_head = head(), head()
    t_head.load_state_dict(s_head.state_dict())
    for p in [*teacher.parameters(), *t_head.parameters()]:
        p.requires_grad_(False)
    return CrOCModels(student, teacher, s_head, t_head)


def param_groups(modules: Sequence[nn.Module]) -> list[dict]:
    """DINO: no weight decay on biases and 1-D parameters (norms, tokens' scales)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


CACHE_BYTES = 1 << 30  # decoded uint8 images kept per process: all of a small folder, a bounded share of a big one


class ViewBatches:
    """``make_batch(indices, step)`` for :class:`harness.StepBatches`: two views + patch positions per image.

    The views of image i at step s are drawn from ``step_seed(seed, s, i)``: a pure function of the step.
    """

    def __init__(
        self, entries: Sequence[ImageEntry], views: ViewConfig, patch: int, seed: int, cache_bytes: int = CACHE_BYTES
    ):
        self.entries, self.views, self.patch, self.seed = list(entries), views, patch, seed
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def image(self, i: int) -> torch.Tensor:
        """Decoded image i; kept in memory while the cache (per worker process) holds under ``cache_bytes``."""
        if i in self.cache:
            return self.cache[i]
        img = torch.from_numpy(read_image(self.entries[i])).permute(2, 0, 1).contiguous()
        if self.cached_bytes + img.numel() <= self.cache_bytes:  # full: later images are decoded each time
            self.cache[i] = img
            self.cached_bytes += img.numel()
        return img

    def __call__(self, indices: list[int], step: int):
        seeds = [H.step_seed(self.seed, step, salt=1000 + i) for i in indices]
        return batch_of_views([self.image(i) for i in indices], seeds, self.views, self.patch)


def view_config(t: CrOCTraining) -> ViewConfig:
    """DINO's two global views (blur always on view 1, sometimes on view 2; solarise on view 2)."""
    common = dict(
        hue=t.hue, saturation=t.saturation, gray_p=t.grayscale_p, blur_sigma=(0.1, max(0.1, t.blur_sigma_max))
    )
    return ViewConfig(
        size=t.crop_size,
        scale=(t.crop_scale_min, t.crop_scale_max),
        view1=Photometric(blur_p=1.0, solarize_p=0.0, **common),
        view2=Photometric(blur_p=0.1, solarize_p=0.2, **common),
    )


def train_croc(
    models: CrOCModels,
    entries: Sequence[ImageEntry],
    t: CrOCTraining,
    objective: CrOCConfig,
    ckpt: H.CheckpointDir,
    log_path,
    device: torch.device,
    info: H.DistInfo = H.SINGLE_PROCESS,
) -> int:
    """Train in place for ``t.steps`` steps (resuming from ``ckpt``) of schedules ``t.schedule_steps`` long
    (``t.steps`` when None: a full schedule; longer: stop early on it); returns the number of steps run."""
    if t.steps == 0:
        return 0
    horizon = t.schedule_steps or t.steps
    patch = int(models.student.patch_embed.patch_size[0])
    for m in (models.student, models.teacher, models.student_head, models.teacher_head):
        m.to(device)
    student = H.wrap_ddp(TokenOutput(models.student), info, device) if info.enabled else models.student
    student_head = H.wrap_ddp(models.student_head, info, device)
    loss_module = CrOCLoss(t.out_dim, t.out_dim_c, objective).to(device)
    opt = torch.optim.AdamW(param_groups([models.student, models.student_head]), lr=0.0)
    base_lr = t.lr * t.batch_size / 256
    batches = H.StepBatches(
        len(entries), t.batch_size, t.seed, ViewBatches(entries, view_config(t), patch, t.seed), info
    )

    def step_fn(step: int, batch) -> dict[str, float]:
        views, pos = batch
        lr = H.cosine_lr(step, horizon, base_lr, t.warmup_steps, t.min_lr)
        wd = t.weight_decay_end + 0.5 * (t.weight_decay - t.weight_decay_end) * (1 + math.cos(math.pi * step / horizon))
        for i, g in enumerate(opt.param_groups):
            g["lr"] = lr
            if i == 0:
                g["weight_decay"] = wd
        # one generator per image of the global batch (this process holds images rank, rank + world, ...):
        # the clustering's random draws are then the same under DDP as in one process
        base = H.step_seed(t.seed, step, salt=3)
        gen = [torch.Generator().manual_seed(base + j) for j in range(info.rank, t.batch_size, info.world_size)]
        student.train()
        with H.autocast(device, t.amp):
            loss, logs = croc_forward_loss(
                student,
                models.teacher,
                student_head,
                models.teacher_head,
                loss_module,
                views.to(device, non_blocking=True),
                pos.to(device, non_blocking=True),
                objective,
                gen,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_grad > 0:
            nn.utils.clip_grad_norm_([*models.student.parameters(), *models.student_head.parameters()], t.clip_grad)
        if step < t.freeze_last_layer_steps:
            cancel_last_layer_grads(models.student_head)
        opt.step()
        m = teacher_momentum(step, horizon, t.momentum_teacher)
        ema_update(models.teacher, models.student, m)
        ema_update(models.teacher_head, models.student_head, m)
        return {**logs, "lr": lr}

    parts = {
        "student": models.student,
        "teacher": models.teacher,
        "student_head": models.student_head,
        "teacher_head": models.teacher_head,
        "optimizer": opt,
        "loss": loss_module,
    }
    return H.train_loop(
        step_fn,
        lambda start: H.step_loader(batches, start, t.steps, t.workers),
        parts,
        t.steps,
        ckpt,
        log_path,
        t.ckpt_every,
        t.seed,
        info,
        desc="croc",
    )
