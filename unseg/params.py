"""The typed schema of ``params.yaml``: one frozen dataclass per section, validated at load.

Every stage loads the whole file through :func:`load_params` before doing any work, so an unknown
key, a wrong type or an out-of-range value anywhere stops it with one line that names the key and
what is allowed, e.g. ``params.yaml: mining.topk_fraction = 1.5: must be in (0, 1]``.
Keys are flat per section, so ``dvc exp run -S mining.topk_fraction=0.3`` works.
A relative local path (``data.root``, a checkpoint) means the same folder in a DVC experiment's temporary
copy of the project as in the project itself (:func:`resolve_local_paths`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unseg.errors import UserError


class ParamsError(UserError):
    pass


def p(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: tuple | None = None,
) -> Any:
    """A field with its allowed range (``lo``/``hi``, open or closed) or its allowed ``choices``."""
    meta = dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DEVICES = ("auto", "cpu", "cuda")
MAX_INT = 2**31 - 1  # any int without a tighter bound (a seed numpy and torch both accept)


@dataclass(frozen=True)
class Data:
    dataset: str = p("generated", choices=("generated", "folder", "coco", "voc", "camvid"))
    root: str | None = p(None)  # dataset folder (all but 'generated')
    train_split: str = p("train")
    val_split: str | None = p("val")
    limit: int | None = p(None, lo=1)  # at most this many images per split (quick runs)
    folder_val_fraction: float = p(0.0, lo=0, hi=1, hi_open=True)  # folder: share of images put in val_split
    # the generated dataset
    n_train: int = p(480, lo=1, hi=1_000_000)
    n_val: int = p(120, lo=1, hi=1_000_000)
    n_categories: int = p(4, lo=2, hi=5)
    max_instances: int = p(3, lo=1, hi=6)
    palette: str = p("category", choices=("random", "category"))  # object colours: random | a hue band per category
    min_side: int = p(96, lo=32, hi=8192)
    max_side: int = p(128, lo=32, hi=8192)
    video_sequences: int = p(2, lo=0)  # generated DAVIS-layout videos for the propagation protocol
    video_frames: int = p(12, lo=3)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Backbone:
    arch: str = p("vit_tiny_patch16_224")
    patch_size: int = p(8, lo=2)
    depth: int | None = p(4, lo=1)
    stem: str = p("conv", choices=("patch", "conv"))  # patchify conv (ViT) | conv stem (Xiao et al. 2021)
    weights: str | None = p(None)  # a local DINO/timm checkpoint; null = train with pretrain_croc
    checkpoint_key: str = p("teacher")


@dataclass(frozen=True)
class Croc:
    reuse: str | None = p(None)  # a checkpoint this stage wrote with exactly these params and data: no training
    steps: int = p(500, lo=0, hi=10_000_000)
    # lr/wd/momentum schedule length (null: steps); > steps stops early
    schedule_steps: int | None = p(1200, lo=1, hi=10_000_000)
    batch_size: int = p(32, lo=1, hi=65_536)
    crop_size: int = p(64, lo=16, hi=8192)
    crop_scale_min: float = p(0.25, lo=0, hi=1, lo_open=True)
    crop_scale_max: float = p(1.0, lo=0, hi=1, lo_open=True)
    blur_sigma_max: float = p(0.5, lo=0.1)
    hue: float = p(0.02, lo=0, hi=0.5)
    saturation: float = p(0.2, lo=0)
    grayscale_p: float = p(0.2, lo=0, hi=1)
    lr: float = p(0.02, lo=0, lo_open=True)
    min_lr: float = p(1e-6, lo=0)
    warmup_steps: int = p(30, lo=0)
    weight_decay: float = p(0.04, lo=0)
    weight_decay_end: float = p(0.04, lo=0)
    clip_grad: float = p(3.0, lo=0)
    freeze_last_layer_steps: int = p(0, lo=0)
    drop_path: float = p(0.0, lo=0, hi=1)
    momentum_teacher: float = p(0.99, lo=0, hi=1)
    out_dim: int = p(256, lo=2)
    out_dim_c: int = p(256, lo=2)
    head_hidden: int = p(256, lo=1)
    head_bottleneck: int = p(64, lo=1)
    teacher_temp: float = p(0.04, lo=0, lo_open=True)
    teacher_temp_c: float = p(0.04, lo=0, lo_open=True)
    student_temp: float = p(0.1, lo=0, lo_open=True)
    student_temp_c: float = p(0.1, lo=0, lo_open=True)
    center_momentum: float = p(0.9, lo=0, hi=1)
    alpha_s: float = p(1.0, lo=0)
    sinkhorn_lambda: float = p(20.0, lo=0, lo_open=True)
    sinkhorn_iters: int = p(5, lo=1)
    pos_alpha: float = p(4.0, lo=0)
    uniform_marginals: bool = p(False)
    marginals_temp_r: float = p(2.0, lo=0, lo_open=True)
    marginals_temp_c: float = p(2.0, lo=0, lo_open=True)
    n_tokens: int = p(5, lo=2)
    n_centroids_max: int = p(4, lo=2)
    ckpt_every: int = p(100, lo=1)
    workers: int = p(0, lo=0)
    amp: bool = p(True)
    device: str = p("auto", choices=DEVICES)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Features:
    short_side: int = p(96, lo=16, hi=8192)  # shortest image side after resizing (paper: 640)
    fit: str = p("pad", choices=("pad", "crop"))  # to a multiple of the patch: zero-pad bottom/right, or crop
    batch_size: int = p(32, lo=1, hi=65_536)
    workers: int = p(0, lo=0)
    device: str = p("auto", choices=DEVICES)


@dataclass(frozen=True)
class Mining:
    heads: int | None = p(None, lo=1)  # a_CLS averages the first `heads` heads; null = all (paper)
    cls_mass: float | None = p(0.5, lo=0, hi=1, lo_open=True)  # DINO attention-mass mask on a_CLS; null = off
    topk_fraction: float = p(0.4, lo=0, hi=1, lo_open=True)  # |P| / number of patches (paper: 40%)
    keep_component: bool = p(True)  # keep only the 4-connected component holding the source
    proposals: str = p("auto", choices=("top", "bottom", "auto"))  # by a_CLS (paper) | -a_CLS | per image (ext.)
    masks_per_image: int = p(1, lo=1, hi=255)  # 1: the paper; more: the rule again on the tokens left (extension)
    upsample: str = p("nearest", choices=("nearest", "pil_bicubic"))  # token mask -> image resolution
    batch_size: int = p(256, lo=1, hi=65_536)  # images (of one token grid) mined together


@dataclass(frozen=True)
class Cluster:
    input: str = p("patch_mean", choices=("masked", "bbox_crop", "patch_mean"))  # paper | released code | extension
    classes: int = p(4, lo=1)  # expected number of object categories (C)
    overcluster: int = p(1, lo=1)  # K-means k = classes * overcluster
    background_clusters: int = p(1, lo=0)  # extension: this many more clusters, the most border-bound dropped
    whiten: bool = p(True)
    algorithm: str = p("minibatch", choices=("minibatch", "faiss", "lloyd"))
    kmeans_batch_size: int = p(1000, lo=1, hi=10_000_000)
    seed: int = p(0, lo=0)
    weights: str | None = p(None)  # a different ViT for the CLS features (paper: ViT-S/8); null = same
    arch: str | None = p(None)
    patch_size: int | None = p(None, lo=2)
    depth: int | None = p(None, lo=1)
    batch_size: int = p(32, lo=1, hi=65_536)
    device: str = p("auto", choices=DEVICES)
    align_to_gt: bool = p(False)  # reproduction only: relabel clusters to GT classes like the released code


@dataclass(frozen=True)
class Distill:
    backend: str = p("torchvision", choices=("torchvision", "detectron2"))
    backbone: str = p("resnet18", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    fpn: bool = p(True)  # FPN; false = C4 (the paper's R50-C4)
    backbone_weights: str | None = p(None)  # hsg: pretrain_hsg's ResNet | local torchvision / MoCo | null: scratch
    trainable_layers: int = p(5, lo=0, hi=5)  # 5: all trainable; 3 = stem and layer1 frozen ("first two stages")
    steps: int = p(300, lo=1, hi=10_000_000)
    batch_size: int = p(4, lo=1, hi=65_536)
    lr: float = p(0.01, lo=0, lo_open=True)
    lr_steps: list[int] = p([240, 280])
    warmup_steps: int = p(50, lo=0)
    momentum: float = p(0.9, lo=0, hi=1)
    weight_decay: float = p(1e-4, lo=0)
    clip_grad: float = p(5.0, lo=0)  # 0 = off
    train_min_size: int = p(96, lo=16, hi=8192)  # shortest side drawn from [train_min_size, train_max_size]
    train_max_size: int = p(160, lo=16, hi=8192)
    size_sampling: str = p("range", choices=("range", "choice"))
    test_size: int = p(128, lo=16, hi=8192)  # shortest side at inference
    max_size: int = p(256, lo=16, hi=8192)  # cap on the longest side
    flip_p: float = p(0.5, lo=0, hi=1)
    anchor_sizes: list[int] = p([16, 32, 64, 128, 256])
    representation_size: int = p(256, lo=8)
    mask_head_channels: list[int] = p([128, 128])
    fpn_channels: int = p(128, lo=8)
    box_batch_size_per_image: int = p(64, lo=1)
    rpn_batch_size_per_image: int = p(128, lo=1)
    train_proposals: int = p(500, lo=1)  # RPN proposals per image before and after NMS, training (torchvision 2000)
    test_proposals: int = p(100, lo=1)  # and at inference: the box head's RoIs per image (torchvision 1000)
    detections_per_image: int = p(20, lo=1)
    score_threshold: float = p(0.05, lo=0, hi=1)  # predictions below are not written
    ckpt_every: int = p(100, lo=1)
    workers: int = p(0, lo=0)
    amp: bool = p(True)
    device: str = p("auto", choices=DEVICES)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Filter:
    tau: float = p(0.1, lo=0, hi=1)  # keep predictions with score > tau (paper Sec. 3.3: 0.9)
    inclusive: bool = p(False)  # score >= tau (released script)
    overlap: str = p("confidence", choices=("confidence", "overwrite", "released"))
    overlap_iou: float | None = p(0.5, lo=0, hi=1)  # drop a mask whose IoU with a more confident one exceeds this
    uncertain_score: float | None = p(0.5, lo=0, hi=1)  # dropped masks >= this: ignored, not background


@dataclass(frozen=True)
class Deeplab:
    backbone: str = p("resnet18", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    output_stride: int = p(16, choices=(8, 16, 32))
    aspp_rates: list[int] = p([12, 24, 36])
    decoder_channels: int | None = p(64, lo=1)  # extension: DeepLab-v3+ decoder on layer1 (null: v3, the paper)
    freeze_blocks: int = p(0, lo=0, hi=4)  # stem+layer1 (1), +layer2 (2), ...
    backbone_weights: str | None = p(None)  # as distill.backbone_weights
    epochs: int = p(7, lo=1, hi=10_000)
    batch_size: int = p(8, lo=1, hi=65_536)
    lr: float = p(0.02, lo=0, lo_open=True)
    lr_step_epochs: list[int] = p([6])
    gamma: float = p(0.1, lo=0, hi=1)
    momentum: float = p(0.9, lo=0, hi=1)
    weight_decay: float = p(1e-4, lo=0)
    crop_size: int = p(128, lo=16, hi=8192)
    scale_min: float = p(0.75, lo=0, lo_open=True)
    scale_max: float = p(1.25, lo=0, lo_open=True)
    max_rotation: float = p(5.0, lo=0)
    flip_p: float = p(0.5, lo=0, hi=1)
    label_fill: int = p(255, choices=(0, 255))  # label of pixels outside the warped image (released: 0)
    ohem_fraction: float = p(1.0, lo=0, hi=1, lo_open=True)  # hard pixels: top fraction (paper 0.2; 1.0: plain CE)
    ohem_count: str = p("all", choices=("all", "valid"))
    ohem_warmup_epochs: int = p(0, lo=0, hi=10_000)  # plain cross-entropy for these epochs, then hard pixel mining
    select_best_on_val: bool = p(False)  # reproduction only: keep the epoch with the best val mIoU (uses labels)
    ckpt_every: int = p(100, lo=1)
    workers: int = p(0, lo=0)
    amp: bool = p(True)
    device: str = p("auto", choices=DEVICES)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Hsg:  # pretrain_hsg: HSG (Ke et al. 2022); released values in configs/paper.yaml
    reuse: str | None = p(None)  # a checkpoint this stage wrote with exactly these params and images
    train: str = p("always", choices=("auto", "always"))  # auto: only when a backbone_weights is hsg
    backbone: str = p("resnet18", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    dim: int = p(128, lo=8)  # pixel embedding dimension
    output_stride: int = p(16, choices=(8, 16, 32))  # released: 16 in training
    test_output_stride: int = p(8, choices=(8, 16, 32))  # evaluate_hsg, same weights (released: 8 at test)
    fine_groups: int = p(8, lo=2)
    coarse_groups: int = p(4, lo=1)
    steps: int = p(1500, lo=0, hi=10_000_000)
    stage1_steps: int = p(500, lo=0, hi=10_000_000)  # SegSort-only steps before the full objective
    batch_size: int = p(8, lo=1, hi=65_536)  # images, two views each
    crop_size: int = p(128, lo=32, hi=8192)
    crop_scale_min: float = p(0.5, lo=0, hi=1, lo_open=True)
    crop_scale_max: float = p(1.0, lo=0, hi=1, lo_open=True)
    lr: float = p(0.01, lo=0, lo_open=True)
    stage2_lr: float | None = p(0.008, lo=0, lo_open=True)  # null: one schedule; else stage 2 restarts at it
    head_lr_mult: float = p(5.0, lo=0, lo_open=True)  # transformers and positional tables (released: 10)
    momentum: float = p(0.9, lo=0, hi=1)
    weight_decay: float = p(1e-4, lo=0)
    warmup_steps: int = p(20, lo=0)
    lr_milestones: list[float] = p([0.32, 0.56, 0.75])  # lr x0.1 at these fractions of the steps (released)
    superpixel_scale: float = p(300.0, lo=0, lo_open=True)  # Felzenszwalb scale (stands in for OWT-UCM)
    superpixel_sigma: float = p(2.0, lo=0)  # Gaussian smoothing before Felzenszwalb, px
    superpixel_min_size: int = p(50, lo=1)
    concentration: float = p(16.0, lo=0, lo_open=True)  # kappa
    kmeans_grid: list[int] = p([4, 4])  # level-0 spherical K-means grid init (released stage 2: 4x4)
    kmeans_iters: int = p(15, lo=1)
    knn: int = p(2, lo=1)  # DMoN graph neighbours
    weight_region: float = p(1.0, lo=0)  # lambda_E
    weight_levels: float = p(0.1, lo=0)  # lambda_F, each level
    weight_grouping: float = p(1.0, lo=0)  # lambda_G (DMoN + collapse)
    weight_centroid: float = p(1.0, lo=0)
    collapse_nodes: int | None = p(256, lo=1)  # null: n segments (paper); released: 256 (padded)
    collapse_minus_one: bool = p(False)  # DMoN's -1 (released: false)
    amp: bool = p(True)
    device: str = p("auto", choices=DEVICES)
    workers: int = p(0, lo=0)
    ckpt_every: int = p(100, lo=1)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class SelfTraining:  # self_train@1..3: MaskDistill's CRF self-training rounds (Sec. 4.3; released train_plus_crf.sh)
    rounds: int = p(1, lo=0, hi=3)  # rounds after train_deeplab (dvc.yaml has stages for 3; released: 1)
    init: str = p("start", choices=("start", "previous"))  # each round: train_deeplab's init (released) | fine-tune


@dataclass(frozen=True)
class Evaluate:
    baselines: bool = p(True)
    raw_kmeans_pixels: int = p(200_000, lo=1000, hi=100_000_000)
    maskrcnn_score: float = p(0.0, lo=0, hi=1)  # Table 1 "Mask R-CNN" row: predictions >= this (0: all written)
    probe_epochs: int = p(20, lo=1, hi=10_000)  # linear probe (paper App. A.2: 45 epochs, lr 0.1, x0.1 after 25)
    probe_lr: float = p(0.1, lo=0, lo_open=True)
    probe_memory_mb: int = p(4096, lo=1, hi=1_000_000)  # training features held for the probes (a subset beyond)
    crf: bool = p(True)  # DeepLab + dense CRF row (released settings)
    video_root: str | None = p(None)  # a DAVIS 2017 folder; null: the generated videos (if any)
    video_topk: int = p(5, lo=1)
    video_last_frames: int = p(7, lo=0)
    video_neighborhood: int = p(12, lo=1)
    video_temperature: float = p(0.1, lo=0, lo_open=True)
    device: str = p("auto", choices=DEVICES)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Params:
    data: Data = field(default_factory=Data)
    backbone: Backbone = field(default_factory=Backbone)
    croc: Croc = field(default_factory=Croc)
    features: Features = field(default_factory=Features)
    mining: Mining = field(default_factory=Mining)
    cluster: Cluster = field(default_factory=Cluster)
    distill: Distill = field(default_factory=Distill)
    filter: Filter = field(default_factory=Filter)
    deeplab: Deeplab = field(default_factory=Deeplab)
    self_training: SelfTraining = field(default_factory=SelfTraining)
    evaluate: Evaluate = field(default_factory=Evaluate)
    hsg: Hsg = field(default_factory=Hsg)


SECTIONS: dict[str, type] = typing.get_type_hints(Params)


def _describe_range(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"in {'(' if meta['lo_open'] else '['}{lo:g}, {hi:g}{')' if meta['hi_open'] else ']'}"
    if lo is not None:
        return f"{'>' if meta['lo_open'] else '>='} {lo:g}"
    return f"{'<' if meta['hi_open'] else '<='} {hi:g}"


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def _type_name(tp) -> str:
    base, nullable = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    if typing.get_origin(base) is list:
        name = f"list of {typing.get_args(base)[0].__name__}s"
    name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return f"{name} or null" if nullable else name


def _float_literal(text: str) -> Any:
    """``'4e-1'`` -> 0.4 (YAML 1.1 wants a dot in a float); anything else is returned unchanged."""
    try:
        return float(text) if text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity") else text
    except ValueError:
        return text


def _check_value(key: str, value: Any, tp, meta: dict) -> Any:
    base, nullable = _unwrap_optional(tp)
    if value is None:
        if nullable:
            return None
        raise ParamsError(f"params.yaml: {key} = null: must be {_type_name(tp)}")
    origin = typing.get_origin(base)
    if base is float and isinstance(value, str):
        value = _float_literal(value)  # PyYAML reads 4e-1 (no dot) as a string
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
        or (origin is list and isinstance(value, list))
    )
    if ok and origin is list:
        item = typing.get_args(base)[0]
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ParamsError(f"params.yaml: {key} = {value!r}: must be {_type_name(tp)}")
    shown = value
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"params.yaml: {key} = {shown!r}: must be a finite number")
    if origin is list and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        raise ParamsError(f"params.yaml: {key} = {value!r}: must hold finite numbers")
    if base is int and meta.get("hi") is None and not meta.get("choices") and value > MAX_INT:
        raise ParamsError(f"params.yaml: {key} = {value!r}: must be <= {MAX_INT}")
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices and value not in choices:
        raise ParamsError(f"params.yaml: {key} = {value!r}: must be {_describe_range(meta)}")
    if isinstance(value, int | float) and not isinstance(value, bool) and (lo is not None or hi is not None):
        bad = (lo is not None and (value <= lo if meta["lo_open"] else value < lo)) or (
            hi is not None and (value >= hi if meta["hi_open"] else value > hi)
        )
        if bad:
            raise ParamsError(f"params.yaml: {key} = {shown!r}: must be {_describe_range(meta)}")
    return value


def build_section(name: str, raw: Any):
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {name} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ParamsError(f"params.yaml: unknown key {name}.{key} (known: {', '.join(fields)})")
    values = {k: _check_value(f"{name}.{k}", v, hints[k], fields[k].metadata) for k, v in raw.items()}
    return cls(**values)


def parse_params(raw: Any) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"params.yaml: unknown section {name!r} (known: {', '.join(SECTIONS)})")
    params = Params(**{name: build_section(name, raw.get(name)) for name in SECTIONS})
    _check_cross(params)
    return params


def _check_cross(params: Params) -> None:
    d = params.data
    if d.min_side > d.max_side:
        raise ParamsError(f"params.yaml: data.min_side = {d.min_side}: must be <= data.max_side ({d.max_side})")
    if d.dataset != "generated" and not d.root:
        raise ParamsError(f"params.yaml: data.root is null: dataset {d.dataset!r} needs the path of its folder")
    m = params.distill
    if m.train_min_size > m.train_max_size:
        raise ParamsError(
            f"params.yaml: distill.train_min_size = {m.train_min_size}: must be <= distill.train_max_size"
        )
    if list(m.lr_steps) != sorted(m.lr_steps) or any(not isinstance(s, int) or s < 1 for s in m.lr_steps):
        raise ParamsError(f"params.yaml: distill.lr_steps = {m.lr_steps}: must be increasing positive step numbers")
    dl = params.deeplab
    if dl.scale_min > dl.scale_max:
        raise ParamsError(f"params.yaml: deeplab.scale_min = {dl.scale_min}: must be <= deeplab.scale_max")
    c = params.croc
    if c.n_centroids_max > c.n_tokens:
        raise ParamsError(f"params.yaml: croc.n_centroids_max = {c.n_centroids_max}: must be <= croc.n_tokens")
    patch = params.backbone.patch_size
    if c.crop_size % patch:
        raise ParamsError(
            f"params.yaml: croc.crop_size = {c.crop_size}: must be a multiple of backbone.patch_size ({patch})"
        )
    if params.features.short_side < patch:
        raise ParamsError(
            f"params.yaml: features.short_side = {params.features.short_side}: must be >= backbone.patch_size ({patch})"
        )
    if c.schedule_steps is not None and c.schedule_steps < c.steps:
        raise ParamsError(f"params.yaml: croc.schedule_steps = {c.schedule_steps}: must be >= croc.steps ({c.steps})")


def overlay(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in, section by section and key by key (neither argument is modified)."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = (
            overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def schema_defaults() -> dict:
    """Every section and key of the schema with its default, as a raw params mapping (the tiny profile's values)."""
    return dataclasses.asdict(Params())


def config_from(cls: type, section: Any, **overrides: Any):
    """The library dataclass ``cls`` built from the params section fields of the same names (never by position)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: getattr(section, name) for name in names if name not in overrides}, **overrides)


LOCAL_PATHS = (
    ("data", "root"),
    ("backbone", "weights"),
    ("croc", "reuse"),
    ("cluster", "weights"),
    ("distill", "backbone_weights"),
    ("deeplab", "backbone_weights"),
    ("hsg", "reuse"),
    ("evaluate", "video_root"),
)
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # DVC runs `dvc exp run --temp` and queued experiments below this


def experiment_workspace(cwd: Path) -> Path | None:
    """The project that ``cwd`` is a DVC experiment's temporary copy of (``<project>/.dvc/tmp/exps/...``), or None."""
    parts = cwd.absolute().parts
    n = len(EXPERIMENT_COPIES)
    for i in range(len(parts) - n, 0, -1):
        if parts[i : i + n] == EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return None


def resolve_local_path(value: str, cwd: Path) -> str:
    """``value`` unchanged if it is absolute or exists below ``cwd``; else, in a DVC experiment's temporary copy,
    the same relative path in the project it was copied from when it exists there (a folder beside the project,
    such as ``../shared/data``, which the copy does not carry)."""
    if os.path.isabs(value) or (cwd / value).exists():
        return value
    workspace = experiment_workspace(cwd)
    if workspace is not None and (workspace / value).exists():
        return os.path.normpath(workspace / value)
    return value


def resolve_local_paths(params: Params, cwd: Path) -> Params:
    """``params`` with every path in :data:`LOCAL_PATHS` passed through :func:`resolve_local_path`."""
    sections = {}
    for name, key in LOCAL_PATHS:
        section = sections.get(name, getattr(params, name))
        value = getattr(section, key)
        if isinstance(value, str):
            sections[name] = dataclasses.replace(section, **{key: resolve_local_path(value, cwd)})
    return dataclasses.replace(params, **sections)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (as in DVC)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML file at ``path``, read as DVC reads params: a duplicate key is a one-line error, not a silent last."""
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        where = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f" (line {where.line + 1})" if where is not None and "line" not in problem else ""
        raise ParamsError(f"{path}: not valid YAML: {problem}{line}".replace("\n", " ")) from err


def check_complete(raw: Any) -> None:
    """Every section and key of the schema present in ``raw``: a deleted one is an error, never a code default."""
    if not isinstance(raw, dict):
        return  # parse_params names the problem
    for name, cls in SECTIONS.items():
        if name not in raw:
            raise ParamsError(f"params.yaml: section {name} is missing (every section of the profile must be present)")
        section = raw[name] if raw[name] is not None else {}  # `filter:` alone: a section with no key
        if isinstance(section, dict):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in section]
            if missing:
                raise ParamsError(
                    f"params.yaml: {name}.{missing[0]} is missing (every key must be set; null where allowed)"
                )


def load_params(path: str | Path = "params.yaml") -> Params:
    """The validated params file: strict YAML, every section and key present, every value in its range."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    raw = read_yaml(path)
    params = parse_params(raw)
    check_complete(raw)
    return resolve_local_paths(params, Path.cwd())
