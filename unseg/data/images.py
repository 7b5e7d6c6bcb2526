"""The one image reader of the pipeline: a file -> (H, W, 3) uint8 RGB array, as an image viewer shows it.

Rules, applied in this order (every stage reads through :func:`read_image`, so they hold everywhere):
- EXIF orientation is applied (``ImageOps.exif_transpose``): stored sizes, masks and RLEs are upright;
- 16-bit and 32-bit integer images are scaled to 8 bits (value * 255 / max of the type), not clipped;
- an alpha channel (RGBA, LA, palette with transparency) is composited on a white background;
- grayscale, palette, CMYK and every other mode are converted to RGB;
- an image with more than :data:`MAX_PIXELS` pixels is refused (PIL's decompression-bomb guard);
- a GIF is read as its first frame.
``prepare`` also skips, from its header alone, an image over the budget of :data:`BUDGET_PIXELS` pixels or
with sides further apart than :data:`BUDGET_ASPECT` to 1: one such file would multiply a run's time and memory.
A file that cannot be fully decoded (truncated, not an image) raises :class:`ImageError`; ``prepare`` finds
such files with :func:`check_images`, skips them with one warning line and lists them in ``skipped.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unseg.errors import UserError

MAX_PIXELS = 178_956_970  # PIL's DecompressionBombError limit (2 x Image.MAX_IMAGE_PIXELS)
BUDGET_PIXELS = 50_000_000  # prepare skips larger images (a 48-megapixel phone photo passes); downscale them first
BUDGET_ASPECT = 16.0  # prepare skips an image whose long side is more than 16x its short side
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


class ImageError(UserError):
    """An image file that cannot be read as a picture (truncated, not an image, too large)."""


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in _DEPTH:
        arr = np.asarray(im, dtype=np.float64)
        top = _DEPTH[im.mode] if arr.max() > 255 or im.mode != "I" else 255  # mode I holds 8-bit data too
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.rint(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return np.array(Image.alpha_composite(canvas, rgba).convert("RGB"))
    return np.array(im.convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, upright, 8-bit, opaque (module docstring); ImageError if unreadable."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path}: {im.width}x{im.height} pixels, more than the {MAX_PIXELS} allowed")
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) as :func:`read_image` returns it (EXIF orientation applied), from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except (OSError, ValueError, SyntaxError):  # EXIF after a truncated body: the full decode will say
                orientation = 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from err
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_images(paths: Iterable[str | Path], min_side: int = 1) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Fully decode every file: ({path: (height, width)} of the good ones, {path: reason} of the bad ones).

    An image whose shorter side is below ``min_side`` pixels is bad too (smaller than one ViT patch), and
    so is one over the pixel or aspect budget (module docstring), found from its header before decoding.
    """
    good, bad = {}, {}
    for path in paths:
        try:
            h, w = image_size(path)
            if h * w > BUDGET_PIXELS or max(h, w) > BUDGET_ASPECT * max(min(h, w), 1):
                bad[str(path)] = (
                    f"{w}x{h} pixels, over the budget of {BUDGET_PIXELS / 1e6:.0f} megapixels and "
                    f"{BUDGET_ASPECT:.0f}:1 sides (downscale or crop it to use it)"
                )
                continue
            h, w = read_image(path).shape[:2]
        except ImageError as err:
            bad[str(path)] = str(err).removeprefix(f"{path}: ")
            continue
        if min(h, w) < min_side:
            bad[str(path)] = f"{w}x{h} pixels, smaller than one {min_side}-pixel patch"
        else:
            good[str(path)] = (h, w)
    return good, bad
