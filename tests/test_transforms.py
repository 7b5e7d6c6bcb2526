"""ViT input geometry: shortest-side resize, pad/crop to the patch grid, token masks back to pixels."""

import numpy as np
import torch

from unseg.data.transforms import fit_canvas, geometry, resized_size, token_mask_to_pixels, vit_input


def test_resize_matches_torchvision_resize_rule():
    assert resized_size(480, 640, 640) == (640, 853)  # 640 * 640 / 480 = 853.3 -> 853
    assert resized_size(640, 480, 640) == (853, 640)
    assert resized_size(100, 100, 64) == (64, 64)


def test_pad_and_crop_geometry():
    g = geometry(480, 640, 640, 16, "pad")
    assert g.resized == (640, 853) and g.canvas == (640, 864) and g.grid == (40, 54)
    g = geometry(480, 640, 640, 16, "crop")
    assert g.canvas == (640, 848) and g.grid == (40, 53)


def test_padding_is_zero_in_normalised_space_at_the_bottom_right():
    img = np.full((10, 13, 3), 200, np.uint8)
    g = geometry(10, 13, None, 8, "pad")
    x = vit_input(img, g)
    assert x.shape == (3, 16, 16)
    assert torch.all(x[:, 10:, :] == 0) and torch.all(x[:, :, 13:] == 0)
    assert torch.all(x[:, :10, :13] != 0)


def test_fit_canvas_crops_bottom_right():
    x = torch.arange(30.0).view(1, 5, 6)
    assert torch.equal(fit_canvas(x, (4, 4)), x[:, :4, :4])


def test_token_mask_upsamples_by_nearest_and_crops_the_padding():
    g = geometry(12, 20, None, 8, "pad")  # canvas 16 x 24, grid 2 x 3
    tm = np.array([[1, 0, 1], [0, 0, 1]], bool)
    px = token_mask_to_pixels(tm, g, "nearest")
    assert px.shape == (12, 20)
    want = np.zeros((12, 20), bool)
    want[:8, :8] = True
    want[:8, 16:] = True
    want[8:, 16:] = True
    assert np.array_equal(px, want)


def test_token_mask_back_to_the_original_size_after_resize():
    g = geometry(20, 20, 10, 5, "pad")  # resized 10 x 10, grid 2 x 2
    tm = np.array([[1, 0], [0, 0]], bool)
    px = token_mask_to_pixels(tm, g, "nearest")
    assert px.shape == (20, 20) and px[:10, :10].all() and not px[10:].any() and not px[:, 10:].any()
    dilated = token_mask_to_pixels(tm, g, "pil_bicubic")
    assert dilated.sum() > px.sum() and dilated[px].all()  # the released resize only ever adds pixels
