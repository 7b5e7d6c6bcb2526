"""Position-aware augmented views for CrOC (reference.md §2.1 "Views / join"; official
``croc_utils/data_transforms.py`` and ``DataAugmentationCrOC`` in ``main_croc.py``).

Each view is a RandomResizedCrop (scale range, aspect ratio 3/4..4/3, bicubic) plus a horizontal flip of
the image, with a position map ``pos`` (2, S, S): ``pos[:, v, u] = (x, y)``, the original-image pixel
coordinate that view pixel (u, v) samples (flipped together with the image). Then DINO's photometric
asymmetry: view 1 colour jitter / grayscale / blur p=1.0; view 2 the same jitter / grayscale, blur p=0.1,
solarise p=0.2; then ImageNet normalisation.

The official code resizes an integer ramp with the same bicubic ``resized_crop``; we write the map in
closed form, which equals that ramp in the interior and is exact at the borders: for the crop box
(top i, left j, height h, width w) resized to S×S with half-pixel centres,

    x(u) = j + (u + 1/2) · w / S − 1/2,    y(v) = i + (v + 1/2) · h / S − 1/2.

All randomness comes from a ``torch.Generator`` argument, so a view is a pure function of (image, seed).
Photometric operations run on float images in [0, 1] (the official code works on PIL uint8 images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from unseg.errors import UserError
from unseg.models.vit import IMAGENET_MEAN, IMAGENET_STD
from unseg.train.harness import uniform


@dataclass(frozen=True)
class Photometric:
    """DINO's colour augmentation of one view; every probability and strength is a field.

    Colour jitter (brightness, contrast, saturation, hue; applied in a random order, as torchvision's
    ``ColorJitter``) with probability ``jitter_p``; grayscale with ``gray_p``; Gaussian blur with
    ``blur_p`` and σ ~ U(blur_sigma) pixels; solarisation (x ≥ threshold → 1 − x) with ``solarize_p``.
    The threshold 128/255 is PIL's ``ImageOps.solarize`` default.
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 128 / 255


@dataclass(frozen=True)
class ViewConfig:
    """Geometry and photometry of CrOC's two global views (defaults: the released code, reference.md §2.2)."""

    size: int = 224
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    interpolation: str = "bicubic"
    view1: Photometric = field(default_factory=lambda: Photometric(blur_p=1.0, solarize_p=0.0))
    view2: Photometric = field(default_factory=lambda: Photometric(blur_p=0.1, solarize_p=0.2))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# ---------------------------------------------------------------- random draws from a generator


def _coin(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=gen))


# ---------------------------------------------------------------- geometry


def to_float_image(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """uint8 (3|1, H, W) tensor, float (3, H, W) tensor in [0, 1], or PIL image -> float32 (3, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UserError(f"image must be a (3, H, W) tensor or a PIL image, got {getattr(image, 'shape', type(image))}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w) of torchvision's RandomResizedCrop, drawn from ``gen``.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); up to ``attempts`` tries for a box that fits,
    else the central crop with the aspect clamped to ``ratio`` (torchvision's fallback).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * uniform(gen, scale[0], scale[1])
        aspect = math.exp(uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(gen, height - h + 1), _randint(gen, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_position_map(box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """(2, S, S) float32 map of original (x, y) pixel coordinates for a crop ``box`` resized to S×S.

    x(u) = left + (u + ½)·w/S − ½ and y(v) = top + (v + ½)·h/S − ½ (half-pixel centres, as
    ``torch.nn.functional.interpolate`` with ``align_corners=False``); ``flip`` mirrors u.
    """
    top, left, h, w = box
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    xs = left + centres * (w / size) - 0.5
    ys = top + centres * (h / size) - 0.5
    if flip:
        xs = xs.flip(0)
    pos = torch.stack([xs[None, :].expand(size, size), ys[:, None].expand(size, size)])
    return pos.float()


def crop_view(
    image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Float (3, H, W) image -> (3, S, S) crop resized with ``interpolation`` (antialiased), optionally flipped."""
    try:
        mode = InterpolationMode(interpolation)
    except ValueError as err:
        raise UserError(f"views.interpolation: unknown mode {interpolation!r}") from err
    view = TF.resized_crop(image, *box, size=[size, size], interpolation=mode, antialias=True)
    if flip:
        view = view.flip(-1)
    return view.clamp(0.0, 1.0)


# ---------------------------------------------------------------- photometry


def color_jitter(image: torch.Tensor, aug: Photometric, gen: torch.Generator) -> torch.Tensor:
    """torchvision ``ColorJitter``: factors b, c, s ~ U(1 − x, 1 + x) (floored at 0), hue ~ U(−h, h),
    applied in a random order."""
    order = torch.randperm(4, generator=gen).tolist()
    b = uniform(gen, max(0.0, 1 - aug.brightness), 1 + aug.brightness)
    c = uniform(gen, max(0.0, 1 - aug.contrast), 1 + aug.contrast)
    s = uniform(gen, max(0.0, 1 - aug.saturation), 1 + aug.saturation)
    h = uniform(gen, -aug.hue, aug.hue)
    ops = [
        lambda x: TF.adjust_brightness(x, b),
        lambda x: TF.adjust_contrast(x, c),
        lambda x: TF.adjust_saturation(x, s),
        lambda x: TF.adjust_hue(x, h),
    ]
    for k in order:
        image = ops[k](image)
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels (PIL's ``GaussianBlur(radius=sigma)``), kernel 2⌈3σ⌉+1."""
    side = min(image.shape[-2:])
    kernel = min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def photometric(image: torch.Tensor, aug: Photometric, gen: torch.Generator) -> torch.Tensor:
    """Float (3, S, S) in [0, 1] -> augmented (3, S, S) in [0, 1]: jitter, grayscale, blur, solarise."""
    if _coin(gen, aug.jitter_p):
        image = color_jitter(image, aug, gen)
    if _coin(gen, aug.gray_p):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if _coin(gen, aug.blur_p):
        image = gaussian_blur(image, uniform(gen, *aug.blur_sigma))
    if _coin(gen, aug.solarize_p):
        image = TF.solarize(image, aug.solarize_threshold)
    return image


# ---------------------------------------------------------------- views


def one_view(
    image: torch.Tensor, cfg: ViewConfig, aug: Photometric, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (3, H, W) image -> (normalised view (3, S, S), position map (2, S, S))."""
    box = random_resized_crop_box(image.shape[-2], image.shape[-1], cfg.scale, cfg.ratio, gen)
    flip = _coin(gen, cfg.flip_p)
    view = crop_view(image, box, cfg.size, flip, cfg.interpolation)
    view = photometric(view, aug, gen)
    return TF.normalize(view, list(cfg.mean), list(cfg.std)), crop_position_map(box, cfg.size, flip)


def two_views(
    image: torch.Tensor | Image.Image, gen: torch.Generator, cfg: ViewConfig = ViewConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """CrOC's two global views of one image: views (2, 3, S, S) float32, position maps (2, 2, S, S).

    Both crops are drawn first, then view 1 gets ``cfg.view1``'s photometry and view 2 ``cfg.view2``'s.
    """
    image = to_float_image(image)
    v1, p1 = one_view(image, cfg, cfg.view1, gen)
    v2, p2 = one_view(image, cfg, cfg.view2, gen)
    return torch.stack([v1, v2]), torch.stack([p1, p2])


def patch_positions(pos: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 2, S, S) position maps -> (B, N, 2) mean (x, y) per patch, patches in row-major order.

    Official: ``rearrange(pos, 'b d (r i) (c j) -> b d (r c) (i j)').mean(-1)``.
    """
    b, two, h, w = pos.shape
    if two != 2 or h % patch or w % patch:
        raise UserError(
            f"position maps must be (B, 2, S, S) with S a multiple of the patch {patch}, got {tuple(pos.shape)}"
        )
    pooled = torch.nn.functional.avg_pool2d(pos, patch)
    return pooled.flatten(2).transpose(1, 2)


def batch_of_views(
    images: Sequence[torch.Tensor | Image.Image], seeds: Sequence[int], cfg: ViewConfig, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (B, 2, 3, S, S) and patch positions (B, 2, N, 2) for ``images``, image b drawn from ``seeds[b]``."""
    if len(images) != len(seeds):
        raise UserError(f"batch_of_views: {len(images)} images but {len(seeds)} seeds")
    views, maps = [], []
    for image, seed in zip(images, seeds, strict=True):
        gen = torch.Generator().manual_seed(int(seed))
        v, p = two_views(image, gen, cfg)
        views.append(v)
        maps.append(p)
    pos = torch.stack(maps)  # (B, 2, 2, S, S)
    b = pos.shape[0]
    return torch.stack(views), patch_positions(pos.flatten(0, 1), patch).unflatten(0, (b, 2))
