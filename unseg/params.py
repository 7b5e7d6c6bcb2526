"""The typed schema of ``params.yaml``: one frozen dataclass per section, validated at load.

Every stage loads the whole file through :func:`load_params` before doing any work, so an unknown
key, a wrong type or an out-of-range value anywhere stops it with one line that names the key and
what is allowed, e.g. ``params.yaml: mining.topk_fraction = 1.5: must be in (0, 1]``.
Keys are flat per section, so ``dvc exp run -S mining.topk_fraction=0.3`` works.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class Data:
    dataset: str = p("generated", choices=("generated", "folder", "coco", "voc", "camvid"))
    root: str | None = p(None)  # dataset folder (all but 'generated')
    train_split: str = p("train")
    val_split: str | None = p("val")
    limit: int | None = p(None, lo=1)  # at most this many images per split (quick runs)
    # the generated dataset
    n_train: int = p(480, lo=1)
    n_val: int = p(120, lo=1)
    n_categories: int = p(4, lo=2, hi=5)
    max_instances: int = p(3, lo=1, hi=6)
    min_side: int = p(96, lo=32)
    max_side: int = p(128, lo=32)
    seed: int = p(0, lo=0)


@dataclass(frozen=True)
class Backbone:
    arch: str = p("vit_tiny_patch16_224")
    patch_size: int = p(8, lo=2)
    depth: int | None = p(4, lo=1)
    weights: str | None = p(None)  # a local DINO/timm checkpoint; null = train with pretrain_croc
    checkpoint_key: str = p("teacher")


@dataclass(frozen=True)
class Croc:
    init: str | None = p(None)  # a local checkpoint to start from (e.g. the committed tiny one)
    steps: int = p(0, lo=0)
    batch_size: int = p(32, lo=1)
    crop_size: int = p(64, lo=16)
    crop_scale_min: float = p(0.25, lo=0, hi=1, lo_open=True)
    lr: float = p(5e-4, lo=0, lo_open=True)
    min_lr: float = p(1e-6, lo=0)
    warmup_steps: int = p(0, lo=0)
    weight_decay: float = p(0.04, lo=0)
    weight_decay_end: float = p(0.4, lo=0)
    clip_grad: float = p(3.0, lo=0)
    freeze_last_layer_steps: int = p(0, lo=0)
    drop_path: float = p(0.1, lo=0, hi=1)
    momentum_teacher: float = p(0.996, lo=0, hi=1)
    out_dim: int = p(65536, lo=2)
    out_dim_c: int = p(8192, lo=2)
    head_hidden: int = p(2048, lo=1)
    head_bottleneck: int = p(256, lo=1)
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
    short_side: int = p(96, lo=16)  # shortest image side after resizing (paper: 640)
    fit: str = p("pad", choices=("pad", "crop"))  # to a multiple of the patch: zero-pad bottom/right, or crop
    batch_size: int = p(32, lo=1)
    workers: int = p(0, lo=0)
    device: str = p("auto", choices=DEVICES)


@dataclass(frozen=True)
class Mining:
    heads: int | None = p(None, lo=1)  # a_CLS averages the first `heads` heads; null = all (paper)
    cls_mass: float | None = p(0.5, lo=0, hi=1, lo_open=True)  # DINO attention-mass mask on a_CLS; null = off
    topk_fraction: float = p(0.4, lo=0, hi=1, lo_open=True)  # |P| / number of patches (paper: 40%)
    keep_component: bool = p(True)  # keep only the 4-connected component holding the source
    upsample: str = p("nearest", choices=("nearest", "pil_bicubic"))  # token mask -> image resolution


@dataclass(frozen=True)
class Cluster:
    input: str = p("masked", choices=("masked", "bbox_crop"))  # paper text | released code
    classes: int = p(4, lo=1)  # expected number of object categories (C)
    overcluster: int = p(1, lo=1)  # K-means k = classes * overcluster
    whiten: bool = p(True)
    algorithm: str = p("minibatch", choices=("minibatch", "faiss"))
    kmeans_batch_size: int = p(1000, lo=1)
    seed: int = p(1234, lo=0)
    weights: str | None = p(None)  # a different ViT for the CLS features (paper: ViT-S/8); null = same
    arch: str | None = p(None)
    patch_size: int | None = p(None, lo=2)
    depth: int | None = p(None, lo=1)
    batch_size: int = p(32, lo=1)
    device: str = p("auto", choices=DEVICES)
    align_to_gt: bool = p(False)  # reproduction only: relabel clusters to GT classes like the released code


@dataclass(frozen=True)
class Evaluate:
    baselines: bool = p(True)
    raw_kmeans_pixels: int = p(200_000, lo=1000)
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
    evaluate: Evaluate = field(default_factory=Evaluate)


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


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = getattr(base, "__name__", str(base))
    name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return f"{name} or null" if type(None) in typing.get_args(tp) else name


def _check_value(key: str, value: Any, tp, meta: dict) -> Any:
    allowed_none = type(None) in typing.get_args(tp)
    if value is None:
        if allowed_none:
            return None
        raise ParamsError(f"params.yaml: {key} = null: must be {_type_name(tp)}")
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    origin = typing.get_origin(base)
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
        or (origin is list and isinstance(value, list))
    )
    if not ok:
        raise ParamsError(f"params.yaml: {key} = {value!r}: must be {_type_name(tp)}")
    shown = value
    if base is float:
        value = float(value)
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
    c = params.croc
    if c.n_centroids_max > c.n_tokens:
        raise ParamsError(f"params.yaml: croc.n_centroids_max = {c.n_centroids_max}: must be <= croc.n_tokens")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from err
    return parse_params(raw)


def to_dict(params) -> dict:
    return dataclasses.asdict(params)
