"""Tests for unseg/pretrain/views.py (position-aware CrOC views)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from unseg.errors import UserError
from unseg.pretrain.views import (
    Photometric,
    ViewConfig,
    batch_of_views,
    crop_position_map,
    patch_positions,
    random_resized_crop_box,
    two_views,
)

NO_COLOUR = Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def plain_config(**kw) -> ViewConfig:
    """Geometry only: no photometry, identity normalisation."""
    base = dict(size=24, view1=NO_COLOUR, view2=NO_COLOUR, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    base.update(kw)
    return ViewConfig(**base)


def random_image(h=50, w=70, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_nearest_views_sample_the_original_at_the_mapped_coordinates():
    image = random_image()
    cfg = plain_config(interpolation="nearest-exact", scale=(0.05, 1.0))
    flips = set()
    for seed in range(20):
        views, pos = two_views(image, torch.Generator().manual_seed(seed), cfg)
        for v in range(2):
            xs = torch.floor(pos[v, 0] + 0.5).long()
            ys = torch.floor(pos[v, 1] + 0.5).long()
            assert xs.min() >= 0 and xs.max() < image.shape[2] and ys.min() >= 0 and ys.max() < image.shape[1]
            expected = image[:, ys, xs].float() / 255
            torch.testing.assert_close(views[v], expected, rtol=0, atol=1e-6)
            flips.add(bool(pos[v, 0, 0, 0] > pos[v, 0, 0, -1]))
    assert flips == {True, False}  # both flipped and unflipped views were checked


def test_bicubic_view_of_a_ramp_reproduces_the_position_map_inside():
    # A linear ramp survives an antialiased bicubic resize unchanged away from the borders, so the
    # default interpolation and the closed-form map must agree there (the official code resizes a ramp).
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([xs / w, ys / h, torch.zeros_like(xs)])
    cfg = plain_config(size=32, scale=(0.3, 0.6))
    for seed in range(10):
        views, pos = two_views(ramp, torch.Generator().manual_seed(seed), cfg)
        inner = (slice(None), slice(4, -4), slice(4, -4))
        torch.testing.assert_close((views[:, 0] * w)[inner], pos[:, 0][inner], rtol=0, atol=2e-3 * w)
        torch.testing.assert_close((views[:, 1] * h)[inner], pos[:, 1][inner], rtol=0, atol=2e-3 * h)


def test_position_map_follows_the_crop_box_and_flip():
    box = (5, 7, 20, 30)  # top, left, height, width
    size = 10
    pos = crop_position_map(box, size, flip=False)
    assert pos[0, 0, 0].item() == pytest.approx(7 + 0.5 * 30 / size - 0.5)
    assert pos[1, -1, 0].item() == pytest.approx(5 + (size - 0.5) * 20 / size - 0.5)
    assert pos[0].mean().item() == pytest.approx(7 + 30 / 2 - 0.5)  # box centre in pixel-index coordinates
    assert pos[1].mean().item() == pytest.approx(5 + 20 / 2 - 0.5)
    assert (pos[0].diff(dim=1) > 0).all() and (pos[1].diff(dim=0) > 0).all()
    flipped = crop_position_map(box, size, flip=True)
    torch.testing.assert_close(flipped, pos.flip(-1))


def test_crop_boxes_respect_scale_ratio_and_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(90, 120, (0.25, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        assert 0.25 * 0.9 <= h * w / (90 * 120) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # a box that cannot fit falls back to the central crop with clamped aspect, as torchvision does
    expected = RandomResizedCrop.get_params(torch.zeros(1, 10, 100), [0.9, 1.0], [3 / 4, 4 / 3])
    assert random_resized_crop_box(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), g) == tuple(expected) == (0, 43, 10, 13)


def test_same_seed_same_views_and_different_seed_different_views():
    image = random_image(64, 64, seed=3)
    cfg = ViewConfig(size=32)
    a = two_views(image, torch.Generator().manual_seed(11), cfg)
    b = two_views(image, torch.Generator().manual_seed(11), cfg)
    c = two_views(image, torch.Generator().manual_seed(12), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    state = torch.random.get_rng_state()
    two_views(image, torch.Generator().manual_seed(11), cfg)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never touched


def test_pil_and_uint8_inputs_agree():
    image = random_image(40, 48, seed=4)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    cfg = ViewConfig(size=16)
    a = two_views(image, torch.Generator().manual_seed(0), cfg)
    b = two_views(pil, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_photometric_extremes():
    image = random_image(32, 32, seed=5)
    geometry = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, size=32)
    gray = plain_config(view1=Photometric(jitter_p=0.0, gray_p=1.0, blur_p=0.0), **geometry)
    views, _ = two_views(image, torch.Generator().manual_seed(0), gray)
    torch.testing.assert_close(views[0, 0], views[0, 1])
    torch.testing.assert_close(views[0, 1], views[0, 2])
    sol = plain_config(view2=Photometric(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=1.0), **geometry)
    views, _ = two_views(image, torch.Generator().manual_seed(0), sol)
    x = image.float() / 255
    torch.testing.assert_close(views[0], x, rtol=0, atol=1e-6)  # full-image crop without photometry
    torch.testing.assert_close(views[1], torch.where(image >= 128, 1 - x, x), rtol=0, atol=1e-6)
    normed, _ = two_views(image, torch.Generator().manual_seed(0), ViewConfig(view1=NO_COLOUR, **geometry))
    mean = torch.tensor(ViewConfig().mean)[:, None, None]
    std = torch.tensor(ViewConfig().std)[:, None, None]
    torch.testing.assert_close(normed[0], (x - mean) / std, rtol=0, atol=1e-5)


def test_view2_defaults_differ_from_view1_as_in_dino():
    cfg = ViewConfig()
    assert (cfg.view1.blur_p, cfg.view1.solarize_p) == (1.0, 0.0)
    assert (cfg.view2.blur_p, cfg.view2.solarize_p) == (0.1, 0.2)
    assert (cfg.view1.jitter_p, cfg.view1.gray_p) == (0.8, 0.2) == (cfg.view2.jitter_p, cfg.view2.gray_p)


def test_patch_positions_equal_loop_average():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(2, 2, 12, 8, generator=g)
    out = patch_positions(pos, 4)
    ref = np.zeros((2, 6, 2))
    for b in range(2):
        for r in range(3):
            for c in range(2):
                for d in range(2):
                    ref[b, r * 2 + c, d] = pos[b, d, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4].mean().item()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    with pytest.raises(UserError):
        patch_positions(pos, 5)


def test_batch_of_views_shapes_and_patch_centres():
    images = [random_image(40, 60, seed=i) for i in range(3)]
    cfg = ViewConfig(size=16)
    views, pos = batch_of_views(images, [1, 2, 3], cfg, patch=8)
    assert views.shape == (3, 2, 3, 16, 16) and pos.shape == (3, 2, 4, 2)
    single, maps = two_views(images[1], torch.Generator().manual_seed(2), cfg)
    assert torch.equal(views[1], single)
    torch.testing.assert_close(pos[1], patch_positions(maps, 8))
    assert all(math.isfinite(v) for v in views.flatten().tolist()[:100])


def test_the_view_cache_holds_at_most_its_byte_budget_and_views_do_not_depend_on_it(tmp_path):
    from unseg.data.index import ImageEntry
    from unseg.pretrain.trainer import CrOCTraining, ViewBatches, view_config

    entries = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
        entries.append(ImageEntry(i, str(path), 32, 40, "train"))
    views = view_config(CrOCTraining(steps=1, crop_size=16))
    one_image = 32 * 40 * 3
    small = ViewBatches(entries, views, patch=8, seed=0, cache_bytes=2 * one_image)
    big = ViewBatches(entries, views, patch=8, seed=0)
    a, b = small([0, 1, 2, 3], step=5), big([0, 1, 2, 3], step=5)
    assert len(small.cache) == 2 and small.cached_bytes <= 2 * one_image and len(big.cache) == 4
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
