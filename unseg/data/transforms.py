"""Image geometry for ViT inputs: shortest-side resize, normalisation, fit to a multiple of the patch.

Matches the released MaskDistill pre-processing (reference §1.1): ``Resize(short_side)`` (shorter
side to ``short_side``, the longer one scaled and truncated, bilinear with antialiasing), ImageNet
normalisation, then zero-padding at the bottom/right to a multiple of the patch (0 after
normalisation is the mean colour). ``fit='crop'`` crops the bottom/right remainder instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unseg.models.vit import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass(frozen=True)
class Geometry:
    """Where an image goes on its way into the ViT.

    original: (H, W) of the file; resized: (h, w) after the shortest-side resize;
    canvas: (h', w') after padding/cropping to a multiple of the patch; grid: (h'/p, w'/p) tokens.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    canvas: tuple[int, int]
    grid: tuple[int, int]
    patch: int


def resized_size(h: int, w: int, short_side: int | None) -> tuple[int, int]:
    """torchvision ``Resize(short_side)``: shorter side -> short_side, longer side truncated."""
    if short_side is None:
        return h, w
    if h <= w:
        return short_side, int(short_side * w / h)
    return int(short_side * h / w), short_side


def geometry(h: int, w: int, short_side: int | None, patch: int, fit: str = "pad") -> Geometry:
    rh, rw = resized_size(h, w, short_side)
    if fit == "pad":
        ch, cw = -(-rh // patch) * patch, -(-rw // patch) * patch
    elif fit == "crop":
        ch, cw = max(patch, rh // patch * patch), max(patch, rw // patch * patch)
    else:
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    return Geometry((h, w), (rh, rw), (ch, cw), (ch // patch, cw // patch), patch)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float -> (3, h, w), bilinear with antialiasing (like PIL/torchvision Resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def fit_canvas(x: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Zero-pad at the bottom/right or crop the bottom/right remainder to ``canvas``."""
    h, w = x.shape[-2:]
    ch, cw = canvas
    x = x[..., : min(h, ch), : min(w, cw)]
    if x.shape[-2:] != (ch, cw):
        x = F.pad(x, (0, cw - x.shape[-1], 0, ch - x.shape[-2]))
    return x


def vit_input(image: np.ndarray, geom: Geometry) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h', w') normalised, resized and fitted to the patch grid."""
    return fit_canvas(resize_image(normalize(image), geom.resized), geom.canvas)


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    return np.minimum((np.arange(dst) + 0.5) * src / dst, src - 1).astype(np.int64)


def canvas_to_original(values: np.ndarray, geom: Geometry, fill: int = 0) -> np.ndarray:
    """(h', w') values on the padded/cropped canvas -> (H, W) at the original resolution, nearest.

    The canvas is cut back to the resized size (padding dropped; a cropped remainder gets ``fill``),
    then resized to the original size.
    """
    rh, rw = geom.resized
    resized = np.full((rh, rw), fill, values.dtype)
    h, w = min(rh, values.shape[0]), min(rw, values.shape[1])
    resized[:h, :w] = values[:h, :w]
    H, W = geom.original
    return resized[_nearest_indices(rh, H)][:, _nearest_indices(rw, W)]


def original_to_canvas(values: np.ndarray, geom: Geometry, fill: int = 255) -> np.ndarray:
    """(H, W) label map -> the canvas (h', w'), nearest; padding gets ``fill`` (ignored by losses)."""
    rh, rw = geom.resized
    H, W = geom.original
    resized = values[_nearest_indices(H, rh)][:, _nearest_indices(W, rw)]
    ch, cw = geom.canvas
    canvas = np.full((ch, cw), fill, values.dtype)
    h, w = min(rh, ch), min(rw, cw)
    canvas[:h, :w] = resized[:h, :w]
    return canvas


def token_map_to_pixels(values: np.ndarray, geom: Geometry) -> np.ndarray:
    """(gh, gw) per-token values -> (H, W) at the original resolution, by nearest neighbour."""
    p = geom.patch
    return canvas_to_original(np.repeat(np.repeat(values, p, axis=0), p, axis=1), geom)


def token_mask_to_pixels(token_mask: np.ndarray, geom: Geometry, mode: str = "nearest") -> np.ndarray:
    """(gh, gw) bool token mask -> (H, W) bool mask at the original resolution.

    ``nearest`` (the paper) as :func:`token_map_to_pixels`; ``pil_bicubic`` (the released code) resizes
    the resized-size 0/255 mask to the original with PIL's default bicubic filter and keeps any non-zero
    pixel, which dilates the mask by a pixel or two.
    """
    if mode == "nearest":
        return token_map_to_pixels(token_mask.astype(np.uint8), geom).astype(bool)
    if mode != "pil_bicubic":
        raise ValueError(f"unknown upsampling mode {mode!r}")
    from PIL import Image

    p = geom.patch
    up = np.repeat(np.repeat(token_mask.astype(np.uint8), p, axis=0), p, axis=1)
    rh, rw = geom.resized
    resized = np.zeros((rh, rw), np.uint8)
    h, w = min(rh, up.shape[0]), min(rw, up.shape[1])
    resized[:h, :w] = up[:h, :w]
    H, W = geom.original
    return np.asarray(Image.fromarray(resized * 255).resize((W, H), Image.BICUBIC)) > 0
