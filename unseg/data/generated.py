"""The embedded dataset: deterministic images of textured shapes on cluttered backgrounds.

A category is a *shape with its texture* (a disc of stripes, a square of checks, ...); colours are
drawn at random for every instance and for the background, so colour carries no class information
and K-means on raw pixels cannot solve the task. Each image holds 1..``max_instances`` instances on
a background of smooth coloured noise with clutter (random strokes and blobs). Ground truth: a
semantic label map (0 = background, c = category c) and COCO instance masks of the visible parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import polygon2mask

CATEGORIES = ("disc", "square", "triangle", "cross", "star")
TEXTURES = ("stripes", "checks", "dots", "rings", "grid")


@dataclass(frozen=True)
class Instance:
    category: int  # 1-based category id
    mask: np.ndarray  # (H, W) bool, visible part


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


PALETTES = ("random", "category")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (each in [0, 1]) -> RGB in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _palette_colour(rng: np.random.Generator, category: int | None, n_categories: int) -> np.ndarray:
    """A random colour; with a category, its hue lies in that category's band (60 % of a 1/n-th of the hue
    circle, bands centred at c/n), saturation in [0.45, 1], value in [0.35, 1]."""
    if category is None:
        return _random_colour(rng)
    hue = (category + rng.uniform(-0.3, 0.3)) / n_categories
    return _hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0))


def _contrasting_pair(
    rng: np.random.Generator, category: int | None = None, n_categories: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Two colours whose brightness differs enough for the texture to be visible: random, or from the
    hue band of ``category`` (:func:`_palette_colour`)."""
    while True:
        a, b = _palette_colour(rng, category, n_categories), _palette_colour(rng, category, n_categories)
        if abs(a.mean() - b.mean()) > 0.25 or np.abs(a - b).max() > 0.55:
            return a, b


def _rotated(xx, yy, cx, cy, theta):
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return u, v


def _regular_polygon(h, w, cx, cy, radii, theta) -> np.ndarray:
    angles = theta + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    pts = np.stack([cy + radii * np.sin(angles), cx + radii * np.cos(angles)], axis=1)
    return polygon2mask((h, w), pts)


def shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """(H, W) bool mask of one shape of bounding radius ``r`` centred at (cx, cy), rotated by theta."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if kind == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    u, v = _rotated(xx, yy, cx, cy, theta)
    if kind == "square":
        s = r / np.sqrt(2)
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "cross":
        t = 0.36 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= t)) | ((np.abs(v) <= r) & (np.abs(u) <= t))
    if kind == "triangle":
        return _regular_polygon(h, w, cx, cy, np.full(3, r), theta)
    if kind == "star":
        return _regular_polygon(h, w, cx, cy, np.tile([r, 0.5 * r], 5), theta)
    raise ValueError(kind)


def texture(kind: str, h: int, w: int, cx: float, cy: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool pattern of one texture around (cx, cy), random scale, orientation and phase."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = _rotated(xx, yy, cx, cy, rng.uniform(0, np.pi))
    period = rng.uniform(4.5, 6.5)
    phase = rng.uniform(0, period)
    if kind == "stripes":
        return np.mod(u + phase, period) < period / 2
    if kind == "checks":
        return (np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2 == 0
    if kind == "dots":
        du, dv = np.mod(u + phase, period) - period / 2, np.mod(v + phase, period) - period / 2
        return du**2 + dv**2 < (0.3 * period) ** 2
    if kind == "rings":
        return np.mod(np.hypot(xx - cx, yy - cy) + phase, period) < period / 2
    if kind == "grid":
        return (np.mod(u + phase, period) < 1.6) | (np.mod(v + phase, period) < 1.6)
    raise ValueError(kind)


def desaturate(colour: np.ndarray, keep: float) -> np.ndarray:
    """Move colours towards their grey level: ``keep`` = 1 leaves them, 0 makes them grey."""
    grey = colour.mean(axis=-1, keepdims=True)
    return grey + keep * (colour - grey)


def cluttered_background(h: int, w: int, rng: np.random.Generator, saturation: float = 0.3) -> np.ndarray:
    """(H, W, 3) float image: a grey level with faint smooth noise, random strokes and blobs (no periodic texture).

    Clutter is muted (colours desaturated to ``saturation``), as backgrounds of natural photos tend to be;
    object colours stay fully random, so colour still says nothing about an object's category.
    """
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=rng.uniform(6, 14), mode="wrap")
    img = np.repeat((rng.uniform(0.3, 0.7) + 0.12 * noise / (noise.std() + 1e-6))[..., None], 3, axis=2)
    img = img.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(rng.integers(14, 28)):  # strokes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        ang, length, width = rng.uniform(0, np.pi), rng.uniform(8, 30), rng.uniform(0.8, 2.2)
        u, v = _rotated(xx, yy, x0, y0, ang)
        img[(np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)] = _random_colour(rng)
    for _ in range(rng.integers(5, 11)):  # blobs
        x0, y0, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 9)
        img[(xx - x0) ** 2 + (yy - y0) ** 2 <= rad**2] = _random_colour(rng)
    return desaturate(img, saturation)


def render_image(
    h: int, w: int, n_categories: int, max_instances: int, rng: np.random.Generator, palette: str = "random"
) -> tuple[np.ndarray, np.ndarray, list[Instance]]:
    """One image: uint8 (H, W, 3), semantic uint8 (H, W) and the visible instances (front-most last).

    ``palette="random"``: object colours say nothing about the category; ``"category"``: each category
    draws its colours from its own hue band, as classes in photos have typical colours (the clutter keeps
    random muted colours)."""
    img = cluttered_background(h, w, rng)
    semantic = np.zeros((h, w), np.uint8)
    owner = np.full((h, w), -1, np.int32)
    placed: list[tuple[float, float, float]] = []
    cats: list[int] = []
    n = int(rng.integers(1, max_instances + 1))
    side = min(h, w)
    for _ in range(n):
        for _attempt in range(30):
            r = rng.uniform(0.22, 0.38) * side
            cx, cy = rng.uniform(r * 0.8, w - r * 0.8), rng.uniform(r * 0.8, h - r * 0.8)
            if all(np.hypot(cx - x, cy - y) > 0.75 * (r + rr) for x, y, rr in placed):
                break
        else:
            continue
        cat = int(rng.integers(0, n_categories))
        mask = shape_mask(CATEGORIES[cat], h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
        pattern = texture(TEXTURES[cat], h, w, cx, cy, rng)
        col_a, col_b = _contrasting_pair(rng, cat if palette == "category" else None, n_categories)
        img[mask] = np.where(pattern[mask][:, None], col_a, col_b)
        semantic[mask] = cat + 1
        owner[mask] = len(placed)
        placed.append((cx, cy, r))
        cats.append(cat + 1)
    img += rng.normal(scale=0.03, size=img.shape).astype(np.float32)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    instances = [Instance(cats[i], owner == i) for i in range(len(placed)) if (owner == i).sum() >= 16]
    return image, semantic, instances


def image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(H, W) drawn from multiples of 16 in [min_side, max_side], so aspect ratios vary."""
    sides = np.arange(min_side, max_side + 1, 16) if max_side - min_side >= 16 else np.array([min_side])
    return int(rng.choice(sides)), int(rng.choice(sides))


def render_sample(
    index: int,
    seed: int,
    n_categories: int,
    max_instances: int,
    min_side: int,
    max_side: int,
    palette: str = "random",
):
    """Sample ``index`` of the dataset, a pure function of (index, seed)."""
    rng = np.random.default_rng([seed, index])
    h, w = image_size(rng, min_side, max_side)
    return render_image(h, w, n_categories, max_instances, rng, palette)


def render_video(
    index: int, seed: int, n_frames: int, h: int, w: int, n_categories: int, n_objects: int = 2
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A short video of textured shapes drifting over a still cluttered background (DAVIS-style GT).

    Returns frames (uint8 (H, W, 3)) and annotations (uint8 (H, W): 0 background, i = object i),
    a pure function of (index, seed). Objects keep their shape, texture and colours; they move by
    1-3 px and turn slightly per frame; later objects occlude earlier ones.
    """
    rng = np.random.default_rng([seed, 10_000 + index])
    background = cluttered_background(h, w, rng)
    objects = []
    side = min(h, w)
    for _ in range(n_objects):
        r = rng.uniform(0.15, 0.22) * side
        cat = int(rng.integers(0, n_categories))
        objects.append(
            dict(
                cat=cat,
                r=r,
                theta=rng.uniform(0, 2 * np.pi),
                spin=rng.uniform(-0.04, 0.04),
                pos=np.array([rng.uniform(r, w - r), rng.uniform(r, h - r)]),
                vel=rng.uniform(1.0, 3.0) * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)]),
                colours=_contrasting_pair(rng),
                tex_seed=int(rng.integers(1 << 31)),
            )
        )
    frames, annotations = [], []
    for _ in range(n_frames):
        img = background.copy()
        ann = np.zeros((h, w), np.uint8)
        for i, o in enumerate(objects):
            cx, cy = o["pos"]
            mask = shape_mask(CATEGORIES[o["cat"]], h, w, cx, cy, o["r"], o["theta"])
            pattern = texture(TEXTURES[o["cat"]], h, w, cx, cy, np.random.default_rng(o["tex_seed"]))
            img[mask] = np.where(pattern[mask][:, None], *o["colours"])
            ann[mask] = i + 1
            o["pos"] = o["pos"] + o["vel"]
            for d, limit in ((0, w), (1, h)):  # bounce off the borders
                if not o["r"] * 0.6 <= o["pos"][d] <= limit - o["r"] * 0.6:
                    o["vel"][d] *= -1
            o["theta"] += o["spin"]
        img += rng.normal(scale=0.02, size=img.shape).astype(np.float32)
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        annotations.append(ann)
    return frames, annotations
